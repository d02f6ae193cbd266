"""`create_app(settings)`: the services (coordinator/service/), the routers, the middleware."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from coordinator.api.errors import document_refusals, install_error_handlers
from coordinator.api.fast_upload import FastUpload
from coordinator.api.limits import BodyLimits
from coordinator.api.middleware import PopulationRouting, RequestMetrics
from coordinator.api.routers import (
    admin,
    checkin,
    dashboard,
    devices,
    fedmetrics,
    models,
    ops,
    populations,
    releases,
    rounds,
    secagg,
    uploads,
)
from coordinator.service import open_services
from coordinator.service.evaluation import EvaluateFn
from coordinator.service.populations import Populations
from coordinator.settings import Settings


def create_app(
    settings: Settings, *, clock: Callable[[], float] = time.time, evaluate: EvaluateFn | None = None
) -> FastAPI:
    """Build the service. `clock` and `evaluate` are injectable for tests; by default the wall clock
    and, with --eval-data, the engine's evaluator. The database is opened (and migrated) here; the
    background ticker runs while the app is served."""
    services = open_services(settings, clock=clock, evaluate=evaluate)
    named = Populations(services, clock=clock, evaluate=evaluate)
    named.open_registered()

    def close() -> None:
        named.close()
        services.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        services.ticker.start()
        named.start()
        try:
            yield
        finally:
            await run_in_threadpool(close)

    app = FastAPI(
        title="pocketfed coordinator",
        version="1",
        lifespan=lifespan,
        description="Federated rounds over HTTP: enroll, check in, download the model, upload a delta. "
        "A named population answers the same API at /v1/populations/{name}/... (and, for device agents, "
        "/populations/{name}/v1/...); GET /v1/populations lists them.",
    )
    app.state.services = services
    app.state.populations = named
    app.state.upload_slots = asyncio.Semaphore(settings.max_concurrent_uploads)
    app.state.uploads_in_flight = set()  # device ids: one upload at a time per device
    for module in (
        devices,
        models,
        releases,
        checkin,
        rounds,
        uploads,
        secagg,
        admin,
        populations,
        ops,
        dashboard,
        fedmetrics,
    ):
        app.include_router(module.router)
    upload_route = next(r for r in uploads.router.routes if getattr(r, "path", "").endswith("/updates"))
    app.add_middleware(FastUpload, state=app.state, route=upload_route)  # inside the body limits
    app.add_middleware(
        BodyLimits,
        max_json_bytes=settings.max_json_body_bytes,
        max_binary_bytes=settings.max_body_bytes,
        grace_seconds=settings.body_grace_seconds,
        min_bytes_per_second=settings.min_body_rate,
        on_refusal=services.metrics.refusal,
    )
    app.add_middleware(RequestMetrics, metrics=services.metrics)
    app.add_middleware(PopulationRouting)  # outermost: the routes see the rewritten path
    install_error_handlers(app, services.metrics)
    document_refusals(app)
    return app
