"""Sinks under faults: one undeliverable alert never blocks a sink, transient failures are retried with
capped backoff, and no secret (webhook token, user-info, Authorization, AWS keys) reaches a log line."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stream_app import redact
from stream_app.alerts_cli import format_alert
from stream_app.broker import free_port
from stream_app.routing import load_routing
from stream_app.sinks import DeliveryError, PermanentDeliveryError
from stream_app.sinks.jsonl import JsonlSink, run_file_stem
from stream_app.sinks.policy import AlertPolicy
from stream_app.sinks.runner import Backoff, SinkRunner, is_permanent
from stream_app.sinks.webhook import WebhookSink
from tests.test_sinks import _Running, _wait, alert, publish

SECRET = "T0SECRET/B0SECRET/xoxbTOKEN123"


class ScriptedHook:
    """A webhook on 127.0.0.1 answering each run id's alerts with a status from ``script`` (a list is
    consumed one answer per request; default 200); records what it took."""

    def __init__(self, script: dict[str, list[int] | int]):
        self.port, self.script, self.taken, self.requests = free_port(), script, [], []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                run = body["attachments"][0]["fields"][0]["value"]
                hook.requests.append((run, self.headers.get("Authorization")))
                answer = hook.script.get(run, 200)
                status = (answer.pop(0) if len(answer) > 1 else answer[0]) if isinstance(answer, list) else answer
                if status == 200:
                    hook.taken.append(run)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_permanent_and_transient_failures_are_told_apart():
    assert is_permanent(PermanentDeliveryError("x")) and not is_permanent(DeliveryError("x"))
    assert is_permanent(OSError(36, "File name too long")) and not is_permanent(OSError(28, "No space left"))
    assert not is_permanent(ConnectionRefusedError(111, "refused")) and is_permanent(UnicodeEncodeError(
        "utf-8", "\udc80", 0, 1, "surrogates not allowed"))


@pytest.mark.slow
def test_a_permanent_failure_is_dead_lettered_and_the_sink_moves_on_without_leaking_the_url(
        topics, monkeypatch, tmp_path, caplog):
    redact.install()
    hook = ScriptedHook({"gone": 404, "flaky": [503, 429, 200], "later": 200})
    url = f"http://user:pa55word@127.0.0.1:{hook.port}/services/{SECRET}?token=qtoken999"
    monkeypatch.setenv("LOSSGUARD_WEBHOOK_URL", url)
    alerts = [alert("gone", "nonfinite_metric", "critical", 1), alert("flaky", "nonfinite_metric", "critical", 2),
              alert("later", "nonfinite_metric", "critical", 3)]
    publish(topics.bootstrap, topics.name("alerts"), alerts)
    sink = WebhookSink(timeout_s=2.0)
    sink.name = "webhook"
    runner = SinkRunner(sink, topics.bootstrap, topics.name("alerts"), f"{topics.app_id}-sink-webhook",
                        load_routing(None, webhook_url="set").router, AlertPolicy(), None,
                        Backoff(first_s=0.1, max_s=0.4), dead_letter_dir=tmp_path / "dead")
    caplog.set_level(logging.DEBUG)
    running = _Running(runner, 40)
    try:
        assert _wait(lambda: "later" in hook.taken, timeout=30), (hook.requests, runner.counts)
    finally:
        running.finish()
        hook.close()
    assert hook.taken == ["flaky", "later"]
    assert [r for r, _ in hook.requests].count("flaky") == 3  # 503 and 429 retried, then taken
    assert [r for r, _ in hook.requests].count("gone") == 1   # 404: not retried
    assert {auth for _, auth in hook.requests} == {"Basic dXNlcjpwYTU1d29yZA=="}  # the URL's user:pa55word
    (dead,) = [json.loads(line) for line in (tmp_path / "dead" / "webhook.jsonl").read_text().splitlines()]
    assert dead["alert"]["run_id"] == "gone" and "HTTP 404" in dead["reason"] and dead["sink"] == "webhook"
    assert runner.counts["dead_lettered"] == 1
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records) + json.dumps(dead)
    assert "HTTP 503" in logged and f"127.0.0.1:{hook.port}" in logged  # the failures are explained...
    for secret in ("pa55word", "xoxbTOKEN123", "T0SECRET", "qtoken999", "user:"):  # ...without the secrets
        assert secret not in logged


def test_an_alert_whose_file_name_the_file_system_refuses_cannot_block_the_jsonl_sink(tmp_path, monkeypatch):
    """Run ids that would collide or escape as file names each get their own bounded file."""
    runs = ["a/b", "a_b", "..", ".hidden", "x" * 10_000, "ü/ü", "ü_ü", "\x1b]0;title\x07"]
    sink = JsonlSink(dir=str(tmp_path))
    for i, run in enumerate(runs):
        sink.deliver(alert(run, "loss_spike", "high", i), "new")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 * len(runs) and all(len(name) < 120 and not name.startswith(".") for name in files)
    for run in runs:
        lines = (tmp_path / f"{run_file_stem(run)}.alerts.jsonl").read_text().splitlines()
        assert [json.loads(line)["run_id"] for line in lines] == [run]
    assert len({run_file_stem(r) for r in runs}) == len(runs)
    assert all(Path(tmp_path / f"{run_file_stem(r)}.summary.json").resolve().parent == tmp_path.resolve()
               for r in runs)


def test_the_console_escapes_control_characters_from_run_ids_and_messages():
    line = format_alert(alert("\x1b]0;pwned\x07run\r\n", "loss_spike", "high", 3))
    assert "\x1b" not in line and "\x07" not in line and "\r" not in line and "\n" not in line
    assert "\\x1b]0;pwned\\x07run" in line


@pytest.mark.parametrize("text, secrets", [
    ("https://hooks.slack.com/services/T1/B2/abcSECRET", ["abcSECRET", "T1/B2"]),
    ("POST http://u:pw@127.0.0.1:9/x?sig=S3CR3T failed", ["pw@", "S3CR3T"]),
    ("headers={'Authorization': 'Bearer eyJSECRET'}", ["eyJSECRET"]),
    ("Authorization: Basic dXNlcjpwYXNz", ["dXNlcjpwYXNz"]),
    ("AKIAIOSFODNN7EXAMPLE / aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCY", ["IOSFODNN7", "wJalrXUt"]),
    ("X-Amz-Signature=abcdef0123&X-Amz-Security-Token=FQoGZXIvYXdzE", ["abcdef0123", "FQoGZXIvYXdzE"]),
    ("sasl_password='hunter2' sasl_username='bob'", ["hunter2"]),
])
def test_redaction_masks_every_kind_of_secret(text, secrets):
    out = redact.redact(text)
    assert all(s not in out for s in secrets), out


def test_every_log_record_is_redacted_once_installed(caplog):
    redact.install()
    log = logging.getLogger("lossguard.test")
    with caplog.at_level(logging.INFO):
        log.warning("retrying %s", f"https://hooks.example.com/services/{SECRET}")
        try:
            raise RuntimeError(f"refused by http://x:{SECRET}@h/")
        except RuntimeError:
            log.exception("failed")
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records) + caplog.text
    assert "hooks.example.com/…" in text and SECRET.split("/")[0] not in text and "RuntimeError" in text


def test_redaction_leaves_other_records_and_their_arguments_alone(caplog):
    """Handlers (mode's among them) re-format ``msg % args``: a record without a secret keeps both."""
    redact.install()
    log = logging.getLogger("lossguard.test")
    with caplog.at_level(logging.INFO):
        log.info("Creating topic %s with %d partitions (100%% sure)", "t.metrics", 6)
        log.info("posting to %s", "https://h.example/services/T1/B2/SECRETX")
    plain, secret = caplog.records[-2:]
    assert plain.args == ("t.metrics", 6) and plain.getMessage() == "Creating topic t.metrics with 6 partitions (100% sure)"
    assert secret.args == () and secret.getMessage() == "posting to https://h.example/…"
    assert logging.Formatter("%(message)s").format(secret) == "posting to https://h.example/…"
