"""The upload route as a plain ASGI handler, in front of FastAPI's router.

Uploads are the request whose count grows with devices x rounds, and for them FastAPI's routing and
dependency resolution (each sync dependency a hop to the threadpool) cost more CPU than hashing and
decoding the 250 KB update. This handler takes an upload of the ordinary shape -- POST
/v1/rounds/{n}/updates with a bearer token and an Idempotency-Key of at most 200 characters, for a
population that exists -- and runs the very same code as the FastAPI route
(`routers/uploads.receive_upload`). Anything else goes on to FastAPI untouched, which answers it
(errors included) as documented. It sits inside the body limits, the request metrics and the
population routing, so they apply as to any request.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

from coordinator.api.body import read_body
from coordinator.api.deps import device_for_token
from coordinator.api.errors import refusal_response
from coordinator.api.routers.uploads import receive_upload
from coordinator.errors import Refused

UPLOAD_PATH = re.compile(r"/v1/rounds/(\d{1,19})/updates")
MAX_ROUND_ID = 2**62  # as the route's path parameter (routers/rounds.RoundId)
MAX_KEY_CHARS = 200  # as the route's Idempotency-Key header
WANTED = (b"authorization", b"idempotency-key", b"content-length")


class FastUpload:
    """Serves ordinary uploads itself (see the module docstring); `state` is the app's state."""

    def __init__(self, app, state, route=None):
        self.app, self.state, self.route = app, state, route

    async def __call__(self, scope, receive, send):
        found = UPLOAD_PATH.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if found is None or int(found[1]) > MAX_ROUND_ID:
            return await self.app(scope, receive, send)
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in WANTED and name not in headers:  # the first of each, as Starlette's headers.get
                headers[name] = value.decode("latin-1")
        scheme, _, token = headers.get(b"authorization", "").partition(" ")
        token, key, declared = token.strip(), headers.get(b"idempotency-key"), headers.get(b"content-length")
        population = scope.get("pf_population")
        services = self.state.services if population is None else self.state.populations.get(population)
        if scheme.lower() != "bearer" or not token or not key or len(key) > MAX_KEY_CHARS or services is None:
            return await self.app(scope, receive, send)  # FastAPI answers the unusual ones
        if self.route is not None:
            scope["route"] = self.route  # the request metrics' label, as FastAPI's router would set it
        try:
            settings = services.settings
            device = device_for_token(token, services.store, services.ingest.clock(), settings.device_token_idle_days)
            answer = await receive_upload(
                services,
                self.state,
                device.id,
                int(found[1]),
                key,
                lambda limit: read_body(receive, declared, limit),
            )
            response = JSONResponse(answer, status_code=202)
        except Refused as exc:
            response = refusal_response(exc, services.metrics, "POST", scope["path"])
        await response(scope, receive, send)
