"""Configuration, registry, time-based checks and alias handling of the detector library."""

from __future__ import annotations

import _detector_series as series
import pytest

from detectors import (
    DETECTORS,
    Alert,
    ConfigError,
    Detector,
    DetectorSuite,
    MetricEvent,
    build_config,
    canonical_metrics,
    default_config,
    register_detector,
)

USERS_KEYS = {
    "gradient": {"explosion_threshold": 10.0, "vanishing_threshold": 1e-6, "window_size": 100},
    "learning_rate": {"change_threshold": 0.3, "min_lr": 1e-8, "max_lr": 1.0},
    "batch_size": {"performance_threshold": 0.1, "window_size": 20},
    "convergence": {"plateau_threshold": 0.001, "plateau_window": 50},
    "reward_drift": {"drift_threshold": 0.1, "calibration_threshold": 0.7},
}

ALERT_TYPES = {
    "gradient_explosion", "gradient_vanishing", "gradient_variance", "lr_too_high", "lr_too_low",
    "lr_sudden_change", "batch_size_impact", "convergence_plateau", "convergence_divergence",
    "calibration_poor", "calibration_drift", "reward_distribution_drift", "nonfinite_metric", "loss_spike",
    "loss_oscillation", "val_train_divergence", "step_time_anomaly", "memory_growth", "stalled_run",
    "kl_blowup", "entropy_collapse", "reward_hacking", "length_explosion", "reward_collapse", "reward_flat",
}


def test_users_sections_have_exactly_their_defaults():
    cfg = default_config()
    for section, keys in USERS_KEYS.items():
        for key, value in keys.items():
            assert cfg[section][key] == value, f"{section}.{key}"
            assert type(cfg[section][key]) is type(value), f"{section}.{key}"


@pytest.mark.parametrize("overrides,key", [
    ({"gradient": {"explosion_treshold": 3}}, "gradient.explosion_treshold"),
    ({"learning_rate": {"max_lr": "big"}}, "learning_rate.max_lr"),
    ({"batch_size": {"window_size": 2.5}}, "batch_size.window_size"),
    ({"convergnce": {}}, "convergnce"),
    ({"detectors": {"disabled": ["no_such_detector"]}}, "detectors.disabled"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        build_config(overrides)
    assert err.value.key == key
    assert key in str(err.value)


def test_thresholds_come_from_config():
    """The same real lr x100 jump: the default max_lr=1.0 says lr_too_high, max_lr=10 does not."""
    events = series.supervised("lr_jump").events
    suite = DetectorSuite()
    default = {a.alert_type for e in events for a in suite.update(e)}
    relaxed = DetectorSuite({"learning_rate": {"max_lr": 10.0}})
    relaxed_types = {a.alert_type for e in events for a in relaxed.update(e)}
    assert "lr_too_high" in default and "lr_too_high" not in relaxed_types


def test_disabled_detectors_do_not_run():
    suite = DetectorSuite({"detectors": {"disabled": ["nonfinite"]}})
    assert "nonfinite" not in suite.detectors
    assert suite.update(MetricEvent("r", 1, {"loss": float("nan")}, ts=1.0)) == []


def test_every_design_alert_type_has_a_detector():
    # each detector module names the alert types it raises in its source; collect them by running docs
    import inspect

    sources = "".join(inspect.getsource(type(d) if not isinstance(d, type) else d) for d in DETECTORS.values())
    missing = {t for t in ALERT_TYPES if f'"{t}"' not in sources}
    assert missing == set()


def test_custom_detector_via_registry_runs_in_the_suite_and_is_configurable():
    @register_detector
    class AccuracyDrop(Detector):
        """Accuracy below a floor."""

        name = "test_accuracy_drop"
        category = "quality"
        section = "test_accuracy"
        defaults = {"floor": 0.5, "resolve_after": 2}

        def update(self, event: MetricEvent) -> list[Alert]:
            acc = event.metrics.get("accuracy")
            if acc is None:
                return []
            return self._report(event, "accuracy_drop", acc < self.floor, severity="high", value=acc,
                                threshold=self.floor, message=f"accuracy {acc}")

    try:
        suite = DetectorSuite({"test_accuracy": {"floor": 0.9}})
        fired = [a for s, acc in enumerate([0.95, 0.85, 0.8, 0.95, 0.96]) for a in
                 suite.update(MetricEvent("r", s, {"accuracy": acc}, ts=float(s)))]
        assert [(a.alert_type, a.status, a.step) for a in fired] == [
            ("accuracy_drop", "firing", 1), ("accuracy_drop", "resolved", 4)]
        with pytest.raises(ConfigError, match="test_accuracy.flor"):
            DetectorSuite({"test_accuracy": {"flor": 1}})
    finally:
        DETECTORS.pop("test_accuracy_drop")


def test_stalled_run_from_tick_and_from_timestamps():
    events = series.supervised("healthy").events[:100]  # real cadence: 1 s per step
    suite = DetectorSuite({"liveness": {"min_seconds": 30.0, "stall_seconds": 120.0}})
    for e in events:
        assert all(a.alert_type != "stalled_run" for a in suite.update(e))
    last = events[-1].ts
    assert suite.tick(last + 20) == []  # too short to be a stall
    fired = suite.check_stalled(last + 200)
    assert [(a.alert_type, a.severity, a.step) for a in fired] == [("stalled_run", "high", events[-1].step)]
    assert suite.tick(last + 210) == []  # same episode, no repeat

    # offline: the gap is seen when the next event arrives, and the episode resolves after it
    replayed = DetectorSuite({"liveness": {"min_seconds": 30.0, "stall_seconds": 120.0}})
    gap = [MetricEvent(e.run_id, e.step, e.metrics, ts=e.ts + (500 if e.step >= 60 else 0)) for e in events]
    alerts = [a for e in gap for a in replayed.update(e)]
    assert [(a.alert_type, a.status, a.step) for a in alerts if a.alert_type == "stalled_run"] == [
        ("stalled_run", "firing", 60), ("stalled_run", "resolved", 61)]
    # the run reported again: a gap in the past (and all a replay can see) is not a stall now
    assert {a.severity for a in alerts if a.alert_type == "stalled_run"} == {"medium"}


@pytest.mark.parametrize("status", ["finished", "completed", "stopped", "failed", "FINISHED"])
def test_finished_run_is_not_stalled(status):
    suite = DetectorSuite()
    for s in range(20):
        suite.update(MetricEvent("r", s, {"loss": 1.0}, ts=100.0 + s))
    suite.update(MetricEvent("r", 20, {"loss": 1.0}, ts=120.0, tags={"status": status}))
    assert suite.tick(100_000.0) == []


def test_a_run_that_reports_after_finished_is_watched_again():
    suite = DetectorSuite()
    for s in range(20):
        suite.update(MetricEvent("r", s, {"loss": 1.0}, ts=100.0 + s))
    suite.update(MetricEvent("r", 20, {"loss": 1.0}, ts=120.0, tags={"status": "finished"}))
    suite.update(MetricEvent("r", 21, {"loss": 1.0}, ts=121.0))  # resumed
    assert [a.severity for a in suite.tick(100_000.0)] == ["critical"]


def test_lr_dropping_to_zero_mid_run_is_high_within_a_few_steps():
    events = series.supervised("healthy").events
    zeroed = [MetricEvent(e.run_id, e.step, dict(e.metrics, lr=0.0) if e.step >= 150 else e.metrics, ts=e.ts)
              for e in events]
    suite = DetectorSuite()
    hits = [a.step for e in zeroed for a in suite.update(e) if a.alert_type == "lr_stuck_zero"
            and a.severity == "high"]
    assert hits and 150 <= hits[0] <= 154


def test_trl_and_bedrock_names_reach_the_detectors():
    assert canonical_metrics({"objective/kl": 1.0, "rewards/margins": 2.0, "completions/mean_length": 3.0,
                              "policy/clipfrac": 0.1, "training_loss": 1.0, "validation_loss": 2.0,
                              "calibration/ece": 0.1}) == {
        "kl": 1.0, "reward_margin": 2.0, "response_length": 3.0, "clipfrac": 0.1, "loss": 1.0,
        "val_loss": 2.0, "ece": 0.1}
