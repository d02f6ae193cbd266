"""Models as the agent receives them: verified before use, fed data the way their file says."""

from __future__ import annotations

import hashlib
from typing import Any

from engine.data import IDataView
from engine.serialize.container import ContainerError, loads


def model_view(model: Any, dataset: IDataView) -> IDataView:
    """The local data as `model` is fed: the preprocessing its file records (scale, mean/std,
    padding), items reshaped to its input."""
    from engine.data import preprocessing_for

    return preprocessing_for(model).view(dataset, model)


class CorruptModel(Exception):
    """A downloaded model failed its sha256 (ETag) or container checks: never train on it."""


def model_problem(data: bytes, etag: str | None) -> str | None:
    """Why `data` is not a trustworthy model file (None when it is): the ETag must be the quoted sha256
    of the body (docs/protocol.md, "Verify before use"), and the container's own checksum must hold."""
    digest = hashlib.sha256(data).hexdigest()
    claimed = (etag or "").strip().removeprefix("W/").strip('"').lower()
    if claimed != digest:
        return f"sha256 {digest[:16]}... does not match the ETag {etag!r}"
    try:
        loads(data, kind="model")
    except ContainerError as exc:
        return str(exc)
    return None


def make_sgd(lr: float, momentum: float) -> Any:
    from engine.optimizer import SGD

    return SGD(lr=lr, momentum=momentum)
