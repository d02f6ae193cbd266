"""Built-in architectures, by name (what `pf-coordinator --model NAME` serves)."""

from __future__ import annotations

from collections.abc import Callable

from ..model import Model
from .lenet import build_lenet

ARCHITECTURES: dict[str, Callable[..., Model]] = {"lenet": build_lenet}


def build(name: str, seed: int = 0) -> Model:
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; built in: {sorted(ARCHITECTURES)}") from None
    return factory(seed=seed)


def build_model_bytes(name: str = "lenet", seed: int = 0) -> bytes:
    """A fresh model file for a built-in architecture."""
    from ..serialize.modelfile import dumps

    return dumps(build(name, seed))


__all__ = ["ARCHITECTURES", "build", "build_lenet", "build_model_bytes"]
