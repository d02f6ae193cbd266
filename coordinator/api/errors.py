"""How refusals reach the client: {"detail": "<which field and why>"} with the right status, for the
service's `Refused`, Starlette's own HTTP errors (unknown path, wrong method) and invalid requests;
every one is counted by reason in /metrics."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.errors import Refused
from coordinator.metrics import Metrics

log = logging.getLogger("pocketfed.coordinator")


def refusal_response(exc: Refused, metrics: Metrics, method: str, path: str) -> JSONResponse:
    """How every refusal is answered and counted (FastAPI's handler below, and api/fast_upload.py)."""
    metrics.refusal(exc.reason)
    log.debug("refused %s %s: %s %s", method, path, exc.status_code, exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return refusal_response(exc, metrics, request.method, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.refusal(f"http_{exc.status_code}")
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.refusal("invalid_request")
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": problems or "invalid request"}, status_code=422)


def document_refusals(app: FastAPI) -> None:
    """FastAPI's OpenAPI schema, with 422 bodies as this service sends them: {"detail": "<field and why>"}."""

    def openapi() -> dict:
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
