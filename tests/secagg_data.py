"""Real weight deltas for the secure-aggregation tests: LeNet trained briefly on label-skewed shards
of the embedded Fashion-MNIST subset, one shard per device, all from the same base weights."""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np

from engine.data import load_default
from engine.models import build
from engine.optimizer import SGD
from engine.trainer import Trainer
from protocol.secagg import flatten

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
