"""Federated metrics: devices report what an evaluate or personalize task measured; anyone may read
the per-version means (like /v1/models, they carry no device's data, only fleet averages)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, Field

from coordinator.api.deps import DeviceDep, ServicesDep, require_admin
from coordinator.api.schemas import FederatedEvaluation, MetricsReport
from coordinator.errors import Refused
from protocol.messages import FederatedMetrics

router = APIRouter(prefix="/v1/federated-metrics", tags=["models"])


@router.post("", status_code=204, response_class=Response, responses={404: {"description": "no such version"}})
def report(body: MetricsReport, device: DeviceDep, services: ServicesDep) -> Response:
    """Store the device's accuracies for one version and kind (a repeat replaces its earlier report)."""
    services.fedmetrics.report(device.id, FederatedMetrics(**body.model_dump()))
    return Response(status_code=204)


@router.get("", response_model=dict[int, FederatedEvaluation])
def per_version(
    services: ServicesDep, limit: Annotated[int, Query(ge=1, le=1000, description="newest versions")] = 100
) -> dict[int, FederatedEvaluation]:
    """Per version (newest first): the devices' mean global and personal accuracy and the lift."""
    return {v: FederatedEvaluation.of(m) for v, m in services.fedmetrics.per_version(limit).items()}


class EvaluationRequests(BaseModel):
    versions: list[int] = Field(..., max_length=16, description="versions devices should evaluate (not adopt)")


@router.put(
    "/evaluate",
    response_model=EvaluationRequests,
    dependencies=[Depends(require_admin)],
    responses={403: {"description": "admin token missing or wrong"}, 404: {"description": "no such version"}},
)
def request_evaluation(body: EvaluationRequests, services: ServicesDep) -> EvaluationRequests:
    """Operator: ask devices that support it to evaluate these versions on their own data (replaces the
    earlier list; [] stops). Each device evaluates each version once, when it has nothing to train."""
    for version in body.versions:
        if services.store.version(version) is None:
            raise Refused(404, f"model version {version} does not exist", "unknown_model")
    services.fedmetrics.request_evaluation(body.versions)
    return EvaluationRequests(versions=services.fedmetrics.evaluation_requests())
