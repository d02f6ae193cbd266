"""Everything the agent remembers between runs, in one directory.

A phone kills apps at will, so every file here is written atomically (a temp file
renamed over the old one): after a crash each file is either the old or the new
version, never half of one. Layout::

    identity.json        {"device_id", "token", "coordinator"}
    model.json           {"version", "sha256", "etag"}  - which cached model is current
    model.pfm            the cached base model file (verified against model.json's sha256)
    personal.pft         personal layers (container kind "personal", never uploaded)
    residual.pft         top-k error-feedback residual (container kind "residual")
    pending.json         {"round_id", "idempotency_key", "sha256", "deadline", "attempted", "record"} - an update
                         not yet acknowledged ("attempted": a send was started, so the server may hold it)
    pending.bin          its bytes
    pending-residual.pft the residual to adopt once the pending update is acknowledged
    feddyn.pft           FedDyn's g (container kind "feddyn"; device_agent/feddyn.py)
    pending-feddyn.pft   the g to adopt once the pending update is acknowledged
    progress.json        {"last_round": id} - the last round this device finished (uploaded or dropped)
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from engine.serialize.container import ContainerError, load, save, write_atomic


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None if absent or unreadable (treated as never written)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class AgentState:
    """Typed accessors over the state directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.dir / name

    # ------------------------------------------------------------------ identity

    def identity(self, coordinator: str) -> dict[str, Any] | None:
        ident = read_json(self._path("identity.json"))
        if not isinstance(ident, dict) or ident.get("coordinator") != coordinator or not ident.get("token"):
            return None  # enrolled elsewhere (or never): enroll again
        return ident

    def save_identity(self, coordinator: str, device_id: str, token: str, issued_at: float | None = None) -> None:
        ident = {"coordinator": coordinator, "device_id": device_id, "token": token, "issued_at": issued_at}
        write_json_atomic(self._path("identity.json"), ident)

    def forget_identity(self) -> None:
        self._path("identity.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ cached model

    def cached_model(self) -> tuple[int, str | None, bytes] | None:
        """(version, etag, bytes) of the cached base model, if present and intact."""
        info = read_json(self._path("model.json"))
        if not isinstance(info, dict):
            return None
        try:
            data = self._path("model.pfm").read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != info.get("sha256"):
            return None  # crashed between the two writes: the file belongs to another version
        return int(info["version"]), info.get("etag"), data

    def save_model(self, version: int, etag: str | None, data: bytes) -> None:
        write_atomic(self._path("model.pfm"), data)
        write_json_atomic(
            self._path("model.json"),
            {"version": int(version), "etag": etag, "sha256": hashlib.sha256(data).hexdigest()},
        )

    # ------------------------------------------------------------------ tensors kept on the device

    def _load_tensors(self, name: str, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        try:
            container = load(self._path(name), kind=kind)
        except (FileNotFoundError, ContainerError):
            return None
        return container.tensors, container.metadata

    def personal(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        return self._load_tensors("personal.pft", "personal")

    def save_personal(self, tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
        save(self._path("personal.pft"), tensors, metadata, kind="personal")

    def residual(self) -> dict[str, np.ndarray]:
        found = self._load_tensors("residual.pft", "residual")
        return found[0] if found else {}

    def feddyn(self) -> dict[str, np.ndarray]:
        """FedDyn's g: zero (empty) until a FedDyn round's update is acknowledged."""
        found = self._load_tensors("feddyn.pft", "feddyn")
        return found[0] if found else {}

    # ------------------------------------------------------------------ the pending upload

    def save_pending(
        self,
        round_id: int,
        body: bytes,
        residual: dict[str, np.ndarray] | None,
        record: dict[str, Any],
        deadline: float | None = None,
        feddyn: dict[str, np.ndarray] | None = None,
    ) -> str:
        """Persist an update before sending it, with the residual and FedDyn g to adopt once it is
        acknowledged; returns its idempotency key (new, random)."""
        key = uuid.uuid4().hex
        for name, kind, tensors in (("residual", "residual", residual), ("feddyn", "feddyn", feddyn)):
            if tensors is not None:
                save(self._path(f"pending-{name}.pft"), tensors, {"round_id": round_id}, kind=kind)
            else:
                self._path(f"pending-{name}.pft").unlink(missing_ok=True)
        write_atomic(self._path("pending.bin"), body)
        write_json_atomic(
            self._path("pending.json"),
            {
                "round_id": int(round_id),
                "idempotency_key": key,
                "sha256": hashlib.sha256(body).hexdigest(),
                "deadline": deadline,
                "attempted": False,
                "record": record,
            },
        )
        return key

    def mark_pending_attempted(self) -> None:
        """Record, before the first send, that the server may hold this update from now on."""
        info = read_json(self._path("pending.json"))
        if isinstance(info, dict) and not info.get("attempted"):
            write_json_atomic(self._path("pending.json"), {**info, "attempted": True})

    def pending(self) -> tuple[dict[str, Any], bytes] | None:
        """(info, body) of the update waiting for acknowledgement; None if there is none."""
        info = read_json(self._path("pending.json"))
        if not isinstance(info, dict):
            return None
        try:
            body = self._path("pending.bin").read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(body).hexdigest() != info.get("sha256"):
            return None
        return info, body

    def finish_pending(self, acknowledged: bool) -> None:
        """Acknowledged: adopt the new residual and FedDyn g. Either way the pending update is gone afterwards."""
        for name in ("residual", "feddyn"):
            staged = self._path(f"pending-{name}.pft")
            if acknowledged and staged.exists():
                os.replace(staged, self._path(f"{name}.pft"))
            staged.unlink(missing_ok=True)
        info = read_json(self._path("pending.json"))
        if isinstance(info, dict):  # record the round as done first: a kill after this line loses nothing
            self.set_last_round(int(info["round_id"]))
        self._path("pending.json").unlink(missing_ok=True)
        self._path("pending.bin").unlink(missing_ok=True)

    # ------------------------------------------------------------------ progress

    def last_round(self) -> int | None:
        progress = read_json(self._path("progress.json"))
        return progress.get("last_round") if isinstance(progress, dict) else None

    def set_last_round(self, round_id: int) -> None:
        write_json_atomic(self._path("progress.json"), {"last_round": int(round_id)})
