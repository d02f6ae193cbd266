"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from coordinator.api.deps import ServicesDep
from coordinator.api.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
def healthz(services: ServicesDep) -> Health:
    r = services.rounds.current()
    return Health(
        status="ok",
        model_version=services.versions.latest(),
        round_id=r.id if r else None,
        paused=services.rounds.paused,
    )


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(services: ServicesDep) -> PlainTextResponse:
    """Prometheus text exposition format, version 0.0.4."""
    return PlainTextResponse(services.metrics.render(), media_type="text/plain; version=0.0.4")
