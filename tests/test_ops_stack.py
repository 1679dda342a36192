"""The ops stack people already run: the worker's and ``lossguard sinks``' Prometheus ``/metrics`` parsed by
prometheus_client's own parser, and the ``alertmanager`` sink against a real Alertmanager (Debian's
``prometheus-alertmanager``, started here on 127.0.0.1)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from detectors import Alert, MetricEvent
from stream_app.broker import free_port
from tests.conftest import ROOT, collect_alerts

pytestmark = pytest.mark.slow

ALERTMANAGER_CONFIG = """
route:
  receiver: blackhole
  group_wait: 1s
receivers:
  - name: blackhole
"""


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read()


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, name: str, sample: str, **labels: str) -> float:
    family = families[name]
    return sum(s.value for s in family.samples if s.name == sample and all(s.labels.get(k) == v
                                                                          for k, v in labels.items()))


def test_worker_serves_prometheus_metrics(topics, start_worker):
    web_port = free_port()
    start_worker({"LOSSGUARD_WEB_ENABLED": "true", "LOSSGUARD_WEB_PORT": str(web_port)})
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    for step in range(40):
        loss = float("nan") if step == 30 else 2.0 - step / 100
        event = MetricEvent("prom-run", step, {"loss": loss}, ts=1000.0 + step)
        producer.send(topics.name("metrics"), key=b"prom-run", value=event.to_json())
    producer.send(topics.name("metrics"), key=b"prom-run", value=b"{not json")  # a dead letter
    producer.flush()
    producer.close()
    collect_alerts(topics, lambda al: any(a.alert_type == "nonfinite_metric" for a in al), timeout=60)

    deadline = time.monotonic() + 30
    families: dict = {}
    while time.monotonic() < deadline:
        try:
            families = _families(_get(f"http://127.0.0.1:{web_port}/metrics").decode())
        except OSError:
            families = {}
        if families and _value(families, "lossguard_dead_letters", "lossguard_dead_letters_total") >= 1 \
                and _value(families, "lossguard_events_processed", "lossguard_events_processed_total") >= 40 \
                and _value(families, "lossguard_runs_tracked", "lossguard_runs_tracked") >= 1:  # state saved
            break
        time.sleep(0.5)
    assert _value(families, "lossguard_records_processed", "lossguard_records_processed_total") == 41
    assert _value(families, "lossguard_events_processed", "lossguard_events_processed_total") == 40
    assert _value(families, "lossguard_alerts", "lossguard_alerts_total", alert_type="nonfinite_metric",
                  severity="critical", status="firing") == 1
    assert _value(families, "lossguard_dead_letters", "lossguard_dead_letters_total") == 1
    assert _value(families, "lossguard_processing_latency_seconds", "lossguard_processing_latency_seconds_count") == 40  # not the dead letter
    assert _value(families, "lossguard_runs_tracked", "lossguard_runs_tracked") == 1
    lag = families["lossguard_consumer_lag"]
    partitions = {s.labels["partition"] for s in lag.samples if s.labels["topic"] == topics.name("metrics")}
    assert partitions == {str(p) for p in range(topics.partitions)}  # this worker owns them all
    assert all(s.value >= 0 for s in lag.samples)


@pytest.fixture
def alertmanager(tmp_path: Path):
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.skip("no Alertmanager installed (apt-get install -y prometheus-alertmanager; .ci/run does it)")
    port = free_port()
    config = tmp_path / "alertmanager.yml"
    config.write_text(ALERTMANAGER_CONFIG)
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            _get(f"{url}/-/ready")
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()
            time.sleep(0.2)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _am_alerts(url: str) -> list[dict]:
    return json.loads(_get(f"{url}/api/v2/alerts?active=true&silenced=true&inhibited=true"))


def test_alertmanager_sink_fires_resends_and_resolves(topics, alertmanager, tmp_path):
    routes = tmp_path / "routes.toml"
    routes.write_text(f'[sinks.am]\nkind = "alertmanager"\nurl = "{alertmanager}"\nresend_s = 1\n\n'
                      '[[routes]]\nsinks = ["am"]\n')
    metrics_port = free_port()
    sinks = subprocess.Popen([sys.executable, "-m", "stream_app", "sinks", "--routes", str(routes),
                              "--metrics-port", str(metrics_port), "--timeout", "60"],
                             cwd=ROOT, env=topics.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        firing = Alert.new(run_id="am-run", step=12, detector="gradient", category="gradient",
                           alert_type="gradient_explosion", severity="critical", message="grad norm 1e4 > 10",
                           value=1e4, threshold=10.0,
                           metadata={"source": "torch", "run_tags": {"team": "nlp", "model-size": "7b"}})
        producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
        producer.send(topics.name("alerts"), key=b"am-run", value=firing.to_json())
        producer.flush()

        deadline = time.monotonic() + 30
        found: list[dict] = []
        while time.monotonic() < deadline and not found:
            found = [a for a in _am_alerts(alertmanager) if a["labels"].get("run_id") == "am-run"]
            time.sleep(0.3)
        assert len(found) == 1, sinks.stdout and found
        labels = found[0]["labels"]
        assert labels == {"alertname": "gradient_explosion", "run_id": "am-run", "severity": "critical",
                          "detector": "gradient", "category": "gradient", "source": "torch", "team": "nlp",
                          "model_size": "7b"}
        assert found[0]["annotations"]["description"] == "grad norm 1e4 > 10"
        assert found[0]["status"]["state"] == "active"

        # re-sent while firing: Alertmanager's updatedAt moves on without a new lossguard alert
        first_update = found[0]["updatedAt"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            [again] = [a for a in _am_alerts(alertmanager) if a["labels"].get("run_id") == "am-run"]
            if again["updatedAt"] != first_update:
                break
            time.sleep(0.5)
        assert again["updatedAt"] != first_update, "the firing alert was not re-sent"

        producer.send(topics.name("alerts"), key=b"am-run", value=firing.resolved(20, "cleared").to_json())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(a["labels"].get("run_id") == "am-run"
                                                  for a in _am_alerts(alertmanager)):
            time.sleep(0.3)
        assert not [a for a in _am_alerts(alertmanager) if a["labels"].get("run_id") == "am-run"], "not resolved"

        families = _families(_get(f"http://127.0.0.1:{metrics_port}/metrics").decode())
        assert _value(families, "lossguard_sink_deliveries", "lossguard_sink_deliveries_total", sink="am") == 2
        assert _value(families, "lossguard_sink_delivery_failures", "lossguard_sink_delivery_failures_total",
                      sink="am") == 0
        assert _value(families, "lossguard_sink_decisions", "lossguard_sink_decisions_total", sink="am",
                      decision="resolved") == 1
    finally:
        sinks.send_signal(signal.SIGTERM)
        try:
            out = sinks.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            sinks.kill()
            out = "(did not stop on SIGTERM)\n" + sinks.communicate()[0].decode()
    assert "Traceback" not in out and "did not stop" not in out, out


def test_a_restarted_alertmanager_sink_goes_on_resending_what_fires(topics, alertmanager, tmp_path):
    """Alertmanager resolves an alert nobody re-sends within its resolve_timeout. A sink restarted while a
    lossguard episode is open takes the firing alert up from the alert log and re-sends it, without
    posting anything new for it, and ends it when lossguard resolves it."""
    routes = tmp_path / "routes.toml"
    routes.write_text(f'[sinks.am]\nkind = "alertmanager"\nurl = "{alertmanager}"\nresend_s = 1\n\n'
                      '[[routes]]\nsinks = ["am"]\n')

    def start_sinks() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "stream_app", "sinks", "--routes", str(routes),
                                 "--timeout", "60"], cwd=ROOT, env=topics.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def ours() -> list[dict]:
        return [a for a in _am_alerts(alertmanager) if a["labels"].get("run_id") == "am-restart"]

    def stop(proc: subprocess.Popen) -> str:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        assert "Traceback" not in out, out
        return out

    firing = Alert.new(run_id="am-restart", step=5, detector="loss", category="loss", alert_type="loss_spike",
                       severity="high", message="loss 9.0 is 4x its median", value=9.0, threshold=4.0)
    producer = KafkaProducer(bootstrap_servers=topics.bootstrap)
    producer.send(topics.name("alerts"), key=b"am-restart", value=firing.to_json())
    producer.flush()
    first = start_sinks()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ours():
            time.sleep(0.3)
        assert len(ours()) == 1
    finally:
        stop(first)
    before = ours()[0]["updatedAt"]
    second = start_sinks()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and ours()[0]["updatedAt"] == before:
            time.sleep(0.5)
        [again] = ours()
        assert again["updatedAt"] != before, "the restarted sink did not re-send the firing alert"
        assert again["startsAt"] == _iso_of(firing.ts) and again["labels"]["severity"] == "high"
        producer.send(topics.name("alerts"), key=b"am-restart", value=firing.resolved(9, "cleared").to_json())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and ours():
            time.sleep(0.3)
        assert ours() == [], "not resolved"
    finally:
        stop(second)


def _iso_of(ts: float) -> str:
    """Alertmanager's rendering of a unix time (what the sink sent as startsAt), to the millisecond."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_the_routes_file_to_copy_loads_and_routes(monkeypatch):
    from stream_app.routing import load_routing
    from stream_app.sinks import build_sink

    routing = load_routing(ROOT / "deploy" / "routes.toml", "")
    assert set(routing.sinks) == {"console", "jsonl", "alertmanager", "pager", "autostop"}
    diverged = Alert.new(run_id="r", step=1, detector="d", category="c", alert_type="nonfinite_metric",
                         severity="critical", message="", metadata={"run_tags": {"autostop": "yes"}})
    assert routing.router.sinks_for(diverged) == ["console", "jsonl", "alertmanager", "autostop", "pager"]
    monkeypatch.setenv("LOSSGUARD_ALERTMANAGER_URL", "http://127.0.0.1:9")
    sink = build_sink("alertmanager", routing.sinks["alertmanager"], {})
    sink.close()
    assert sink.url == "http://127.0.0.1:9" and sink.resend_s == 60
