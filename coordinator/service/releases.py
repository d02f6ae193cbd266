"""Safe releases: a committed version is a *candidate*; devices get it as their base only once released.

    candidate --server gate--> held | canary --canary round's federated metrics--> released | held

- **Server gate**: with held-out data (--eval-data), a candidate waits for its evaluation (no round
  opens meanwhile, so none trains on a stale base) and is held back when its accuracy is below the
  released version's by more than `release_tolerance`.
- **Canary** (`canary_fraction` > 0): the next round is a canary round on the candidate, open only to
  the devices whose id hashes into that fraction. Their `acc_before` (the candidate's accuracy on
  their own data, before training) is its federated evaluation; it is promoted when that is within
  the tolerance of the released version's, measured the same way on the latest rounds trained on it,
  and held back otherwise. The canary round's own result is superseded: the next round trains on the
  released version with the whole fleet.
- **Operator**: pin a version (candidates then wait for the unpin), roll back to a version.

The state (released, canary, pinned) is server_state "release" and every change adds a row to the
`releases` audit with who and why, in one transaction under the lifecycle lock, so every replica
sees the same release and a crash leaves either both or neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from coordinator.errors import Refused
from coordinator.store import Store, Writes

log = logging.getLogger("pocketfed.coordinator")

STATE_KEY = "release"
GATE = "release-gate"
FEDERATED_METRIC = "acc_before"  # what a device measures of its task's base on its own data
BASELINE_ROUNDS = 3  # the released version's federated accuracy: over its latest committed rounds


@dataclass(frozen=True)
class ReleaseState:
    released: int
    canary: int | None = None
    pinned: bool = False


def canary_device(device_id: str, fraction: float) -> bool:
    """Deterministic: the same devices are the canaries of every candidate (while the fraction holds)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")
    return h / 2.0**64 < fraction


class Releases:
    def __init__(
        self,
        store: Store,
        *,
        tolerance: float,
        canary_fraction: float,
        server_gate: bool,
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.tolerance, self.canary_fraction = store, tolerance, canary_fraction
        self.server_gate, self.clock = server_gate, clock  # server_gate: candidates wait for an evaluation

    # ------------------------------------------------------------------ reading

    def state(self) -> ReleaseState:
        raw = self.store.state(STATE_KEY)
        if raw is None:  # a database from before releases: its newest version is what devices had
            return ReleaseState(released=max(self.store.latest_version(), 0))
        return ReleaseState(**json.loads(raw))

    def released(self) -> int:
        return self.state().released

    def round_base(self) -> tuple[int, bool]:
        """(the base of the next round, whether it is a canary round)."""
        s = self.state()
        return (s.canary, True) if s.canary is not None else (s.released, False)

    def canary_goal(self, goal: int) -> int:
        return max(1, math.ceil(goal * self.canary_fraction - 1e-9))

    def admits(self, canary_round: bool, device_id: str) -> bool:
        """Whether the device may join a round: every device, except in a canary round."""
        return not canary_round or canary_device(device_id, self.canary_fraction)

    def status_of(self, state: ReleaseState, last_action: dict[int, str]) -> Callable[[int], str]:
        """version -> released | pinned | canary | candidate | held | superseded | rolled back | retired."""

        def status(version: int) -> str:
            if version == state.released:
                return "pinned" if state.pinned else "released"
            if version == state.canary:
                return "canary"
            action = last_action.get(version)
            if action is None:
                return "candidate" if version > state.released else "retired"
            if version > state.released and action in ("released", "promoted", "pinned"):
                return "rolled back"  # released once, then the operator went back to an older one
            return {"held": "held", "superseded": "superseded"}.get(action, "retired")

        return status

    def last_actions(self) -> dict[int, str]:
        """Each version's latest audit action."""
        out: dict[int, str] = {}
        for row in reversed(self.store.releases(10_000)):
            out[row.version] = row.action
        return out

    # ------------------------------------------------------------------ writing (under the lifecycle lock)

    def _record(self, tx: Writes, state: ReleaseState, version: int, action: str, actor: str, reason: str) -> None:
        tx.set_state(STATE_KEY, json.dumps(asdict(state)))
        tx.add_release(version, action, actor, reason, self.clock())
        log.info("release: v%d %s by %s: %s", version, action, actor, reason)

    def adopt(self) -> None:
        """Startup: the first release (the initial model, or an upgraded database's newest version)."""
        if self.store.state(STATE_KEY) is not None:
            return
        with self.store.lock, self.store.transaction() as tx:
            tx.own_lifecycle()
            if self.store.state(STATE_KEY) is None:
                s = self.state()
                why = "initial model" if s.released == 0 else "the newest version when releases began"
                self._record(tx, s, s.released, "released", "system", why)

    def release_now(self, tx: Writes, version: int, actor: str, reason: str) -> None:
        """Inside the registering transaction: an operator's published model is released at once."""
        s = self.state()
        self._record(tx, replace(s, released=version, canary=None), version, "released", actor, reason)

    def review(self) -> bool:
        """Decide on the newest undecided candidate; False while it waits for its server evaluation
        (no round should open before that, or it would train on the version being replaced)."""
        s = self.state()
        if s.pinned or s.canary is not None:
            return True
        pending = self._pending(s)
        if not pending:
            return True
        candidate = self.store.version(pending[-1])
        if self.server_gate and candidate.accuracy is None:
            return False
        with self.store.lock, self.store.transaction() as tx:
            tx.own_lifecycle()
            s = self.state()
            if s.pinned or s.canary is not None or pending != self._pending(s):
                return True  # another replica decided meanwhile
            for older in pending[:-1]:
                self._record(tx, s, older, "superseded", GATE, f"v{candidate.version} is newer")
            held = self._server_verdict(candidate.version, candidate.accuracy, s.released)
            if held is not None:
                self._record(tx, s, candidate.version, "held", GATE, held)
            elif self.canary_fraction > 0:
                why = f"server gate passed; canary on {self.canary_fraction:g} of devices"
                self._record(tx, replace(s, canary=candidate.version), candidate.version, "canary", GATE, why)
            else:
                why = "server gate passed" if self.server_gate else "no held-out data: released as committed"
                self._record(tx, replace(s, released=candidate.version), candidate.version, "released", GATE, why)
        return True

    def _pending(self, s: ReleaseState) -> list[int]:
        decided = self.store.decided_versions()
        latest = self.store.latest_version()
        return [v for v in range(s.released + 1, latest + 1) if v not in decided and v != s.canary]

    def _server_verdict(self, version: int, accuracy: float | None, released: int) -> str | None:
        """Why the candidate is held back by the server gate, or None when it passes."""
        base = self.store.version(released)
        if accuracy is None or base is None or base.accuracy is None:
            return None
        if accuracy < base.accuracy - self.tolerance:
            return (
                f"held-out accuracy {accuracy:.4f} is below released v{released}'s {base.accuracy:.4f} "
                f"by more than the tolerance {self.tolerance:g}"
            )
        return None

    def fail(self, version: int, why: str) -> None:
        """A candidate that could not be evaluated is held back (rounds go on from the released one)."""
        with self.store.lock, self.store.transaction() as tx:
            tx.own_lifecycle()
            s = self.state()
            if version in self._pending(s):
                self._record(tx, s, version, "held", GATE, f"server evaluation failed: {why}")

    def after_round(self, round_id: int, base_version: int, result_version: int | None) -> None:
        """A round closed: if it was the canary round of the current canary, promote or hold it back."""
        with self.store.lock, self.store.transaction() as tx:
            tx.own_lifecycle()
            s = self.state()
            if s.canary is None or base_version != s.canary:
                return
            if result_version is not None:
                why = f"trained in the canary round of v{s.canary}; the fleet trains on the released version"
                self._record(tx, s, result_version, "superseded", GATE, why)
            verdict = (
                self._canary_verdict(round_id, s)
                if result_version is not None
                else "held back: its canary round did not commit (too few canary devices before the deadline); "
                "metrics from fewer devices than a round needs decide nothing"
            )
            if verdict.startswith("held"):
                self._record(tx, replace(s, canary=None), s.canary, "held", GATE, verdict)
            else:
                self._record(tx, replace(s, released=s.canary, canary=None), s.canary, "promoted", GATE, verdict)

    def _canary_verdict(self, round_id: int, s: ReleaseState) -> str:
        measured = self.store.round_metric_mean([round_id], FEDERATED_METRIC)
        if measured is None:
            return "held back: its canary round gathered no federated metrics"
        fleet_rounds = self.store.committed_rounds_on(s.released, BASELINE_ROUNDS)
        baseline = self.store.round_metric_mean(fleet_rounds, FEDERATED_METRIC)
        got = f"federated accuracy {measured[0]:.4f} on {measured[1]} canary samples"
        if baseline is None:
            return f"promoted: {got}; released v{s.released} has no federated baseline"
        if measured[0] < baseline[0] - self.tolerance:
            return f"held back: {got}, below released v{s.released}'s {baseline[0]:.4f} by more than {self.tolerance:g}"
        return f"promoted: {got} vs released v{s.released}'s {baseline[0]:.4f}"

    # ------------------------------------------------------------------ the operator

    def set_released(self, version: int, *, action: str, actor: str, reason: str, pin: bool) -> ReleaseState:
        """Pin or roll back: `version` becomes the released one at once (the canary is cancelled)."""
        if self.store.version(version) is None:
            raise Refused(404, f"model version {version} does not exist", "unknown_model")
        with self.store.lock, self.store.transaction() as tx:
            tx.own_lifecycle()
            s = self.state()
            if s.canary is not None and s.canary != version:
                self._record(tx, replace(s, canary=None), s.canary, "held", actor, f"canary cancelled: {reason}")
            new = ReleaseState(released=version, canary=None, pinned=pin or (s.pinned and action != "rollback"))
            self._record(tx, new, version, action, actor, reason)
        return new

    def unpin(self, actor: str, reason: str) -> ReleaseState:
        with self.store.lock, self.store.transaction() as tx:
            tx.own_lifecycle()
            s = replace(self.state(), pinned=False)
            self._record(tx, s, s.released, "unpinned", actor, reason)
        return s
