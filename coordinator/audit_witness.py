"""The audit's independent witness (coordinator/audit.py, `--uploads DIR`): what a fault proxy in front
of the coordinator recorded on the wire, so that "acknowledged" is checked against the network, not
against the database's own word."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


class Witness:
    """What the fault proxy recorded: update bodies by Idempotency-Key and the answers to them."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        log = self.dir / "uploads.jsonl"
        if not log.is_file():
            raise FileNotFoundError(f"--uploads {directory}: no uploads.jsonl in it")
        self.bodies: dict[str, set[str]] = {}  # key -> sha256 of bodies relayed whole
        self.tokens: dict[str, str] = {}  # key -> sha256 of the bearer token that sent it
        self.acks: Counter[str] = Counter()  # key -> number of 2xx answers
        self.ack_rounds: dict[str, set[int]] = {}
        self.undelivered = 0
        for number, line in enumerate(log.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                key = event["key"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{log}:{number}: not an upload event: {line[:80]!r}") from None
            if event.get("token_sha256"):
                self.tokens.setdefault(key, event["token_sha256"])
            if event["event"] == "forwarded":
                self.bodies.setdefault(key, set()).add(event["sha256"])
            elif event["event"] == "answered" and 200 <= int(event["status"]) < 300:
                self.acks[key] += 1
                self.ack_rounds.setdefault(key, set()).add(int(event["round_id"]))
                self.undelivered += not event.get("delivered", True)

    def body(self, key: str) -> bytes | None:
        shas = self.bodies.get(key)
        if not shas or len(shas) != 1:
            return None
        return (self.dir / "bodies" / f"{next(iter(shas))}.bin").read_bytes()
