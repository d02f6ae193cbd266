"""The operator's dashboard in a real headless Chromium (Debian's `chromium`), rendered from a running
coordinator on a real port: its key elements are there, it refreshes itself, and the browser reports
no console error, exception or policy violation (the page carries a strict CSP of its own).

PF_DASHBOARD_SCREENSHOT=path writes the screenshot there too (docs/dashboard.png comes from a pf-sim
run instead: README, "The dashboard")."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from browser_helpers import Browser, chromium_binary

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import LENET_SHAPES, FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes
from coordinator.testing import tick as settle
from protocol.update import encode_update

KEY, ADMIN = "enroll-secret", "admin-secret"
PARTS = ("fleet-health", "devices-enrolled", "devices-active", "checkins", "dropout", "duration", "versions",
         "accuracy-chart", "releases", "privacy", "epsilon", "bytes", "model-size", "rounds", "released",
         "updated")  # fmt: skip


def populated(tmp_path: Path) -> tuple[object, ServerThread]:
    """A coordinator with devices, two committed rounds and an operator's rollback to show."""
    model = tmp_path / "base.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=1))
    settings = Settings(
        db=str(tmp_path / "coord.db"), model=str(model), goal=2, min_devices=1, over_select=1.5, enrollment_key=KEY,
        admin_token=ADMIN, tick_interval=0.05,
    )  # fmt: skip
    scores = iter([0.62, 0.71, 0.74, 0.75, 0.76])
    app = create_app(settings, clock=FakeClock(), evaluate=lambda data: {"accuracy": next(scores), "loss": 1, "n": 50})
    return app, ServerThread(app)


def run_round(app, devices: list[TestDevice]) -> None:
    for i, device in enumerate(devices):
        task = device.task()
        body = encode_update(
            random_delta(LENET_SHAPES, seed=i), sample_count=10, round_id=task["round_id"],
            base_version=task["base_version"], metrics={"loss": 0.5, "acc_before": 0.6},
        )  # fmt: skip
        assert device.upload(task["round_id"], body).status_code == 202
    app.state.services.evaluator.wait_idle()
    settle(app)


def test_the_dashboard_renders_and_refreshes_in_chromium_without_errors(tmp_path):
    chromium_binary()  # skips, saying how to install it, when there is none
    app, serving = populated(tmp_path)
    with serving as server, httpx.Client(base_url=server.url, timeout=30) as client:
        devices = [TestDevice(client, KEY, f"phone-{i}") for i in range(3)]
        run_round(app, devices[:2])
        run_round(app, devices[1:])
        change = {"version": 1, "reason": "v2 regressed on older phones", "by": "operator"}
        assert client.post("/v1/admin/rollback", json=change, headers={"Authorization": f"Bearer {ADMIN}"}).is_success

        page = client.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]  # enforced by the browser below
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        with Browser(tmp_path / "profile") as browser:
            session = browser.page(f"{server.url}/?refresh=1")
            found = browser.evaluate(session, f"{list(PARTS)!r}.filter(id => !document.getElementById(id))")
            assert found == [], f"missing elements: {found}"
            text = browser.evaluate(session, "document.body.innerText")
            assert "rollback" in text and "v2 regressed on older phones" in text and "operator" in text
            assert "rolled back" in browser.evaluate(session, "document.getElementById('versions').innerText")
            assert browser.evaluate(session, "document.getElementById('devices-enrolled').innerText").startswith(
                "devices enrolled\n3"
            )
            assert browser.evaluate(session, "document.getElementById('released').innerText") == "v1"
            assert browser.evaluate(session, "getComputedStyle(document.body).fontFamily").startswith("system-ui")

            # it refreshes itself: the content element is replaced by a fresh one (refresh=1 s)
            browser.evaluate(session, "document.getElementById('content').dataset.mark = 'old'")
            browser.pump(2.5)
            assert browser.evaluate(session, "document.getElementById('content').dataset.mark || 'fresh'") == "fresh"
            assert browser.evaluate(session, "document.body.getAttribute('data-stale')") is None

            population = browser.page(f"{server.url}/v1/populations/default/dashboard")
            assert browser.evaluate(population, "!!document.getElementById('fleet-health')")
            assert browser.errors() == []
            browser.screenshot(session, tmp_path / "dashboard.png")
            assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("PF_DASHBOARD_SCREENSHOT"):
                browser.screenshot(session, Path(os.environ["PF_DASHBOARD_SCREENSHOT"]))
