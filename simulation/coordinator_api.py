"""What the simulation driver reads from the coordinator: its public HTTP API, never its database.

    GET /healthz             the open round
    GET /v1/rounds/{id}      a round's status, goal, received updates, result version, epsilon
    GET /v1/models           each version's server-side evaluation (accuracy, loss)
    GET /v1/models/{v}       a version's file (needs a device or the admin token)

The driver talks to the coordinator directly, never through a chaos run's fault proxy. Requests
are idempotent GETs, retried on a dropped connection: a coordinator that chaos just restarted
leaves dead keep-alive connections behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from simulation.processes import SimulationError

RETRIES = 3
MAX_LISTING = 1000  # GET /v1/models?limit= accepts up to this


class CoordinatorAPI:
    """`alive` and `log_tail` come from the coordinator's process: a dead one fails fast, with its log."""

    def __init__(
        self,
        url: str,
        alive: Callable[[], bool] = lambda: True,
        log_tail: Callable[[], str] = lambda: "",
        admin_token: str | None = None,
    ):
        self.alive, self.log_tail = alive, log_tail
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.http = httpx.Client(base_url=url, timeout=30, headers=headers)

    def get(self, path: str, **params: object) -> httpx.Response:
        error: httpx.TransportError | None = None
        for attempt in range(RETRIES):
            try:
                return self.http.get(path, params=params or None)
            except httpx.TransportError as exc:
                error = exc
                time.sleep(0.2 * (attempt + 1))
        raise SimulationError(f"GET {path}: the coordinator does not answer ({error}):\n{self.log_tail()}") from error

    def get_json(self, path: str, **params: object) -> dict | list:
        response = self.get(path, **params)
        if response.status_code != 200:
            raise SimulationError(f"GET {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def open_round_id(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            round_id = self.get_json("/healthz")["round_id"]
            if round_id is not None:
                return int(round_id)
            time.sleep(0.1)
        raise SimulationError(f"the coordinator opened no round within {timeout:.0f}s (is it paused?)")

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) opening rounds; needs the admin token."""
        path = "/v1/admin/pause" if paused else "/v1/admin/resume"
        try:
            response = self.http.post(path)
        except httpx.TransportError as exc:
            raise SimulationError(f"POST {path}: the coordinator does not answer ({exc}):\n{self.log_tail()}") from exc
        if response.status_code != 200:
            raise SimulationError(f"POST {path}: {response.status_code} {response.text[:300]}")

    def round_detail(self, round_id: int) -> dict:
        return self.get_json(f"/v1/rounds/{round_id}")

    def evaluation(self, version: int, timeout: float = 300.0) -> dict:
        """The coordinator's server-side evaluation of `version` (it runs off the request path, so wait)."""
        deadline = time.monotonic() + timeout
        limit = 10  # newest first: the version just committed is at the top
        while time.monotonic() < deadline:
            listings = self.get_json("/v1/models", limit=limit)
            for listing in listings:
                if listing["version"] == version and listing["accuracy"] is not None:
                    return {"accuracy": float(listing["accuracy"]), "loss": float(listing["loss"])}
            if len(listings) == limit < MAX_LISTING and listings[-1]["version"] > version:
                limit = MAX_LISTING  # an older version: look further down
                continue
            if not self.alive():
                raise SimulationError(f"the coordinator exited while evaluating:\n{self.log_tail()}")
            time.sleep(0.1)
        raise SimulationError(f"model v{version} was not evaluated within {timeout:.0f}s")

    def model_file(self, version: int) -> bytes:
        response = self.get(f"/v1/models/{version}")
        if response.status_code != 200:
            raise SimulationError(f"GET /v1/models/{version}: {response.status_code} {response.text[:300]}")
        return response.content

    def close(self) -> None:
        self.http.close()
