"""Model versions: immutable numbered files, served with their sha256 as ETag."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response

from coordinator.deps import DbDep, ManagerDep, device_or_admin
from coordinator.errors import Refused
from coordinator.rounds import RoundManager
from coordinator.schemas import ModelVersionInfo, ModelVersionListing

router = APIRouter(prefix="/v1/models", tags=["models"])


def _info(manager: RoundManager, version: int) -> ModelVersionInfo:
    loaded = manager.model(version)
    if loaded is None:
        raise Refused(404, f"model version {version} does not exist", "unknown_model")
    i = loaded.info
    return ModelVersionInfo(
        version=version,
        sha256=i.sha256,
        architecture=i.architecture,
        size_bytes=i.size_bytes,
        num_parameters=i.num_parameters,
        created_at=i.created_at,
    )


@router.get("", response_model=list[ModelVersionListing])
def list_versions(
    db: DbDep, limit: Annotated[int, Query(ge=1, le=1000, description="newest versions to list")] = 100
) -> list[ModelVersionListing]:
    """Every model version, newest first, with its sha256, size and server-side evaluation (public, like
    /v1/models/latest): how the federation's model improved round by round."""
    rows = db.query(
        "SELECT version, sha256, architecture, size_bytes, num_parameters, created_at, round_id, "
        "accuracy, eval_loss, eval_n FROM model_versions ORDER BY version DESC LIMIT ?",
        (limit,),
    )
    return [
        ModelVersionListing(
            **{k: r[k] for k in ModelVersionInfo.model_fields},
            round_id=r["round_id"],
            accuracy=r["accuracy"],
            loss=r["eval_loss"],
            eval_samples=r["eval_n"],
        )
        for r in rows
    ]


@router.get("/latest", response_model=ModelVersionInfo)
def latest(manager: ManagerDep) -> ModelVersionInfo:
    """What the current base model is (public, like the dashboard); downloading it needs a token."""
    return _info(manager, manager.latest_version())


@router.get(
    "/{version}",
    response_class=Response,
    dependencies=[Depends(device_or_admin)],
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the model file"},
        304: {"description": "If-None-Match matched"},
        404: {"description": "no such version"},
    },
)
def download(
    version: Annotated[int, Path(ge=0, le=2**62)],
    manager: ManagerDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The model file (graph + weights); send If-None-Match with the ETag to skip an unchanged download."""
    loaded = manager.model(version)
    if loaded is None:
        raise Refused(404, f"model version {version} does not exist", "unknown_model")
    etag = f'"{loaded.info.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    if if_none_match:
        candidates = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        if etag in candidates or "*" in candidates:
            return Response(status_code=304, headers=headers)
    return Response(loaded.data, media_type="application/octet-stream", headers=headers)
