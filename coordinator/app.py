"""`create_app(settings)`: wires storage, the round manager, evaluation and the routers together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.errors import Refused
from coordinator.evaluation import EvaluateFn, Evaluator, engine_evaluator
from coordinator.metrics import Metrics
from coordinator.modelfile import initial_model_bytes
from coordinator.rounds import RoundManager
from coordinator.routers import admin, checkin, dashboard, devices, models, ops, rounds
from coordinator.settings import Settings
from coordinator.storage import Database, ModelFiles

log = logging.getLogger("pocketfed.coordinator")


class RequestCounter:
    """ASGI middleware counting requests by method, route template and status (for /metrics)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.metrics.inc(
                "pf_http_requests_total",
                method=scope["method"],
                route=getattr(route, "path", "unmatched"),
                status=str(status["code"]),
            )


def create_app(
    settings: Settings, *, clock: Callable[[], float] = time.time, evaluate: EvaluateFn | None = None
) -> FastAPI:
    """Build the service. `clock` and `evaluate` are injectable for tests; by default the wall clock
    and, with --eval-data, the engine's evaluator."""
    if not settings.enrollment_key:
        settings = settings.model_copy(update={"enrollment_key": secrets.token_urlsafe(16)})
        log.warning("no enrollment key given; generated one for this run: %s", settings.enrollment_key)
    db = Database(settings.db)
    files = ModelFiles(Path(settings.db).with_suffix(".models"))
    metrics = Metrics()
    if evaluate is None and settings.eval_data:
        evaluate = engine_evaluator(settings.eval_data)
    evaluator = None
    if evaluate is not None:

        def store(version: int, result: dict) -> None:
            with db.transaction() as cur:
                cur.execute(
                    "UPDATE model_versions SET accuracy=?, eval_loss=?, eval_n=? WHERE version=?",
                    (float(result["accuracy"]), float(result["loss"]), int(result["n"]), version),
                )

        evaluator = Evaluator(evaluate, store)

    def on_event(name: str, **labels: str) -> None:
        if name == "round_closed":
            log.debug("round closed: %s", labels)

    manager = RoundManager(
        settings,
        db,
        files,
        clock=clock,
        on_event=on_event,
        on_new_version=(lambda v, data: evaluator.submit(v, data)) if evaluator else None,
    )
    manager.start(lambda: initial_model_bytes(settings.model, settings.model_seed))
    if evaluator is not None:  # versions a crash left unevaluated
        for row in db.query("SELECT version FROM model_versions WHERE accuracy IS NULL ORDER BY version"):
            evaluator.submit(row["version"], manager.model(row["version"]).data)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def enforce_deadlines() -> None:
            while True:
                await asyncio.sleep(settings.tick_interval)
                try:
                    await run_in_threadpool(manager.tick)
                except Exception:  # keep the timer alive; the next request retries lazily
                    log.exception("deadline check failed")

        task = asyncio.create_task(enforce_deadlines())
        try:
            yield
        finally:
            task.cancel()
            await run_in_threadpool(manager.close)
            if evaluator is not None:
                evaluator.close()

    app = FastAPI(
        title="pocketfed coordinator",
        version="1",
        lifespan=lifespan,
        description="Federated rounds over HTTP: enroll, check in, download the model, upload a delta.",
    )
    app.state.settings, app.state.db, app.state.manager = settings, db, manager
    app.state.metrics, app.state.evaluator = metrics, evaluator
    app.state.upload_slots = asyncio.Semaphore(settings.max_concurrent_uploads)
    for module in (devices, models, checkin, rounds, admin, ops, dashboard):
        app.include_router(module.router)
    app.add_middleware(RequestCounter, metrics=metrics)

    def openapi() -> dict:
        """FastAPI's schema, with 422 bodies as this service sends them: {"detail": "<field and why>"}."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["HTTPValidationError"] = {
                "title": "Refusal",
                "type": "object",
                "required": ["detail"],
                "properties": {"detail": {"type": "string", "description": "which field and why"}},
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = exc.reason if isinstance(exc, Refused) else f"http_{exc.status_code}"
        metrics.inc("pf_updates_refused_total", reason=reason)
        log.debug("refused %s %s: %s %s", request.method, request.url.path, exc.status_code, exc.detail)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.inc("pf_updates_refused_total", reason="invalid_request")
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)

    return app
