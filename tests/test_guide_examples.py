"""The in-process API's documented examples, as written there; only the import path is lossguard's
(``from detectors import ...`` where the documentation imports from its own package). Where an example
leaves "your training code" to the reader, a small real torch step stands in for it."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from detectors import (  # noqa: E402
    AdvancedAnomalyDetector,
    Alert,
    Detector,
    MetricEvent,
    profiler_registry,
    register_hook,
    unregister_hook,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_directory(tmp_path, monkeypatch):
    """The documented default output directory is relative: each test writes under its own directory."""
    monkeypatch.chdir(tmp_path)
    yield
    profiler_registry.hooks.clear()
    profiler_registry.detectors.clear()


def test_quick_start_basic_usage(tmp_path, capsys):
    from detectors import AnomalyDetectionHook

    # Initialize the anomaly detector
    anomaly_detector = AdvancedAnomalyDetector(
        output_dir="anomaly_detection_results",
        save_alerts=True
    )

    # Initialize the hook for integration
    anomaly_hook = AnomalyDetectionHook(anomaly_detector)
    anomaly_hook.register_with_profiler()

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    num_steps, batch_size = 120, 32
    w = torch.linspace(-1, 1, 16).unsqueeze(1)
    seen = []

    # In your training loop
    for step in range(num_steps):
        # ... your training code ...
        x = torch.randn(batch_size, 16)
        loss = torch.nn.functional.mse_loss(model(x), x @ w + 0.3 * torch.randn(batch_size, 1))
        if step == 100:
            loss = loss * 1e4  # the run blows up here
        optimizer.zero_grad()
        loss.backward()
        rewards = torch.randn(batch_size) + step / 100
        predictions = (torch.rand(batch_size), (torch.rand(batch_size) < 0.5).float())

        # Analyze for anomalies
        alerts = anomaly_detector.analyze_training_step(
            model=model,
            optimizer=optimizer,
            loss=loss.item(),
            batch_size=batch_size,
            rewards=rewards,  # Optional
            predictions=predictions  # Optional
        )

        # Handle alerts
        for alert in alerts:
            if alert.severity == 'critical':
                print(f"CRITICAL: {alert.message}")
            elif alert.severity == 'high':
                print(f"HIGH: {alert.message}")
        seen += alerts
        optimizer.step()

    out = capsys.readouterr().out
    explosion = [a for a in seen if a.alert_type == "gradient_explosion" and a.status == "firing"]
    assert explosion and explosion[0].severity == "critical" and explosion[0].category == "gradient", [(a.step, a.alert_type, a.severity, a.value) for a in seen]
    assert explosion[0].step == 100 and f"CRITICAL: {explosion[0].message}" in out
    assert "cleared" not in out, "a resolved event is not printed as if it fired"
    assert all(a.severity == "low" for a in seen if a.status == "resolved")
    # the hook registered with the profiler saw the same alerts; the files are in the documented directory
    assert [a.alert_id for a in anomaly_hook.alerts] == [a.alert_id for a in seen]
    files = sorted((tmp_path / "anomaly_detection_results").glob("alert_*.json"))
    assert len(files) == len(seen)
    saved = json.loads(files[0].read_text())
    assert {"severity", "category", "message", "step", "value", "threshold", "metadata"} <= set(saved)


def test_configuration_options():
    anomaly_detector = AdvancedAnomalyDetector(
        output_dir="anomaly_detection_results",
        save_alerts=True,
        gradient={
            'explosion_threshold': 10.0,      # Threshold for gradient explosion
            'vanishing_threshold': 1e-6,      # Threshold for gradient vanishing
            'window_size': 100                # Window size for gradient analysis
        },
        learning_rate={
            'change_threshold': 0.3,          # Threshold for LR change detection
            'min_lr': 1e-8,                  # Minimum acceptable LR
            'max_lr': 1.0                    # Maximum acceptable LR
        },
        batch_size={
            'performance_threshold': 0.1,     # Threshold for performance impact
            'window_size': 20                 # Window size for batch analysis
        },
        convergence={
            'plateau_threshold': 0.001,       # Threshold for plateau detection
            'plateau_window': 50              # Window size for plateau detection
        },
        reward_drift={
            'drift_threshold': 0.1,           # Threshold for drift detection
            'calibration_threshold': 0.7      # Threshold for calibration quality
        }
    )
    # the documented grading: an explosion over the threshold is critical, vanishing high
    for step in range(20):
        anomaly_detector.analyze_training_step(loss=2.0 - step / 100, grad_norm=1.0, lr=1e-3)
    exploded = anomaly_detector.analyze_training_step(loss=1.8, grad_norm=1001.0, lr=1e-3)
    assert [(a.alert_type, a.category, a.severity, a.threshold) for a in exploded if a.status == "firing"
            ] == [("gradient_explosion", "gradient", "critical", 10.0)]
    vanished = []
    for _ in range(10):
        vanished += anomaly_detector.analyze_training_step(loss=1.8, grad_norm=1e-9, lr=1e-3)
    assert any(a.alert_type == "gradient_vanishing" and a.severity == "high" and a.category == "gradient"
               for a in vanished)


def test_with_pytorch_training_loop(tmp_path, capsys):
    import torch
    import torch.nn as nn
    import torch.optim as optim

    from detectors import AdvancedAnomalyDetector  # noqa: F811

    torch.manual_seed(0)
    # Initialize
    model = nn.Linear(100, 10)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    anomaly_detector = AdvancedAnomalyDetector()

    # Training loop
    for step in range(1000):  # noqa: B007 — as documented
        # Forward pass
        x = torch.randn(32, 100)
        y = torch.randn(32, 10)
        output = model(x)
        loss = nn.MSELoss()(output, y)

        # Backward pass
        optimizer.zero_grad()
        loss.backward()

        # Anomaly detection
        alerts = anomaly_detector.analyze_training_step(
            model=model,
            optimizer=optimizer,
            loss=loss.item(),
            batch_size=32
        )

        # Handle alerts
        for alert in alerts:
            print(f"[{alert.severity.upper()}] {alert.message}")

        # Optimizer step
        optimizer.step()

    assert anomaly_detector.steps_analyzed == 1000
    out = capsys.readouterr().out
    assert "[CRITICAL]" not in out and "[HIGH]" not in out, out  # a healthy loop
    # written where the documentation says, with no output_dir given
    assert len(list((tmp_path / "anomaly_detection_results").glob("alert_*.json"))) == out.count("\n")
    report = json.loads(anomaly_detector.save_report().read_text())
    assert {"total_alerts", "by_category", "by_severity", "latest_alerts"} <= set(report)


def test_custom_detectors_subclass():
    from detectors import AdvancedAnomalyDetector  # noqa: F811

    class CustomAnomalyDetector(AdvancedAnomalyDetector):
        def analyze_training_step(self, **kwargs):
            # Call parent analysis
            alerts = super().analyze_training_step(**kwargs)

            # Add custom analysis
            custom_alerts = self.custom_analysis(kwargs)
            alerts.extend(custom_alerts)

            return alerts

        def custom_analysis(self, kwargs):
            # Your custom anomaly detection logic
            return []

    plain = CustomAnomalyDetector()
    assert plain.analyze_training_step(loss=1.0) == []

    class LossCeiling(CustomAnomalyDetector):
        def custom_analysis(self, kwargs):
            if kwargs["loss"] <= 5.0:
                return []
            return [Alert.new(run_id=self.run_id, step=self._last_step, detector="loss_ceiling",
                              category="custom", alert_type="loss_ceiling", severity="high",
                              message=f"loss {kwargs['loss']} over 5", value=kwargs["loss"], threshold=5.0)]

    calls = []
    profiler_registry.register_hook("anomaly_detection", lambda alerts, step: calls.append((alerts, step)))
    per_alert = []
    register_hook("test-custom", per_alert.append)
    try:
        detector = LossCeiling(output_dir="custom")
        for i in range(5):  # a loss that moves: one stuck at exactly 1.0 is a plateau alert of its own
            detector.analyze_training_step(loss=1.0 - 0.01 * i)
        alerts = detector.analyze_training_step(loss=9.0)
    finally:
        unregister_hook("test-custom")
    assert alerts[-1].alert_type == "loss_ceiling"  # after the suite's own (a loss spike, here)
    assert calls == [(alerts, 5)], "the handler sees the extended list once, with its step"
    assert per_alert == alerts
    summary = detector.get_summary()
    assert summary["total_alerts"] == len(alerts) and summary["by_category"]["custom"] == 1
    assert summary["latest_alerts"][-1]["alert_type"] == "loss_ceiling"
    files = list((detector.output_dir).glob("alert_*loss_ceiling*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["value"] == 9.0


def test_real_time_monitoring_handler(capsys):
    def alert_handler(alerts, step):
        for alert in alerts:
            if alert.severity == 'critical':
                # Send notification, stop training, etc.
                print(f"CRITICAL ALERT: {alert.message}")
            elif alert.severity == 'high':
                # Log warning
                print(f"HIGH ALERT: {alert.message}")

    # Register the handler
    profiler_registry.register_hook("anomaly_detection", alert_handler)

    detector = AdvancedAnomalyDetector()
    for step in range(30):
        detector.analyze_training_step(loss=2.0 - step / 100, grad_norm=1.0, lr=1e-3)
    detector.analyze_training_step(loss=float("nan"), grad_norm=1.0, lr=1e-3)
    out = capsys.readouterr().out
    assert out.startswith("CRITICAL ALERT: ") and "loss" in out


def test_add_detector_after_the_first_step_runs():
    class LossAbove(Detector):
        name = "loss_above_guide"
        category = "custom"

        def update(self, event: MetricEvent) -> list[Alert]:
            loss = event.metrics.get("loss", 0.0)
            return self._report(event, "loss_above", loss > 3.0, severity="medium", message="loss over 3")

    detector = AdvancedAnomalyDetector(output_dir=None)
    assert detector.analyze_training_step(loss=4.0) == []
    detector.add_detector(LossAbove())
    assert [a.alert_type for a in detector.analyze_training_step(loss=4.0)] == ["loss_above"]


def test_with_hugging_face_transformers_trainer(tmp_path):
    """The guide's ``AnomalyDetectionTrainer``, run for real on a tiny BERT on CPU with the installed
    transformers (5.x). It cannot run exactly as printed, on any transformers version; what differs, each
    for a reason outside lossguard:

    - ``training_step(self, model, inputs, num_items_in_batch=None)``: Trainer calls
      ``self.training_step(model, inputs, num_items_in_batch)`` (since 4.46), so the printed two-argument
      override raises ``TypeError`` at the first step;
    - ``loss=result.item()`` where the guide has ``result['loss'].item()``: ``Trainer.training_step``
      returns the detached loss tensor (4.x and 5.x alike), not a mapping;
    - ``AutoModelForMaskedLM`` where the guide has ``AutoModel``: the bare encoder returns no loss, which
      Trainer refuses; and the tiny model and its tokenizer load from a local folder (no network in tests)
      where the guide names ``bert-base-uncased``; ``training_args`` and the datasets, which the guide
      leaves to the reader, are defined here.

    Everything lossguard's side of it touches — ``AdvancedAnomalyDetector()`` with its defaults,
    ``analyze_training_step(model=, optimizer=, loss=, batch_size=)`` on HF's model and accelerated
    optimizer, ``alert.category`` / ``alert.severity`` — runs as printed. A batch with every label ignored
    (a NaN loss: the run is broken from there) makes the alerts that the trainer logs."""
    transformers = pytest.importorskip("transformers")
    from transformers import (
        AutoModelForMaskedLM,
        AutoTokenizer,
        BertConfig,
        BertTokenizer,
        Trainer,
        TrainingArguments,
    )

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *[f"w{i}" for i in range(59)]]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    poisoned_step = 8

    class Batches(torch.utils.data.Dataset):
        """Sentences of the tiny vocabulary; the batch read ``poisoned_step``-th (samples are read in step
        order: no loader workers; Trainer shuffles which ones) has every label ignored."""

        def __init__(self, n: int):
            self.ids = torch.randint(5, 64, (n, 12), generator=torch.Generator().manual_seed(1))
            self.reads = 0

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            labels = self.ids[i].clone()
            self.reads += 1
            if (self.reads - 1) // 4 == poisoned_step - 1:
                labels[:] = -100
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels}

    train_dataset, eval_dataset = Batches(48), Batches(8)
    training_args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4,
                                      learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                                      disable_tqdm=True, logging_steps=100, dataloader_num_workers=0)

    # Initialize
    model = AutoModelForMaskedLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    anomaly_detector = AdvancedAnomalyDetector()

    # Custom trainer with anomaly detection
    class AnomalyDetectionTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # Get training step result
            result = super().training_step(model, inputs, num_items_in_batch)

            # Analyze for anomalies
            alerts = anomaly_detector.analyze_training_step(
                model=model,
                optimizer=self.optimizer,
                loss=result.item(),
                batch_size=inputs['input_ids'].size(0)
            )

            # Log alerts
            for alert in alerts:
                self.log({f"anomaly/{alert.category}_{alert.severity}": 1})

            return result

    # Use the custom trainer
    trainer = AnomalyDetectionTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset
    )
    trainer.train()

    assert tokenizer.convert_tokens_to_ids("w0") == 5
    assert anomaly_detector.steps_analyzed == 12  # one call per optimizer step (no accumulation)
    logged = [k for entry in trainer.state.log_history for k in entry if k.startswith("anomaly/")]
    firing = [a for a in anomaly_detector.alerts if a.status == "firing"]
    nan_loss = [a for a in firing if a.alert_type == "nonfinite_metric" and "loss" in a.metadata.get("metrics", ())]
    assert nan_loss and nan_loss[0].step == poisoned_step - 1 and nan_loss[0].severity == "critical", firing
    assert "anomaly/numerics_critical" in logged
    assert len(logged) == len(anomaly_detector.alerts)  # every alert analyze_training_step returned was logged
    before = [a for a in firing if a.step < poisoned_step - 1]
    assert not [a for a in before if a.rank >= 1], before  # the healthy steps before it raised nothing medium+
    assert all(a.metadata.get("source") == "inprocess" for a in anomaly_detector.alerts)
    assert list((tmp_path / "anomaly_detection_results").glob("alert_*.json"))
