"""Client-level differential privacy on the server: DP-FedAvg with an RDP accountant.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):

1. every accepted update's delta is clipped to L2 norm C and counts with weight 1 (a device's
   sample count would leak through the weights and unbound the sensitivity);
2. the round's mean of clipped deltas gets Gaussian noise of std z * C / n (z = noise multiplier,
   n = updates in the round), i.e. noise z * C on their sum.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"):
C follows a target quantile gamma of the update norms. Each round counts the updates whose norm was
<= C, noises that count with std sigma_b, and moves C geometrically:
C <- C * exp(-lr * (b~ - gamma)), b~ = (count + N(0, sigma_b^2)) / n. The count is a second query on
the same devices, so the delta noise is raised to z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) and the
pair costs exactly what one Gaussian query with multiplier z costs.

Accounting: each committed round is a Poisson-subsampled Gaussian mechanism with sampling rate
q = goal / population and multiplier z, composed with the `dp-accounting` package's RDP accountant
(the `dp` extra); epsilon at `dp_delta` is stored per round.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.strategies.base import Weights

if TYPE_CHECKING:
    from coordinator.settings import RoundSettings
    from coordinator.storage import Database

log = logging.getLogger("pocketfed.coordinator")


def require_accountant() -> None:
    """Fail early (at startup or on a settings change) when DP is on and dp-accounting is missing."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"dp_noise_multiplier > 0 needs the dp-accounting package: pip install 'pocketfed[dp]' ({exc})"
        ) from None


def epsilon(rounds: Iterable[tuple[float, float]], delta: float) -> float:
    """Epsilon at `delta` after composing one Poisson-subsampled Gaussian per (q, z) round."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    for q, z in rounds:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(float(q), dp_accounting.GaussianDpEvent(float(z))))
    return float(accountant.get_epsilon(float(delta)))


def count_stddev(configured: float | None, goal: int, z: float) -> float:
    """sigma_b: as configured, else the paper's expected-cohort / 20, raised to z so that the
    split of the privacy cost between count and delta stays possible."""
    return float(configured) if configured is not None else max(goal / 20.0, z)


def delta_noise_multiplier(z: float, adaptive: bool, sigma_b: float) -> float:
    """The multiplier actually used on the delta: z, or z_delta when the count also spends budget."""
    if not adaptive:
        return z
    rest = z**-2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: dp_count_stddev {sigma_b:g} must exceed dp_noise_multiplier/2 "
            f"= {z / 2:g}, or no budget is left for the delta"
        )
    return rest**-0.5


def noised_mean(
    mean: Mapping[str, np.ndarray], n: int, clip_norm: float, multiplier: float, rng: np.random.Generator
) -> Weights:
    """The mean of n clipped deltas plus N(0, (multiplier * clip_norm / n)^2) on every coordinate."""
    std = multiplier * clip_norm / max(n, 1)
    return {k: np.asarray(v, np.float64) + rng.normal(0.0, std, size=np.shape(v)) for k, v in mean.items()}


def next_clip(
    clip_norm: float,
    unclipped: int,
    n: int,
    *,
    target_quantile: float,
    lr: float,
    sigma_b: float,
    rng: np.random.Generator,
) -> float:
    """Andrew et al.'s geometric update of C from the noised fraction of unclipped updates."""
    fraction = (unclipped + rng.normal(0.0, sigma_b)) / max(n, 1)
    return float(clip_norm * math.exp(-lr * (fraction - target_quantile)))


class PrivacyLedger:
    """The DP side of the round manager: C and q for a new round, the budget check, and the noise,
    next C and epsilon written with a round's commit. Rounds carry (dp_clip, dp_q, dp_noise, epsilon)."""

    def __init__(self, db: Database):
        self.db = db
        self._epsilon_memo: dict[tuple, float] = {}
        self.budget_note: str | None = None  # why no round opens, for devices and operators

    def clip_for(self, cfg: RoundSettings) -> float:
        """C for a new round: the adapted one carried in server_state, else the configured one."""
        row = self.db.query_one("SELECT value FROM server_state WHERE key='dp_clip'")
        return float(row["value"]) if cfg.dp_adaptive_clip and row else cfg.dp_clip_norm

    def sampling_rate(self, cfg: RoundSettings) -> float:
        population = cfg.dp_population or self.db.query_one("SELECT COUNT(*) AS n FROM devices")["n"]
        return min(1.0, cfg.goal / max(population, cfg.goal))

    def rng(self, round_id: int) -> np.random.Generator:
        """Noise drawn from a stored secret seed and the round id: a commit redone after a crash
        publishes the same weights."""
        row = self.db.query_one("SELECT value FROM server_state WHERE key='dp_seed'")
        if row is None:
            with self.db.transaction() as cur:
                cur.execute("INSERT INTO server_state(key, value) VALUES ('dp_seed', ?)", (str(secrets.randbits(63)),))
            row = self.db.query_one("SELECT value FROM server_state WHERE key='dp_seed'")
        return np.random.default_rng([int(row["value"]), round_id])

    def epsilon(self, events: list[tuple[float, float]], delta: float) -> float:
        key = (tuple(events), delta)
        if key not in self._epsilon_memo:
            self._epsilon_memo[key] = epsilon(events, delta)
        return self._epsilon_memo[key]

    def events(self) -> list[tuple[float, float]]:
        rows = self.db.query(
            "SELECT dp_q, dp_noise FROM rounds WHERE status='committed' AND dp_q IS NOT NULL ORDER BY id"
        )
        return [(float(r["dp_q"]), float(r["dp_noise"])) for r in rows]

    def budget_allows(self, cfg: RoundSettings) -> bool:
        """Open a round only if epsilon after it stays within the budget (or warn, as configured)."""
        if not cfg.dp_enabled or cfg.dp_epsilon_budget is None:
            self.budget_note = None
            return True
        events = self.events() + [(self.sampling_rate(cfg), cfg.dp_noise_multiplier)]
        eps = self.epsilon(events, cfg.dp_delta)
        if eps <= cfg.dp_epsilon_budget:
            self.budget_note = None
            return True
        note = (
            f"privacy budget: round {len(events)} would bring epsilon to {eps:.4g} > budget "
            f"{cfg.dp_epsilon_budget:g} (delta {cfg.dp_delta:g})"
        )
        if cfg.dp_on_budget == "warn":
            log.warning("%s; opening it anyway (dp_on_budget=warn)", note)
            self.budget_note = note + "; going on (dp_on_budget=warn)"
            return True
        if self.budget_note != note:
            log.warning("%s; no more rounds open (dp_on_budget=stop)", note)
        self.budget_note = note
        return False

    def privatize(self, r: dict, config: dict, mean: dict, n: int) -> tuple[dict, list[tuple[str, Any]]]:
        """DP-FedAvg noise on a round's mean of clipped deltas, the next adaptive C, and epsilon."""
        rng = self.rng(r["id"])
        z, clip_norm = float(r["dp_noise"]), float(r["dp_clip"])
        sigma_b = count_stddev(config.get("dp_count_stddev"), r["goal"], z)
        adaptive = bool(config.get("dp_adaptive_clip"))
        noised = noised_mean(mean, n, clip_norm, delta_noise_multiplier(z, adaptive, sigma_b), rng)
        writes: list[tuple[str, Any]] = []
        if adaptive:
            unclipped = self.db.query_one(
                "SELECT COUNT(*) AS n FROM updates WHERE round_id=? AND norm<=?", (r["id"], clip_norm)
            )["n"]
            new_clip = next_clip(
                clip_norm,
                unclipped,
                n,
                target_quantile=config["dp_target_quantile"],
                lr=config["dp_clip_lr"],
                sigma_b=sigma_b,
                rng=rng,
            )
            writes.append(("INSERT OR REPLACE INTO server_state(key, value) VALUES ('dp_clip', ?)", (repr(new_clip),)))
        eps = self.epsilon(self.events() + [(float(r["dp_q"]), z)], config["dp_delta"])
        writes.append(("UPDATE rounds SET epsilon=? WHERE id=?", (eps, r["id"])))
        return noised, writes
