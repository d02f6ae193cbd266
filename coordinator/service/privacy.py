"""The privacy ledger: what client-level DP (strategies/dp.py) costs, round by round, and the budget.

Accounting: each committed round is a Poisson-subsampled Gaussian mechanism with sampling rate
q = goal / population and multiplier z -- which holds because check-in admits each device to a DP
round with probability q, independently (`admitted`; dp_sampling="poisson"); with
dp_sampling="unamplified" devices are taken first come, first served and rounds are charged with q = 1
(no amplification by sampling). Secure-aggregation rounds charge the Gaussian z that bounds the
devices' summed Skellam noise (service/secagg.py). Rounds are composed with the `dp-accounting` package's RDP accountant
(the `dp` extra); epsilon at `dp_delta` is stored per round. Rounds carry their (dp_clip, dp_q,
dp_noise, epsilon); the adapted clip C and the noise seed live in server_state.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable

from coordinator.settings import RoundSettings
from coordinator.store import RoundRow, Store, Writes

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


class PrivacyLedger:
    """C and q for a new round, the budget check, the noise seed, and epsilon when a round commits."""

    def __init__(self, store: Store):
        self.store = store
        self._epsilon_memo: dict[tuple, float] = {}
        self._seed: int | None = None
        self.budget_note: str | None = None  # why no round opens, for devices and operators

    def clip_for(self, cfg: RoundSettings) -> float:
        """C for a new round: the adapted one carried in server_state, else the configured one."""
        stored = self.store.state("dp_clip")
        return float(stored.decode()) if cfg.dp_adaptive_clip and stored else cfg.dp_clip_norm

    def sampling_rate(self, cfg: RoundSettings) -> float:
        """q the accountant charges: goal / population with Poisson admission, else 1 (no amplification)."""
        if cfg.dp_sampling == "unamplified":
            return 1.0
        population = cfg.dp_population or self.store.count_devices()
        return min(1.0, cfg.goal / max(population, cfg.goal))

    def admitted(self, r: RoundRow, device_id: str) -> bool:
        """Poisson sampling: a device is admitted to a DP round with probability q, independently of
        the others, decided once per (round, device) by a keyed hash (asking again changes nothing)."""
        if r.dp_q is None or r.dp_q >= 1.0:
            return True
        key = str(self.seed(r.id)[0]).encode()
        draw = hmac.new(key, f"{r.id}:{device_id}".encode(), hashlib.sha256).digest()
        return int.from_bytes(draw[:8], "big") / 2**64 < r.dp_q

    def seed(self, round_id: int) -> list[int]:
        """The noise seed of a round: a stored secret and the round id, so a commit redone after a
        crash publishes the same weights."""
        if self._seed is None:
            stored = self.store.state("dp_seed")
            if stored is None:
                with self.store.transaction() as tx:
                    tx.add_state_if_missing("dp_seed", str(secrets.randbits(63)))
                stored = self.store.state("dp_seed")
            self._seed = int(stored.decode())
        return [self._seed, round_id]

    def epsilon(self, events: list[tuple[float, float]], delta: float) -> float:
        key = (tuple(events), delta)
        if key not in self._epsilon_memo:
            self._epsilon_memo[key] = epsilon(events, delta)
        return self._epsilon_memo[key]

    def budget_allows(self, cfg: RoundSettings) -> bool:
        """Open a round only if epsilon after it stays within the budget (or warn, as configured)."""
        if not cfg.dp_enabled or cfg.dp_epsilon_budget is None:
            self.budget_note = None
            return True
        events = self.store.dp_events() + [(self.sampling_rate(cfg), cfg.dp_noise_multiplier)]
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

    def spend(self, r: RoundRow, next_clip_norm: float | None):
        """What a DP round's commit writes, computed now (before its transaction): epsilon after it,
        and the adapted C for the next round. Returns the writes to run inside the commit."""
        eps = self.epsilon(self.store.dp_events() + [(float(r.dp_q), float(r.dp_noise))], r.config.dp_delta)

        def write(tx: Writes) -> None:
            tx.set_epsilon(r.id, eps)
            if next_clip_norm is not None:
                tx.set_state("dp_clip", repr(next_clip_norm))

        return write
