"""Request metrics: an ASGI middleware counting requests by method, route template and status."""

from __future__ import annotations

from coordinator.metrics import Metrics


class RequestMetrics:
    """Counts every HTTP request once it is answered (or fails). The route label is the matched
    route's template ("/v1/rounds/{round_id}"), never the raw path, so its values stay bounded."""

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
            self.metrics.request(scope["method"], getattr(route, "path", None), status["code"])
