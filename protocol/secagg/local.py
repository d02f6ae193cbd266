"""A whole round in one process: every device's session and the server's, with JSON in between.

For tests, benchmarks and as a reference for the transport: every message goes through
`json.dumps`/`json.loads` (the masked vector as its binary frame), so what works here is
serializable, and the bytes each device sends and receives are counted as they would travel
(without HTTP framing). Devices can vanish after any phase; with `persist=True` the server and
every device are saved with `to_bytes` and restored with `from_bytes` between phases, as a
coordinator or a device restarted mid-round would be.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from protocol.secagg.client import ClientSession
from protocol.secagg.params import SecAggConfig
from protocol.secagg.server import AggregateResult, ServerSession
from protocol.secagg.wire import RoundAbandoned

DROP_POINTS = ("setup", "advertise", "share_keys", "masked_input")  # vanish after this phase


@dataclass
class RoundTrace:
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    client_cpu: dict[int, float] = field(default_factory=dict)
    server_cpu: float = 0.0
    sent: dict[int, list[bytes]] = field(default_factory=dict)  # every byte string a device sent, in order


def _wire(message: object) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message, separators=(",", ":")).encode()


def run_round(
    config: SecAggConfig,
    inputs: Mapping[int, tuple[np.ndarray, int]],
    *,
    drop_after: Mapping[str, Iterable[int]] | None = None,
    persist: bool = False,
    entropy: Callable[[int], bytes] = os.urandom,
    seed: int = 0,
) -> tuple[AggregateResult | RoundAbandoned, RoundTrace]:
    """Run a round for devices 1..n; `inputs[i]` = (flat delta, sample count).

    Returns the aggregate (or the RoundAbandoned that ended the round) and the per-device trace."""
    drop_after = {phase: set(devices) for phase, devices in (drop_after or {}).items()}
    unknown = set(drop_after) - set(DROP_POINTS)
    if unknown:
        raise ValueError(f"drop_after: unknown phases {sorted(unknown)}; use {DROP_POINTS}")
    n = config.cohort_size
    trace = RoundTrace()
    setup = _wire(config.to_dict())
    server = ServerSession(config)
    clients: dict[int, ClientSession] = {}
    for i in range(1, n + 1):
        trace.bytes_down[i], trace.bytes_up[i], trace.client_cpu[i], trace.sent[i] = len(setup), 0, 0.0, []
        start = time.process_time()
        clients[i] = ClientSession(json.loads(setup), i, entropy=entropy, rng=np.random.default_rng([seed, i]))
        trace.client_cpu[i] += time.process_time() - start

    def leave(phase: str) -> None:
        for i in drop_after.get(phase, ()):
            clients.pop(i, None)

    def device_step(i: int, incoming: object, call: Callable[[ClientSession], object]) -> object:
        if incoming is not None:
            trace.bytes_down[i] += len(_wire(incoming))
        start = time.process_time()
        out = call(clients[i])
        trace.client_cpu[i] += time.process_time() - start
        raw = _wire(out)
        trace.bytes_up[i] += len(raw)
        trace.sent[i].append(raw)
        return out if isinstance(out, bytes) else json.loads(raw)

    def server_step(call: Callable[[], object]) -> object:
        nonlocal server
        start = time.process_time()
        if persist:
            server = ServerSession.from_bytes(server.to_bytes())
        out = call()
        trace.server_cpu += time.process_time() - start
        return out

    def restart_devices() -> None:
        if persist:
            for i, session in clients.items():
                clients[i] = ClientSession.from_bytes(session.to_bytes(), entropy=entropy)

    # (devices that leave after it, device call, server method receiving it, server method closing it)
    phases: list[tuple[str, Callable, str, str]] = [
        ("setup", lambda c, m: c.advertise(), "receive_advertise", "close_advertise"),
        ("advertise", lambda c, m: c.share_keys(m), "receive_shares", "close_share_keys"),
        ("share_keys", lambda c, m: c.masked_input(m, *inputs[c.index]), "receive_masked", "close_masked_input"),
        ("masked_input", lambda c, m: c.unmask(m), "receive_unmask", "finish"),
    ]
    outgoing: dict[int, object] = {i: None for i in clients}
    try:
        for before, device_call, receive, close in phases:
            leave(before)
            restart_devices()
            for i in sorted(set(clients) & set(outgoing)):  # a device the server dropped gets nothing more
                message = device_step(i, outgoing[i], lambda c, m=outgoing[i], call=device_call: call(c, m))
                server_step(lambda msg=message, receive=receive: getattr(server, receive)(msg))
            result = server_step(lambda close=close: getattr(server, close)())
            if close != "finish":
                outgoing = dict(result)
        return result, trace
    except RoundAbandoned as abandoned:
        return abandoned, trace
