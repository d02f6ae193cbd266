"""Releases: which version devices get as their base, and the audit of every change (who and why)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import ServicesDep
from coordinator.api.schemas import ReleaseEvent, Releases

router = APIRouter(prefix="/v1/releases", tags=["models"])


@router.get("", response_model=Releases)
def releases(services: ServicesDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Releases:
    """The released version, the canary and the pin, with the release audit newest first (public,
    like /v1/models)."""
    state = services.releases.state()
    events = [ReleaseEvent.model_validate(e, from_attributes=True) for e in services.store.releases(limit)]
    return Releases(released=state.released, canary=state.canary, pinned=state.pinned, events=events)
