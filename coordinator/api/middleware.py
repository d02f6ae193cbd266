"""ASGI middleware: request metrics (by method, route template and status), and population routing."""

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


SPECIAL = {"dashboard": "/", "metrics": "/metrics", "healthz": "/healthz"}


def population_path(path: str) -> tuple[str, str] | None:
    """(population, the path it stands for) of a population's path, else None:
    `/v1/populations/{name}/<rest>` stands for `/v1/<rest>` (the dashboard, metrics and healthz for
    `/`, `/metrics`, `/healthz`), and `/populations/{name}/<anything>` for `/<anything>` -- a device
    agent whose server URL ends in /populations/{name} speaks to that population unchanged."""
    for prefix, whole in (("/v1/populations/", False), ("/populations/", True)):
        if path.startswith(prefix):
            name, slash, rest = path[len(prefix) :].partition("/")
            if not name or not (slash if whole else rest):
                return None
            return name, "/" + rest if whole else SPECIAL.get(rest, "/v1/" + rest)
    return None


class PopulationRouting:
    """Serves a population's paths (`population_path`) with the same routes, on its services: the
    path is rewritten and the name put in the scope, where api/deps.py picks the population's services."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            found = population_path(scope["path"])
            if found is not None:
                name, path = found
                scope = {**scope, "path": path, "raw_path": path.encode(), "pf_population": name}
        return await self.app(scope, receive, send)
