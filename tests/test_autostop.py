"""Closing the loop: a real diverging torch run → the real ``lossguard worker`` raises a critical alert →
a stop request on the control topic → the job's reporter sets ``should_stop`` → the loop ends.

The test plays the auto-stop sink (built separately in stream_app): when the critical alert for the run
appears on the alert topic it writes the ControlEvent the sink writes, keyed by run id.
"""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import producers  # noqa: E402
from detectors.events import ControlEvent  # noqa: E402
from stream_app.control_cli import send_control  # noqa: E402
from stream_app.demo_train import load_digits_tensors  # noqa: E402
from tests.conftest import collect_alerts  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.slow
def test_critical_alert_stops_a_diverging_run_within_a_few_steps(topics, start_worker, monkeypatch):
    monkeypatch.setenv("LOSSGUARD_TOPIC_PREFIX", topics.prefix)
    run_id = "autostop-nan"
    start_worker()
    torch.manual_seed(0)
    x, y = load_digits_tensors()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    reporter = producers.watch(run_id, model=model, optimizer=optimizer, bootstrap=topics.bootstrap,
                               tags={"model": "mlp-digits"})
    progress = {"step": 0, "stopped_at": None, "stop_sent_at": None}
    inject_at = 40

    def train() -> None:
        g = torch.Generator().manual_seed(0)
        deadline = time.monotonic() + 90
        step = 0
        while time.monotonic() < deadline:
            idx = torch.randint(0, len(x), (32,), generator=g)
            xb = x[idx].clone()
            if step >= inject_at:
                xb[0, 0] = float("inf")  # a corrupted batch: the loss turns NaN
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            reporter.log(step, loss=loss, batch_size=32)
            progress["step"] = step
            if reporter.should_stop:
                progress["stopped_at"] = step
                return
            step += 1
            time.sleep(0.03)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        alerts = collect_alerts(topics, lambda a: any(x.run_id == run_id and x.severity == "critical" for x in a),
                                timeout=80)
        critical = next(a for a in alerts if a.run_id == run_id and a.severity == "critical")
        progress["stop_sent_at"] = progress["step"]
        send_control(ControlEvent(run_id, "stop", f"{critical.alert_type}: {critical.message}", critical.alert_id),
                     topics.bootstrap, topics.name("control"), topics.partitions)
    finally:
        trainer.join(100)
        reporter.close()
    assert critical.step >= inject_at
    assert progress["stopped_at"] is not None, "training must stop on the request"
    # ~30 ms per step, the listener polls every 250 ms: a handful of steps after the request
    assert progress["stopped_at"] - progress["stop_sent_at"] <= 20, progress
    assert reporter.stop_reason.startswith(critical.alert_type)
    print(f"alert at step {critical.step}, stop written at step {progress['stop_sent_at']}, "
          f"training stopped at step {progress['stopped_at']}")
