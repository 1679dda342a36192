"""Sinks over a real alert topic: webhook down then up (nothing lost, nothing paged twice), grouping,
silences, auto-stop to the control topic, JSONL summaries; routing and policy as plain data."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kafka import KafkaProducer

from detectors import Alert, ControlEvent, decode_control_event
from stream_app.broker import free_port
from stream_app.routing import Route, Router, load_routing
from stream_app.settings import load_settings
from stream_app.sinks import build_sink
from stream_app.sinks.autostop import AutoStopSink
from stream_app.sinks.jsonl import JsonlSink, run_file_stem
from stream_app.sinks.policy import AlertPolicy
from stream_app.sinks.runner import Backoff, SinkRunner
from stream_app.sinks.silences import Silence, SilenceBook, silences_topic, write_silence
from stream_app.sinks.webhook import WebhookSink
from tests.conftest import read_topic


def alert(run: str, typ: str, sev: str, step: int, status: str = "firing", tags: dict | None = None) -> Alert:
    a = Alert.new(run_id=run, step=step, detector=typ, category="loss", alert_type=typ, severity=sev,
                  message=f"{typ} at {step}", episode_step=step, ts=1_000.0 + step,
                  metadata={"source": "torch", "run_tags": tags or {}})
    return a.resolved(step + 20, "cleared", ts=1_020.0 + step) if status == "resolved" else a


def publish(bootstrap: str, topic: str, alerts: list[Alert]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for a in alerts:
        producer.send(topic, key=a.run_id.encode(), value=a.to_json())
    producer.flush()
    producer.close()


class Hook:
    """A real HTTP endpoint on 127.0.0.1 that records the JSON bodies it is sent; start() brings it up."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[dict] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def ids(self) -> list[str]:
        return [b["attachments"][0]["footer"].split()[-1] for b in self.bodies]


class _Running:
    """A sink runner on a thread, stopped (and joined) by ``finish()`` or after ``seconds``."""

    def __init__(self, runner: SinkRunner, seconds: float):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=runner.run, args=(self.stop,), daemon=True)
        self.thread.start()
        self.timer = threading.Timer(seconds, self.stop.set)
        self.timer.start()

    def finish(self) -> None:
        self.stop.set()
        self.timer.cancel()
        self.thread.join(15)


def _wait(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.1)
    return cond()


@pytest.mark.slow
def test_webhook_down_then_up_loses_nothing_pages_each_run_once_and_a_restart_pages_nothing_again(
        topics, monkeypatch):
    hook = Hook()
    monkeypatch.setenv("LOSSGUARD_WEBHOOK_URL", f"http://127.0.0.1:{hook.port}/hook")
    spike, nan = alert("div", "loss_spike", "high", 10), alert("div", "nonfinite_metric", "critical", 12)
    first = [spike, alert("div", "gradient_explosion", "high", 11), spike,  # grouped; duplicate
             nan,                                                           # escalation
             alert("ok", "loss_spike", "medium", 5),                         # below the route
             alert("muted", "loss_spike", "critical", 3)]                    # silenced
    publish(topics.bootstrap, topics.name("alerts"), first)
    silences = topics.name("silences")
    write_silence(topics.bootstrap, silences, Silence.new(run_id="mute*", duration_s=600))

    def runner() -> SinkRunner:
        routing = load_routing(None, webhook_url="set")
        return SinkRunner(WebhookSink(timeout_s=1.0), topics.bootstrap, topics.name("alerts"),
                          f"{topics.app_id}-sink-webhook", routing.router, AlertPolicy(group_by_run=True),
                          SilenceBook(topics.bootstrap, silences), Backoff(first_s=0.1, max_s=0.5))

    sink = runner()
    sink.sink.name = "webhook"
    running = _Running(sink, 25)
    try:
        time.sleep(2.0)  # the endpoint is down: the runner retries, nothing is committed
        assert hook.bodies == []
        hook.start()
        assert _wait(lambda: len(hook.bodies) >= 2), sink.counts
        time.sleep(1.0)
        assert hook.ids() == [spike.alert_id, nan.alert_id]
        assert hook.bodies[1]["text"].startswith("ESCALATED [CRITICAL] div: nonfinite_metric")
        assert sink.counts["grouped"] == 1 and sink.counts["duplicate"] == 1
        assert sink.counts["silenced"] == 1 and sink.counts["unrouted"] == 1
    finally:
        running.finish()
    # a restarted sink: the re-sent alert is a duplicate (state replayed), the resolutions page once
    later = [nan, alert("div", "loss_spike", "high", 10, "resolved"),
             alert("div", "gradient_explosion", "high", 11, "resolved"),
             alert("div", "nonfinite_metric", "critical", 12, "resolved")]
    publish(topics.bootstrap, topics.name("alerts"), later)
    sink = runner()
    sink.sink.name = "webhook"
    running = _Running(sink, 25)
    try:
        assert _wait(lambda: len(hook.bodies) >= 3), sink.counts
        time.sleep(1.0)
        assert hook.ids() == [spike.alert_id, nan.alert_id, later[-1].alert_id]
        assert hook.bodies[2]["text"].startswith("RESOLVED")
        assert sink.counts["duplicate"] == 1 and sink.counts["group_open"] == 2
    finally:
        running.finish()
        hook.stop()


@pytest.mark.slow
def test_auto_stop_writes_one_control_event_per_run_and_takes_a_pluggable_stopper(topics, tmp_path):
    settings = load_settings(env={}, topic_prefix=topics.prefix)
    publish(topics.bootstrap, topics.name("alerts"),
            [alert("job-1", "loss_spike", "critical", 4), alert("job-1", "nonfinite_metric", "critical", 5),
             alert("bedrock:ft-1", "loss_spike", "critical", 7, tags={"platform": "bedrock"})])
    stopped: list[ControlEvent] = []
    router = Router([Route(match={"tags.platform": "bedrock"}, sinks=["stop_managed"]),
                     Route(match={"severity": ">=critical"}, sinks=["autostop"])])
    runners = [
        SinkRunner(build_sink("autostop", {"kind": "autostop"}, {"settings": settings, "bootstrap": topics.bootstrap}),
                   topics.bootstrap, topics.name("alerts"), f"{topics.app_id}-sink-autostop", router,
                   AlertPolicy(group_by_run=True)),
        SinkRunner(AutoStopSink(stopper=stopped.append), topics.bootstrap, topics.name("alerts"),
                   f"{topics.app_id}-sink-managed", router, AlertPolicy(group_by_run=True)),
    ]
    runners[1].sink.name = "stop_managed"
    running = [_Running(r, 15) for r in runners]
    assert _wait(lambda: stopped and read_topic(topics.bootstrap, topics.name("control"), topics.partitions, 0.3))
    time.sleep(0.5)
    for r in running:
        r.finish()
    control = read_topic(topics.bootstrap, topics.name("control"), topics.partitions, 1.0)
    events = [decode_control_event(r.value) for r in control]
    assert [(e.run_id, e.action) for e in events] == [("job-1", "stop")]
    assert control[0].key == b"job-1" and events[0].alert_id == alert("job-1", "loss_spike", "critical", 4).alert_id
    assert [e.run_id for e in stopped] == ["bedrock:ft-1"]


def test_jsonl_sink_writes_alerts_and_the_summary_report_and_resumes(tmp_path):
    sink = JsonlSink(dir=str(tmp_path))
    alerts = [alert("r/1", "loss_spike", "high", 3), alert("r/1", "nonfinite_metric", "critical", 4),
              alert("r/1", "loss_spike", "high", 3, "resolved")]
    for a in alerts[:2]:
        sink.deliver(a, "new")
    sink = JsonlSink(dir=str(tmp_path))  # a restarted sink reads the run's file back
    for a in alerts:
        sink.deliver(a, "new")
    stem = run_file_stem("r/1")
    lines = (tmp_path / f"{stem}.alerts.jsonl").read_text().splitlines()
    assert len(lines) == 3
    summary = json.loads((tmp_path / f"{stem}.summary.json").read_text())
    assert summary["total_alerts"] == 2 and summary["by_category"] == {"loss": 2}
    assert summary["by_severity"] == {"critical": 1, "high": 1, "medium": 0, "low": 0}
    assert [a["alert_id"] for a in summary["latest_alerts"]] == [a.alert_id for a in alerts]
    assert summary["open"] == ["nonfinite_metric"]


def test_routes_are_data_and_bad_routes_name_the_key(tmp_path):
    path = tmp_path / "routes.toml"
    path.write_text("""
[sinks.console]
[sinks.pager]
kind = "webhook"
[[routes]]
sinks = ["console"]
continue = true
[[routes]]
match = { severity = ">=high", "tags.team" = "nlp-*", source = ["torch", "hf"] }
sinks = ["pager"]
""")
    config = load_routing(path)
    assert config.sinks["pager"]["kind"] == "webhook"
    assert config.router.sinks_for(alert("r", "t", "critical", 1, tags={"team": "nlp-a"})) == ["console", "pager"]
    assert config.router.sinks_for(alert("r", "t", "medium", 1, tags={"team": "nlp-a"})) == ["console"]
    assert config.router.sinks_for(alert("r", "t", "critical", 1, tags={"team": "cv"})) == ["console"]
    path.write_text('[sinks.console]\n[[routes]]\nmatch = { severity = ">=urgent" }\nsinks = ["console"]\n')
    with pytest.raises(ValueError, match=r"routes\[0\].match.severity"):
        load_routing(path)
    path.write_text('[[routes]]\nsinks = ["nowhere"]\n')
    with pytest.raises(ValueError, match="no sink named 'nowhere'"):
        load_routing(path)


def test_policy_cools_down_a_flapping_alert_and_still_escalates():
    policy = AlertPolicy(cooldown_s=300)
    flaps = [alert("r", "loss_spike", "medium", s) for s in (10, 50, 90)]
    decisions = []
    for a in flaps:
        decisions.append(policy.admit(a).reason)
        decisions.append(policy.admit(alert("r", "loss_spike", "medium", a.step, "resolved")).reason)
    decisions.append(policy.admit(alert("r", "loss_spike", "critical", 120)).reason)
    # a held-back alert's resolution is not paged either; a worse one passes the cooldown
    assert decisions == ["new", "resolved", "cooldown", "unpaged", "cooldown", "unpaged", "new"]
    assert silences_topic("p") == "p.silences"
