"""Liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from coordinator.deps import DbDep, ManagerDep, MetricsDep
from coordinator.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
def healthz(manager: ManagerDep) -> Health:
    r = manager.current_round()
    return Health(
        status="ok", model_version=manager.latest_version(), round_id=r["id"] if r else None, paused=manager.paused
    )


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(manager: ManagerDep, db: DbDep, counters: MetricsDep) -> PlainTextResponse:
    """Prometheus text exposition format, version 0.0.4."""
    manager.tick()
    r = manager.current_round()
    acc = db.query_one("SELECT accuracy FROM model_versions WHERE accuracy IS NOT NULL ORDER BY version DESC LIMIT 1")
    gauges = {
        "pf_current_round": r["id"] if r else 0,
        "pf_current_round_received": r["received"] if r else 0,
        "pf_model_version": manager.latest_version(),
        "pf_devices": db.query_one("SELECT COUNT(*) AS n FROM devices")["n"],
        "pf_paused": int(manager.paused),
    }
    if acc is not None:
        gauges["pf_model_accuracy"] = acc["accuracy"]
    spent = db.query_one("SELECT epsilon, dp_clip FROM rounds WHERE epsilon IS NOT NULL ORDER BY id DESC LIMIT 1")
    if spent is not None:
        gauges["pf_dp_epsilon"] = spent["epsilon"]
        gauges["pf_dp_clip_norm"] = spent["dp_clip"]
    if manager.round_settings.dp_enabled:
        gauges["pf_dp_budget_exhausted"] = int(manager.dp.budget_note is not None)
    from_db = {
        "pf_rounds_total": {
            (("status", s),): db.query_one("SELECT COUNT(*) AS n FROM rounds WHERE status=?", (s,))["n"]
            for s in ("committed", "abandoned")
        },
        "pf_updates_accepted_total": {(): db.query_one("SELECT COUNT(*) AS n FROM updates")["n"]},
        "pf_upload_commits_total": {(): manager.writer.groups},
        "pf_upload_commit_updates_total": {(): manager.writer.applied},
    }
    return PlainTextResponse(counters.render(gauges, from_db), media_type="text/plain; version=0.0.4")
