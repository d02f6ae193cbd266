"""FedDyn's device half (Acar et al. 2021; the server half is coordinator/strategies/feddyn.py).

A device k keeps a state g_k (zero at first) and trains on

    L_k(w) - <g_k, w> + alpha/2 ||w - base||^2

(the engine's FedProx term with mu = alpha, plus its linear term); after training it moves
g_k <- g_k - alpha * (w_trained - base). The new g_k is staged with the pending upload and adopted
only when the coordinator acknowledges that update (state.py), as the server's h only counts the
deltas it received. g_k lives in the state directory as a tensor container, never pickled.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.messages import Task


def trainer_options(task: Task, stored: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict:
    """The Trainer's objective terms for the task: FedDyn's (with the stored g), else FedProx's (if any)."""
    if task.feddyn_alpha > 0:
        return {"prox_mu": task.feddyn_alpha, "linear_term": current_g(stored, base)}
    return {"prox_mu": task.fedprox_mu}


def current_g(stored: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stored g for the base model's trainable weights; zero where it is missing or has another
    shape (a new model architecture starts FedDyn afresh)."""
    return {
        name: np.asarray(stored[name], np.float32)
        if name in stored and np.shape(stored[name]) == np.shape(w)
        else np.zeros(np.shape(w), np.float32)
        for name, w in base.items()
    }


def next_g(task: Task, stored: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict | None:
    """g - alpha * delta (delta = trained - base, before clipping or compression); None if not FedDyn."""
    if not task.feddyn_alpha > 0:
        return None
    g = current_g(stored, delta)
    return {
        name: np.asarray(g[name] - task.feddyn_alpha * np.asarray(d, np.float32), np.float32)
        for name, d in delta.items()
    }
