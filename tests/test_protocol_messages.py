"""The device protocol's JSON messages: one definition, strict on known fields, tolerant of new ones."""

from __future__ import annotations

import pytest

from protocol.messages import CheckinAnswer, FederatedMetrics, ProtocolError, Task, UploadReceipt

TASK = {
    "round_id": 3,
    "base_version": 2,
    "epochs": 1,
    "batch_size": 16,
    "lr": 0.05,
    "momentum": 0.9,
    "deadline": 1700000000.5,
    "fedprox_mu": 0.01,
    "clip_norm": None,
    "noise_multiplier": 0.0,
    "encoding": "int8",
    "topk_fraction": 0.1,
}


def test_task_round_trips_and_ignores_fields_a_newer_server_adds():
    task = Task.from_dict({**TASK, "some_future_field": [1, 2]})
    assert task.to_dict() == {**TASK, "kind": "train"}  # a task without a kind is a training task
    assert (task.round_id, task.encoding, task.topk_fraction, task.clip_norm) == (3, "int8", 0.1, None)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("round_id", "3", "round_id: '3' is not a finite integer"),
        ("round_id", -1, "round_id: -1 is below 0"),
        ("epochs", 0, "epochs: 0 is below 1"),
        ("lr", float("nan"), "lr: nan is not a finite number"),
        ("batch_size", True, "batch_size: True is not a finite integer"),
        ("encoding", "int2", "encoding: 'int2' is not one of float32, float16, int8, int4"),
        ("topk_fraction", 1.5, r"topk_fraction: 1.5 is not in \(0, 1\]"),
        ("deadline", None, "deadline: missing"),
    ],
)
def test_task_refuses_a_malformed_field_by_name(field, value, message):
    with pytest.raises(ProtocolError, match=message):
        Task.from_dict({**TASK, field: value})


def test_checkin_answers_parse_both_kinds_and_refuse_others():
    answer = CheckinAnswer.from_dict({"status": "task", "task": TASK})
    assert answer.task == Task.from_dict(TASK) and answer.retry_after is None
    retry = CheckinAnswer.from_dict({"status": "retry", "retry_after": 30, "reason": "round full"})
    assert retry == CheckinAnswer("retry", retry_after=30, reason="round full")
    assert retry.to_dict() == {"status": "retry", "retry_after": 30, "reason": "round full"}
    with pytest.raises(ProtocolError, match="status: 'later' is neither"):
        CheckinAnswer.from_dict({"status": "later"})
    with pytest.raises(ProtocolError, match="task: expected a JSON object"):
        CheckinAnswer.from_dict({"status": "task", "task": None})
    with pytest.raises(ProtocolError, match="check-in answer: expected a JSON object, got list"):
        CheckinAnswer.from_dict([])


def test_upload_receipt_requires_acceptance():
    body = {"accepted": True, "round_id": 4, "received": 2, "goal": 5}
    assert UploadReceipt.from_dict(body).to_dict() == body
    with pytest.raises(ProtocolError, match="accepted: False is not true"):
        UploadReceipt.from_dict({**body, "accepted": False})


def test_the_coordinators_api_schema_is_built_from_the_protocol_task():
    pytest.importorskip("fastapi")
    from coordinator.api.schemas import CheckinResponse

    schema = CheckinResponse.model_json_schema()
    task_schema = schema["$defs"]["Task"]
    assert set(task_schema["properties"]) == set(TASK) | {"secure_aggregation", "kind", "feddyn_alpha"}  # 13, 17, 15
    assert set(task_schema["required"]) == {
        "round_id",
        "base_version",
        "epochs",
        "batch_size",
        "lr",
        "momentum",
        "deadline",
    }
    served = CheckinResponse.model_validate(CheckinAnswer("task", task=Task.from_dict(TASK)), from_attributes=True)
    assert Task.from_dict(served.model_dump()["task"]) == Task.from_dict(TASK)


def test_task_kinds_parse_and_unknown_kinds_are_refused():
    for kind in ("train", "evaluate", "personalize"):
        task = Task.from_dict({**TASK, "kind": kind})
        assert task.kind == kind and task.trains_global == (kind == "train")
        assert Task.from_dict(task.to_dict()) == task
    with pytest.raises(ProtocolError, match="kind"):
        Task.from_dict({**TASK, "kind": "mine_bitcoin"})


def test_federated_metrics_are_checked_field_by_field():
    good = {"version": 3, "kind": "personalize", "global_accuracy": 0.5, "personal_accuracy": 0.9, "samples": 20}
    assert FederatedMetrics.from_dict(good).to_dict() == {**good, "global_loss": None, "personal_loss": None}
    for change, field in [
        ({"kind": "train"}, "kind"),
        ({"personal_accuracy": 1.5}, "personal_accuracy"),
        ({"samples": 0}, "samples"),
        ({"version": -1}, "version"),
        ({"global_accuracy": float("nan")}, "global_accuracy"),
    ]:
        with pytest.raises(ProtocolError, match=field):
            FederatedMetrics.from_dict({**good, **change})
