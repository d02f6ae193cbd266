"""Populations: the named populations one coordinator serves besides `default`, and creating one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from coordinator.api.body import read_limited
from coordinator.api.deps import SettingsDep, require_admin
from coordinator.api.schemas import PopulationCreated, PopulationInfo
from coordinator.errors import Refused
from coordinator.service.populations import DEFAULT, Populations
from engine.serialize.container import ContainerError

router = APIRouter(tags=["populations"])


def registry(request: Request) -> Populations:
    """Only at the top level: /v1/populations/{name}/populations is no route."""
    if request.scope.get("pf_population") is not None:
        raise Refused(404, "populations are listed and created at /v1/populations only", "not_found")
    return request.app.state.populations


PopulationsDep = Annotated[Populations, Depends(registry)]


@router.get("/v1/populations", response_model=list[PopulationInfo])
def list_populations(populations: PopulationsDep) -> list[PopulationInfo]:
    """Every population with its released version and enrolled devices (public, like /v1/models).
    A population's API is /v1/populations/{name}/... (the default's is /v1/... as well)."""
    out = []
    rows = populations.registry()
    for name in populations.names():
        services = populations.get(name)
        row = rows.get(name)
        out.append(
            PopulationInfo(
                name=name,
                architecture=row[2] if row else services.versions.get(0).info.architecture,
                created_at=row[3] if row else None,
                created_by=row[4] if row else None,
                released_version=services.releases.released(),
                devices=services.store.count_devices(),
                api=f"/v1/populations/{name}/",
            )
        )
    return out


@router.post(
    "/v1/admin/populations",
    response_model=PopulationCreated,
    status_code=201,
    dependencies=[Depends(require_admin)],
    responses={409: {"description": "the name is taken"}, 422: {"description": "bad name or model file"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def create_population(
    request: Request,
    populations: PopulationsDep,
    settings: SettingsDep,
    name: Annotated[str, Query(min_length=1, max_length=40, description="a-z first, then a-z, 0-9, _")],
    by: Annotated[str, Query(min_length=1, max_length=100, description="who creates it (recorded)")] = "admin",
) -> PopulationCreated:
    """Create a population whose v0 is the model file in the body; its enrollment key is returned once
    (stored only as its sha256). Devices enroll at /v1/populations/{name}/devices with it."""
    if name == DEFAULT:
        raise Refused(409, "population 'default' exists already", "population_exists")
    body = await read_limited(request, settings.max_body_bytes)
    try:
        services, key = await run_in_threadpool(populations.create, name, body, by)
    except (ContainerError, ValueError, RecursionError) as exc:
        raise Refused(422, f"model file: {exc}", "bad_model") from None
    return PopulationCreated(
        name=name,
        enrollment_key=key,
        version=services.releases.released(),
        sha256=services.versions.get(0).info.sha256,
        api=f"/v1/populations/{name}/",
    )
