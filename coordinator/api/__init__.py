"""The HTTP API (FastAPI): app.py builds the app, routers/ has one module per resource, deps.py
the dependencies (services, store, settings, who is calling), errors.py how refusals look, and
middleware.py the request metrics. Routers talk to services and the store, never to SQL."""

from coordinator.api.app import create_app

__all__ = ["create_app"]
