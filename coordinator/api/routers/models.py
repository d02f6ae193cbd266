"""Model versions: immutable numbered files, and each version's ONNX training step, served with
their sha256 as ETag."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Response

from coordinator.api.deps import ServicesDep, device_or_admin
from coordinator.api.schemas import FederatedEvaluation, ModelVersionInfo, ModelVersionListing
from coordinator.errors import Refused
from coordinator.service import Services
from coordinator.service.versions import LoadedModel

router = APIRouter(prefix="/v1/models", tags=["models"])


def _loaded(services: Services, version: int) -> LoadedModel:
    loaded = services.versions.get(version)
    if loaded is None:
        raise Refused(404, f"model version {version} does not exist", "unknown_model")
    return loaded


@router.get("", response_model=list[ModelVersionListing])
def list_versions(
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="newest versions to list")] = 100,
) -> list[ModelVersionListing]:
    """Every model version, newest first, with its sha256, size, server-side evaluation, release status
    and the devices' own (federated) evaluation (public, like /v1/models/latest): how the federation's
    model improved round by round."""
    releases = services.releases
    status = releases.status_of(releases.state(), releases.last_actions())
    listed = services.store.versions(limit)
    since = min((v.version for v in listed), default=0)
    federated = services.fedmetrics.per_version(since=since) if services.fedmetrics else {}
    return [
        ModelVersionListing(
            version=v.version,
            sha256=v.sha256,
            architecture=v.architecture,
            size_bytes=v.size_bytes,
            num_parameters=v.num_parameters,
            created_at=v.created_at,
            round_id=v.round_id,
            accuracy=v.accuracy,
            loss=v.eval_loss,
            eval_samples=v.eval_n,
            release=status(v.version),
            federated=FederatedEvaluation.of(federated.get(v.version)),
        )
        for v in listed
    ]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return etag in candidates or "*" in candidates


@router.get("/latest", response_model=ModelVersionInfo, responses={304: {"description": "If-None-Match matched"}})
def latest(
    services: ServicesDep, response: Response, if_none_match: Annotated[str | None, Header()] = None
) -> ModelVersionInfo | Response:
    """The released version: what devices take as their base (public, like the dashboard); downloading
    it needs a token. Newer versions may be candidates still (GET /v1/models says which). Its ETag
    names the version, so a device polling for a new base with If-None-Match gets a bodiless 304 until then."""
    version = services.releases.released()
    i = _loaded(services, version).info
    etag = f'"v{version}-{i.sha256[:16]}"'
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = "no-cache"
    return ModelVersionInfo(
        version=version,
        sha256=i.sha256,
        architecture=i.architecture,
        size_bytes=i.size_bytes,
        num_parameters=i.num_parameters,
        created_at=i.created_at,
    )


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
    services: ServicesDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The model file (graph + weights); send If-None-Match with the ETag to skip an unchanged download."""
    loaded = _loaded(services, version)
    return _immutable(loaded.data, loaded.info.sha256, if_none_match, "public, max-age=31536000, immutable")


@router.get(
    "/{version}/training-step",
    response_class=Response,
    dependencies=[Depends(device_or_admin)],
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the ONNX training step"},
        304: {"description": "If-None-Match matched"},
        404: {"description": "no such version, or its graph has an operator without an ONNX lowering"},
    },
)
def training_step(
    version: Annotated[int, Path(ge=0, le=2**62)],
    services: ServicesDep,
    optimizer: Annotated[
        Literal["sgd", "sgd-momentum", "adam"] | None,
        Query(description="default: SGD with the rounds' device momentum (plain SGD when it is 0)"),
    ] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """One training step of the version as a plain ONNX graph (docs/training-step.md): devices train
    with any ONNX runtime, no engine needed. Its weights are the inputs; the file holds none."""
    _loaded(services, version)
    current = services.rounds.current()
    momentum = (current.config if current is not None else services.rounds.round_settings).momentum
    if optimizer is None:
        optimizer = "sgd-momentum" if momentum > 0 else "sgd"
    step = services.training_steps.get(version, optimizer, momentum)
    # the bytes follow the optimizer settings, not only the version: revalidate (a 304 is cheap)
    return _immutable(step.data, step.sha256, if_none_match, "no-cache")


def _immutable(data: bytes, sha256: str, if_none_match: str | None, cache_control: str) -> Response:
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="application/octet-stream", headers=headers)
