"""The Python agent with one deliberate protocol violation, for testing that the conformance suite
catches each one: `python tests/broken_agent.py --break NAME run ...pf-agent arguments...`.

Each break is a small monkeypatch of the real agent, so everything else about it stays conforming.
"""

from __future__ import annotations

import sys
import time
import uuid

import device_agent.client as client_module
import device_agent.runner as runner_module
from device_agent.__main__ import main
from device_agent.state import AgentState
from protocol.messages import Task


def full_weights() -> None:
    """Send the trained weights instead of the delta."""
    original = runner_module.Agent.train_locally

    def train_locally(self, task, data):
        from engine.serialize.container import loads

        result = original(self, task, data)
        if result is None:
            return None
        delta, metrics = result
        base = loads(data).tensors
        return {n: base[n] + d for n, d in delta.items()}, metrics

    runner_module.Agent.train_locally = train_locally


def retry_4xx() -> None:
    """Treat a 409 or 422 like a 503."""
    client_module.PACED_STATUSES = frozenset({408, 429, 503, 409, 422})


def ignore_retry_after() -> None:
    """Come back after a short backoff, whatever the server asked."""
    client_module.parse_retry_after = lambda value, now=None: None
    client_module.RetryPolicy.paced = staticmethod(lambda seconds, rng: 0.2)


def forget_rounds() -> None:
    """Forget which rounds were finished: a task offered again is uploaded again."""
    AgentState.last_round = lambda self: None


def new_key_on_retry() -> None:
    """Send every upload attempt with a fresh Idempotency-Key."""
    original = client_module.CoordinatorClient._request

    def _request(self, method, path, **kwargs):
        if "Idempotency-Key" in (kwargs.get("headers") or {}):
            http_request = self._http.request

            def fresh_key(*args, **kw):
                kw["headers"] = {**kw["headers"], "Idempotency-Key": uuid.uuid4().hex}
                return http_request(*args, **kw)

            self._http.request = fresh_key
            try:
                return original(self, method, path, **kwargs)
            finally:
                self._http.request = http_request
        return original(self, method, path, **kwargs)

    client_module.CoordinatorClient._request = _request


def late_upload() -> None:
    """Ignore the task's deadline (train to the end, upload whenever done)."""
    original = Task.from_dict.__func__

    def from_dict(cls, data):
        return original(cls, {**data, "deadline": time.time() + 10**6})

    Task.from_dict = classmethod(from_dict)


def accept_corrupted() -> None:
    """Train on whatever model bytes arrive, without checking them against the ETag."""
    runner_module.model_problem = lambda data, etag: None


BREAKS = {f.__name__: f for f in (full_weights, retry_4xx, ignore_retry_after, forget_rounds)}
BREAKS |= {f.__name__: f for f in (new_key_on_retry, late_upload, accept_corrupted)}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--break" or sys.argv[2] not in BREAKS:
        sys.exit(f"usage: broken_agent.py --break {{{','.join(BREAKS)}}} run ...")
    BREAKS[sys.argv[2]]()
    sys.exit(main(sys.argv[3:]))
