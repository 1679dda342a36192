"""The in-process API inside real torch training loops."""

from __future__ import annotations

import json

import _detector_series as series
import numpy as np
import pytest

from detectors import (
    AdvancedAnomalyDetector,
    Alert,
    AnomalyDetectionHook,
    ConfigError,
    Detector,
    MetricEvent,
    register_hook,
    unregister_hook,
)


@pytest.fixture(autouse=True)
def _own_directory(tmp_path, monkeypatch):
    """The documented default ``output_dir`` is relative: each test writes under its own directory."""
    monkeypatch.chdir(tmp_path)


def train_digits(detector: AdvancedAnomalyDetector, steps: int = 120, jump_at: int | None = None) -> list[Alert]:
    torch = series._torch()
    torch.manual_seed(0)
    x, y = series._digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    alerts = []
    for step in range(steps):
        if step == jump_at:
            opt.param_groups[0]["lr"] *= 100
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        alerts += detector.analyze_training_step(model=model, optimizer=opt, loss=loss, batch_size=32, step=step)
        opt.step()
    return alerts


def test_training_loop_with_lr_jump_saves_alerts_and_report(tmp_path):
    det = AdvancedAnomalyDetector(output_dir=tmp_path, gradient={"explosion_threshold": 10.0})
    alerts = train_digits(det, jump_at=80)
    types = {(a.alert_type, a.severity) for a in alerts}
    assert ("lr_sudden_change", "critical") in types
    assert any(t == "gradient_explosion" and s in ("high", "critical") for t, s in types)
    assert all(a.step >= 80 for a in alerts if a.severity in ("high", "critical"))
    files = sorted(tmp_path.glob("alert_*.json"))
    assert len(files) == len(alerts)
    assert Alert.from_dict(json.loads(files[0].read_text())).alert_id in {a.alert_id for a in alerts}
    report = json.loads(det.save_report().read_text())
    assert report["total_alerts"] == sum(a.status == "firing" for a in alerts)
    assert report["by_category"]["learning_rate"] >= 1
    assert report["by_severity"]["critical"] >= 1
    assert report["latest_alerts"][-1]["alert_id"] == alerts[-1].alert_id


def test_healthy_loop_reads_grad_norm_and_lr_and_stays_quiet():
    det = AdvancedAnomalyDetector()
    alerts = train_digits(det)
    assert [a for a in alerts if a.severity in ("high", "critical")] == []
    state = det.suite.detectors["gradient_explosion"].state_dict()
    assert state["mean"] is not None and state["seen"] > 100  # grad norms came from the model
    assert det.suite.detectors["lr_change"].prev_lr == 0.05  # lr came from the optimizer
    assert det.get_summary()["steps_analyzed"] == 120


def test_hooks_see_every_alert_and_a_failing_hook_never_breaks_training(caplog):
    seen, high = [], []

    def broken(alert: Alert) -> None:
        raise RuntimeError("pager is down")

    register_hook("test-collect", seen.append)
    register_hook("test-broken", broken)
    try:
        det = AdvancedAnomalyDetector(hooks={"high": AnomalyDetectionHook(high.append, min_severity="high")})
        alerts = train_digits(det, steps=100, jump_at=60)
    finally:
        unregister_hook("test-collect")
        unregister_hook("test-broken")
    assert seen == alerts and alerts
    assert high and all(a.severity in ("high", "critical") for a in high)
    assert "pager is down" in caplog.text


def test_rewards_and_predictions_are_summarised():
    rng = np.random.default_rng(0)
    det = AdvancedAnomalyDetector(save_alerts=False)
    for step in range(40):
        probs = rng.uniform(0, 1, 256)
        labels = (rng.uniform(0, 1, 256) < probs).astype(float)  # calibrated
        det.analyze_training_step(rewards=rng.normal(1.0, 0.5, 64), predictions=(probs, labels), step=step)
    calib = det.suite.detectors["calibration"]
    assert len(calib.early) == 20 and max(calib.early) < 0.15
    fired = []
    for step in range(40, 70):
        probs = rng.uniform(0, 1, 256)
        labels = (rng.uniform(0, 1, 256) < 0.5).astype(float)  # the model's confidence means nothing now
        fired += det.analyze_training_step(rewards=rng.normal(-2.0, 0.5, 64), predictions=(probs, labels),
                                           step=step)
    types = {a.alert_type for a in fired if a.severity in ("high", "critical")}
    assert {"calibration_drift", "reward_distribution_drift"} <= types


def test_custom_detector_class_and_instance():
    class LossAbove(Detector):
        name = "loss_above"
        category = "custom"
        defaults = {"limit": 1.0}

        def update(self, event: MetricEvent) -> list[Alert]:
            loss = event.metrics.get("loss", 0.0)
            return self._report(event, "loss_above", loss > self.limit, severity="low", message="loss high")

    det = AdvancedAnomalyDetector(detectors=[LossAbove])
    assert [a.alert_type for a in det.analyze_training_step(loss=2.0)] == ["loss_above"]
    det2 = AdvancedAnomalyDetector(detectors=[LossAbove(limit=5.0)])
    assert det2.analyze_training_step(loss=2.0) == []


def test_unknown_section_key_is_an_error():
    with pytest.raises(ConfigError, match="gradient.explosion"):
        AdvancedAnomalyDetector(gradient={"explosion": 3.0})


def test_state_dict_resumes_the_in_process_detector():
    events = series.supervised("lr_jump").events
    a = AdvancedAnomalyDetector()
    first = [x for e in events[:140] for x in a.analyze_training_step(step=e.step, **e.metrics)]
    b = AdvancedAnomalyDetector()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest_b = [(x.alert_type, x.severity, x.step) for e in events[140:]
              for x in b.analyze_training_step(step=e.step, **e.metrics)]
    rest_a = [(x.alert_type, x.severity, x.step) for e in events[140:]
              for x in a.analyze_training_step(step=e.step, **e.metrics)]
    assert rest_a == rest_b
    assert ("lr_sudden_change", "critical", 150) in rest_a
    assert all(x.step < 140 for x in first)


def test_rewards_are_summarised_under_the_reporters_names():
    from producers.torch import _Summary

    seen: list[dict] = []

    class Capture(Detector):
        name = "capture_metrics"

        def update(self, event: MetricEvent) -> list[Alert]:
            seen.append(dict(event.metrics))
            return []

    rewards = np.linspace(-1.0, 1.0, 101)
    probs, labels = np.linspace(0.0, 1.0, 50), (np.arange(50) % 2).astype(float)
    det = AdvancedAnomalyDetector(output_dir=None, detectors=[Capture])
    det.analyze_training_step(rewards=rewards, predictions=(probs, labels))
    reporter = {**_Summary("reward", rewards).metrics(), **_Summary("prediction", probs, labels).metrics()}
    assert seen[0] == pytest.approx(reporter)
    assert {"reward_p05", "reward_p95", "ece", "brier"} <= set(seen[0])
