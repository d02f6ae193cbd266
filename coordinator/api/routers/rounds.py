"""Rounds: their status, participants and metrics (uploads are routers/uploads.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from coordinator.api.deps import AdminViewDep, ServicesDep, StoreDep
from coordinator.api.schemas import FederatedEvaluation, Participant, RoundDetail, RoundSummary
from coordinator.errors import Refused
from coordinator.store import RoundRow

router = APIRouter(prefix="/v1/rounds", tags=["rounds"])

RoundId = Annotated[int, Path(ge=0, le=2**62, description="round number")]


def summarize(
    r: RoundRow, assigned: int, secagg: tuple[str, int] | None = None, federated: dict | None = None
) -> RoundSummary:
    """`secagg`: (phase, cohort size) of a secure-aggregation round; `federated`: the devices' evaluation
    per version (service/fedmetrics.py), if at hand."""
    dp = r.dp_q is not None
    measured = (federated or {}).get(r.result_version) if r.result_version is not None else None
    return RoundSummary(
        id=r.id,
        status=r.status,
        base_version=r.base_version,
        goal=r.goal,
        max_assignments=r.max_assignments,
        min_updates=r.min_updates,
        assigned=assigned,
        received=r.received,
        total_samples=r.total_weight,
        opened_at=r.opened_at,
        deadline=r.deadline,
        closed_at=r.closed_at,
        reason=r.reason,
        result_version=r.result_version,
        strategy=r.config.strategy,
        epsilon=r.epsilon,
        dp_delta=r.config.dp_delta if dp else None,
        dp_clip_norm=r.dp_clip,
        dp_sampling_rate=r.dp_q,
        dp_sampling=r.config.dp_sampling if dp else None,
        secure_aggregation=r.config.secure_aggregation,
        secagg_phase=secagg[0] if secagg else None,
        secagg_cohort=secagg[1] if secagg else None,
        federated=FederatedEvaluation.of(measured),
        canary=bool(r.canary),
    )


def secagg_of(store, r: RoundRow) -> tuple[str, int] | None:
    if not r.config.secure_aggregation:
        return None
    row = store.secagg(r.id)
    return (row.phase, len(row.members)) if row is not None else ("joining", 0)


def recent_rounds(store, limit: int, services=None) -> list[RoundSummary]:
    """The newest `limit` rounds, newest first (with `services`, each with its version's federated metrics)."""
    rows = store.rounds(limit)
    assigned = store.assigned_per_round([r.id for r in rows])
    made = [r.result_version for r in rows if r.result_version is not None]
    federated = fedmetrics_of(services, min(made)) if made and services is not None else None
    return [summarize(r, assigned.get(r.id, 0), secagg_of(store, r), federated) for r in rows]


def fedmetrics_of(services, since: int) -> dict | None:
    """The devices' evaluation of versions from `since` on (service/fedmetrics.py)."""
    return services.fedmetrics.per_version(since=since) if services.fedmetrics else None


@router.get("", response_model=list[RoundSummary])
def list_rounds(
    store: StoreDep, services: ServicesDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[RoundSummary]:
    """Most recent rounds first, each with the devices' own evaluation of the version it produced."""
    return recent_rounds(store, limit, services)


@router.get("/{round_id}", response_model=RoundDetail)
def round_detail(round_id: RoundId, store: StoreDep, admin: AdminViewDep, services: ServicesDep) -> RoundDetail:
    """A round's status and sample-weighted mean metrics; which device sent what (participants) only
    with the admin token, as a device's count and norm help recover its update from the model's."""
    r = store.round(round_id)
    if r is None:
        raise Refused(404, f"round {round_id} does not exist", "unknown_round")
    participants = [
        Participant(
            device_id=u.device_id,
            sample_count=u.sample_count,
            norm=u.norm,
            encoding=u.encoding,
            received_at=u.received_at,
            metrics=u.metrics,
        )
        for u in store.round_updates(round_id)
    ]
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for p in participants:
        for name, value in p.metrics.items():
            sums[name] = sums.get(name, 0.0) + value * p.sample_count
            weights[name] = weights.get(name, 0.0) + p.sample_count
    return RoundDetail(
        **summarize(
            r, store.count_assigned(round_id), secagg_of(store, r), fedmetrics_of(services, r.result_version or 0)
        ).model_dump(),
        config=r.config,
        metrics={k: sums[k] / weights[k] for k in sums if weights[k] > 0},
        participants=participants if admin else None,
    )
