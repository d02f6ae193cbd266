"""Helpers for the secure-aggregation tests: real weight deltas (LeNet trained briefly on label-skewed
shards of the embedded Fashion-MNIST subset, one shard per device, all from the same base weights), a
seeded entropy source, and a step-by-step driver of the client and server sessions."""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from engine.data import load_default
from engine.models import build
from engine.optimizer import SGD
from engine.trainer import Trainer
from protocol.secagg import ClientSession, SecAggConfig, ServerSession, flatten
from protocol.secagg.quantize import to_field

LENET_SIZE = 61706


@lru_cache(maxsize=4)
def lenet_deltas(devices: int, steps: int = 2, batch: int = 16) -> tuple[np.ndarray, ...]:
    """`devices` flat float32 deltas (sorted tensor names), device i trained on its own shard."""
    data = load_default("train")
    order = np.argsort(data.labels, kind="stable")
    shards = np.array_split(order, devices)  # sorted by label: each device sees one or two classes
    trainer = Trainer(build("lenet", seed=0), optimizer=SGD(0.05, momentum=0.9), batch_size=batch)
    base = {k: v.copy() for k, v in trainer.get_weights().items()}
    rng = np.random.default_rng(0)
    out = []
    for shard in shards:
        trainer.set_weights(base)
        for _ in range(steps):
            x, y = data.get_batch(rng.choice(shard, batch))
            trainer.step(x, y)
        weights = trainer.get_weights()
        out.append(flatten({k: weights[k] - base[k] for k in base}).astype(np.float32))
    return tuple(out)


def entropy(seed: int):
    """A seeded stand-in for os.urandom, so a test's keys, seeds and nonces are reproducible."""
    return random.Random(seed).randbytes


def quantized_sum(config, inputs, survivors) -> np.ndarray:
    """sum of the devices' quantized inputs (deterministic rounding), modulo 2^32."""
    total = np.zeros(config.vector_length + 1, np.uint32)
    for i in survivors:
        ints, _ = config.quantizer.encode(inputs[i][0], inputs[i][1], np.random.default_rng(0))
        total += to_field(ints)
    return total


def start(config: SecAggConfig, seed: int = 0) -> tuple[ServerSession, dict[int, ClientSession]]:
    clients = {
        i: ClientSession(config.to_dict(), i, entropy=entropy(seed * 10_000 + i), rng=np.random.default_rng([seed, i]))
        for i in range(1, config.cohort_size + 1)
    }
    return ServerSession(config), clients


def run_phase(server, clients, outgoing, phase, inputs=None):
    """Every client in `clients` that got a message answers it; the server closes the phase."""
    for i, client in clients.items():
        if phase == "advertise":
            server.receive_advertise(client.advertise())
        elif i in outgoing and phase == "share_keys":
            server.receive_shares(client.share_keys(outgoing[i]))
        elif i in outgoing and phase == "masked_input":
            server.receive_masked(client.masked_input(outgoing[i], *inputs[i]))
        elif i in outgoing and phase == "unmask":
            server.receive_unmask(client.unmask(outgoing[i]))
    close = {
        "advertise": server.close_advertise,
        "share_keys": server.close_share_keys,
        "masked_input": server.close_masked_input,
        "unmask": server.finish,
    }
    return close[phase]()
