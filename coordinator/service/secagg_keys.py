"""Key advertisement folded into the cohort join: one request and one phase fewer per device.

A device may send its two public keys (protocol/secagg phase 1, `advertise`) with its join
(`POST .../secagg/join` body `{"mask_key", "share_key"}`, base64 of 32 bytes each): the keys do not
depend on its index or on the round's config, so nothing is lost by sending them before the cohort
is fixed. The coordinator writes the advertise message the device would have sent (its index is
its place in the join order, known at the join) in the join's own transaction, and when the cohort
is fixed it feeds every such message to the new ServerSession; if every member's keys came this way
the advertise phase closes at once and the members' first answer is already their neighbours' keys.
A device that joins without keys (an older agent) advertises as before, and the phase waits for it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from coordinator.errors import Refused

log = logging.getLogger("pocketfed.coordinator")

KEY_FIELDS = ("mask_key", "share_key")


def joined_keys(body: Any) -> dict[str, str] | None:
    """The public keys a join carries (None without), checked: two distinct 32-byte base64 keys."""
    from protocol.secagg import SecAggError
    from protocol.secagg.wire import unb64

    if body is None:
        return None
    if not isinstance(body, dict) or set(body) - set(KEY_FIELDS):
        raise Refused(422, f"join: the body may carry only {' and '.join(KEY_FIELDS)}", "bad_secagg_message")
    if not body:
        return None
    try:
        raw = [unb64(body.get(name), f"join {name}", 32) for name in KEY_FIELDS]
    except SecAggError as exc:
        raise Refused(422, str(exc), "bad_secagg_message") from None
    if raw[0] == raw[1]:
        raise Refused(422, "join: the mask and share keys must differ", "bad_secagg_message")
    return {name: body[name] for name in KEY_FIELDS}


def advertise_message(round_id: int, index: int, keys: dict[str, str]) -> bytes:
    """The advertise message of device `index`, as it would have sent it (stored as such)."""
    message = {"type": "advertise", "round_id": round_id, "index": index, **keys}
    return json.dumps(message, separators=(",", ":")).encode()


def fold_joined_keys(session, messages: list[tuple[int, str, bytes]]) -> None:
    """Feed the keys that came with the joins to a new session; close the advertise phase if all did.
    A message the session refuses (a key another member advertised too) leaves that device to
    advertise by itself, as if it had joined without keys. RoundAbandoned propagates."""
    from protocol.secagg import SecAggError

    for _, kind, body in messages:
        if kind != "advertise":
            continue
        try:
            session.receive_advertise(json.loads(body))
        except SecAggError as exc:
            log.info("round %d: keys sent with a join refused: %s", session.config.round_id, exc)
    if session.phase == "advertise" and not session.waiting_for():
        session.close_advertise()
