"""The dashboard end to end: a real worker (web on) fed by real torch training runs, driven in headless
Chromium. The runs page marks the failing run, its run page draws the loss chart with the alert's
marker, the stop button writes a control event; screenshots land in the test's tmp directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from detectors.events import decode_control_event
from stream_app.broker import free_port
from tests.browser import browser, open_page  # noqa: F401 — the fixture
from tests.conftest import ROOT, read_topic

pytestmark = pytest.mark.slow

RED_PIXELS = """sel => {
    const canvas = document.querySelector(sel);
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let red = 0;
    for (let i = 0; i < data.length; i += 4)
        if (data[i] > 180 && data[i + 1] < 80 && data[i + 2] < 80) red++;
    return red;
}"""


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_dashboard_shows_the_sick_run_and_its_alert_on_the_loss_chart(browser, topics, start_worker,  # noqa: F811
                                                                     tmp_path):
    web_port = free_port()
    worker = start_worker({"LOSSGUARD_WEB_ENABLED": "true", "LOSSGUARD_WEB_PORT": str(web_port)})
    base = f"http://127.0.0.1:{web_port}"
    runs = {"dash-healthy": "healthy", "dash-nan": "nan"}
    trainers = [subprocess.Popen([sys.executable, "-m", "stream_app.demo_train", "--run-id", run_id,
                                  "--scenario", scenario, "--steps", "150"], cwd=ROOT, env=topics.env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for run_id, scenario in runs.items()]
    for trainer in trainers:
        out = trainer.communicate(timeout=180)[0].decode()
        assert trainer.returncode == 0, out[-2000:]

    deadline = time.monotonic() + 90
    rows: dict[str, dict] = {}
    while time.monotonic() < deadline:
        try:
            rows = {r["run_id"]: r for r in _get(f"{base}/lossguard/api/runs")}
        except OSError:
            rows = {}  # the web server is still starting
        if set(rows) == set(runs) and rows["dash-nan"]["health"] == "critical" \
                and all(r["last_step"] == 149 and r["status"] == "finished" for r in rows.values()):
            break
        time.sleep(1.0)
    assert set(rows) == set(runs), f"runs seen by the dashboard: {list(rows)}\n{worker.log()[-3000:]}"
    assert rows["dash-nan"]["health"] == "critical" and rows["dash-nan"]["open_alerts"]["critical"] >= 1
    assert {r["status"] for r in rows.values()} == {"finished"}  # the reporters said their last word
    assert rows["dash-healthy"]["health"] in ("ok", "low", "medium")

    errors: list[str] = []
    page = open_page(browser, f"{base}/", errors)
    page.wait_for_selector("tr[data-run='dash-nan'][data-health='critical']", timeout=15000)
    assert page.get_attribute("tr[data-run='dash-nan']", "class") == "sick-critical"
    assert "nonfinite" in page.inner_text("tr[data-run='dash-nan'] .c-latest")
    assert page.get_attribute("tr[data-run='dash-healthy']", "data-health") != "critical"
    page.screenshot(path=str(tmp_path / "runs.png"), full_page=True)

    page.click("tr[data-run='dash-nan'] a")
    page.wait_for_selector(".lg-chart[data-metric='loss'] canvas", timeout=15000)
    page.wait_for_timeout(300)
    assert page.evaluate(RED_PIXELS, ".lg-chart[data-metric='loss'] canvas") > 50, \
        "the critical alert's marker is not drawn on the loss chart"
    assert "nonfinite_metric" in page.inner_text("#timeline")
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    page.once("dialog", lambda dialog: dialog.accept("diverged, stopping from the test"))
    page.click("#stop")
    page.wait_for_selector("#stop[disabled]", timeout=15000)
    events = [decode_control_event(r.value) for r in read_topic(topics.bootstrap, topics.name("control"),
                                                                topics.partitions, timeout=1.0)]
    assert [(e.run_id, e.action, e.reason) for e in events] == [("dash-nan", "stop", "diverged, stopping from the test")]
    assert errors == [], errors

    # a second worker of the app owns other partitions, and its dashboard still shows every run
    other_port = free_port()
    start_worker({"LOSSGUARD_WEB_ENABLED": "true", "LOSSGUARD_WEB_PORT": str(other_port)})
    deadline = time.monotonic() + 90
    seen: set[str] = set()
    while time.monotonic() < deadline and seen != set(runs):
        try:
            seen = {r["run_id"] for r in _get(f"http://127.0.0.1:{other_port}/lossguard/api/runs")}
        except OSError:
            pass
        time.sleep(1.0)
    assert seen == set(runs)
