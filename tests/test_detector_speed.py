"""The fast paths change nothing: batched updates and state round trips give the per-event alerts.

Every run is replayed through ``DetectorSuite.update`` event by event (the reference), then through
``update_batch`` in chunks of 1, 7 and 50, with and without a JSON round trip of ``state_dict()`` into a
fresh suite every few chunks. Alerts are compared in full (id, step, status, severity, message, value,
metadata) and so is the final state. Runs: corpus runs of several failure types, and synthetic runs
with every metric the detectors read, bursts, NaNs, saturated and stuck losses, LR and batch-size jumps, gaps and resumed steps.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from detectors import DetectorSuite, MetricEvent
from stream_app.replay import read_events

CORPUS = Path(__file__).resolve().parent.parent / "benchmarks" / "detection" / "corpus"
RUNS = ("charlm-gradient_explosion-01", "digits-nonfinite-00", "rl-reward_hacking-00", "rl-entropy_collapse-01",
        "wine-lr_zero-05", "diabetes-overfitting-03", "breast_cancer-batch_size_change-02",
        "digits-lr_schedule_bug-00", "digits-corrupted_batches-03", "charlm-healthy-00")


def synthetic(seed: int, steps: int = 700) -> list[MetricEvent]:
    """A run that moves every detector: noisy losses with spikes and zig-zags, rare NaNs, jumps, gaps."""
    rng = random.Random(seed)
    loss, g, lr, bs, mem, ent, kl, reward, length, margin, ts = 2.5, 1.0, 1e-3, 64.0, 2e9, 2.0, 0.01, 0.1, 150.0, 0.0, 1e9
    zigzag, negative, events = False, seed % 5 == 4, []
    for s in range(steps):
        ts += rng.choice([1.0] * 30 + [0.0, 200.0, 2000.0, 0.5])
        zigzag ^= rng.random() < 0.02
        loss = max(0.01, loss * (0.997 if rng.random() < 0.8 else 1.02)) + (rng.random() - 0.5) * 0.02
        x = loss * (2.5 if zigzag and s % 2 else 1.0) * rng.choice([1] * 60 + [8, 40]) - 3.0 * negative
        if seed % 3 == 0 and 100 <= s < 108 or seed % 3 == 2 and 400 <= s < 404:
            x = 0.6931  # a model stuck at one exact loss (8 points: a plateau opens; 4: none may)
        m = {"train/loss" if s % 3 == 0 else "loss": x, "batch_size": bs}
        if rng.random() < 0.9:
            g = abs(g + (rng.random() - 0.5) * 0.1)
            m["grad_norm"] = g * rng.choice([1] * 50 + [30, 1e-8, 500])
        lr = rng.choice([lr * 10, lr / 10, 0.0, 3.0, 1e-3, 1e-9]) if rng.random() < 0.01 else lr * 0.999
        if rng.random() < 0.95:
            m["learning_rate" if seed % 2 else "lr"] = lr
        bs = rng.choice([4.0, 16.0, 64.0, 256.0]) if rng.random() < 0.01 else bs
        m["step_time"] = 0.1 * rng.choice([1] * 40 + [5, 20]) + rng.random() * 0.01
        m["throughput"] = 1000.0 / m["step_time"]
        mem *= rng.choice([1.0] * 8 + [1.002, 1.01])
        m["mem_allocated"] = mem
        if seed % 3 == 0:
            m["rss"] = mem / 2
        if s % 25 == 0:
            m["val_loss"] = loss * (1 + max(0, s - 300) / 300) + rng.random() * 0.01
        if seed % 3 == 1 and s % 20 == 10:  # named evaluation sets off val_loss's cadence; one overfits
            m["eval_code_loss"] = loss * (1 + max(0, s - 250) / 200) + rng.random() * 0.01
            m["eval_chat_loss"] = loss + rng.random() * 0.01
        if seed % 2:
            ent *= rng.choice([1.0] * 30 + [0.9, 0.3])
            kl = kl * rng.choice([1.0] * 20 + [1.5, 3]) + 0.01
            reward += rng.random() * 0.02 - 0.005
            length *= rng.choice([1.0] * 20 + [1.1, 1.5])
            m.update(entropy=ent, kl=kl, reward_mean=reward, reward_std=0.5 + rng.random() * 0.1,
                     response_length=length, clipfrac=rng.random() * 0.5, ratio=1 + (rng.random() - 0.5) * 0.8)
            if s % 10 == 0:
                m["ece"] = rng.random() * 0.5
            if s % 7 == 0:
                m.update(reward_confidence=rng.random(), reward_accuracy=rng.random())
        else:
            margin = margin + 0.05 if s < 300 else margin * 0.9
            m.update(reward_margin=margin + rng.random() * 0.1,
                     reward_accuracy=0.5 + min(s, 300) / 700 - max(0, s - 400) / 500)
        if rng.random() < 0.01:
            m[rng.choice(list(m))] = rng.choice([math.nan, math.inf, -math.inf])
        if rng.random() < 0.01:  # a loss at a framework's clamp (saturated_loss), now and then two in a row
            m["loss" if rng.random() < 0.7 else "val_loss"] = rng.choice([87.3365, 16.1181])
        step = s if rng.random() > 0.01 else max(0, s - 5)  # a resumed run, or a re-delivery
        events.append(MetricEvent(f"syn{seed}", step, m, ts=ts, source="syn",
                                  tags={"status": "finished"} if rng.random() < 0.01 else {}))
    return events


def steady(seed: int, steps: int = 900) -> list[MetricEvent]:
    """A run as most are between incidents: constant LR and batch size for long stretches, memory that
    holds still, one report a second — what the batch paths' constant-value shortcuts are for — with an
    LR step, a memory step and a batch-size change in between."""
    rng = random.Random(seed)
    events, mem, lr = [], 2e9, 1e-3
    for s in range(steps):
        lr = 3e-4 if s == 400 else lr
        mem = mem * 1.25 if s in (300, 600) else mem
        loss = 0.4 + 1.6 * math.exp(-s / 300) * (0.95 + rng.random() * 0.1)
        if seed == 1 and 650 <= s < 660:
            loss = 0.5512  # stuck at one exact value for 10 reports: a plateau opens at once, resolves later
        if seed == 1 and 700 <= s < 708:
            loss = math.log(10) * (1 + (rng.random() - 0.5) * 0.002)  # at chance for 10 classes: a plateau opens
        if seed == 0 and 816 <= s < 832:
            loss = events[s - 16].metrics["loss"]  # a data order replayed by a model that stopped changing
        m = {"loss": loss,
             "grad_norm": 1.0 + rng.random() * 0.1, "lr": lr, "batch_size": 64.0 if s < 500 else 32.0,
             "step_time": 0.1 + rng.random() * 0.001, "throughput": 1000.0, "mem_allocated": mem}
        events.append(MetricEvent(f"steady{seed}", s, m, ts=1e9 + s + (30.0 if s > 700 else 0.0), source="syn"))
    return events


def epochs(seed: int, count: int = 300) -> list[MetricEvent]:
    """An epoch log (a training and a validation loss on every row, as a Keras CSVLogger writes): the loss
    falls, climbs for 8 epochs from epoch 150 (the coarse cadence's climb rule), and falls again."""
    rng = random.Random(seed)
    events, loss = [], 2.5
    for s in range(1, count + 1):
        loss = loss * (1.5 if 150 <= s < 158 else 0.97) * (0.98 + rng.random() * 0.04)
        events.append(MetricEvent(f"epochs{seed}", s, {"loss": loss, "val_loss": loss * 1.1 + rng.random() * 0.01},
                                  source="syn"))
    return events


def replay(events: list[MetricEvent], chunk: int | None, round_trip_every: int | None = None) -> tuple[list, str]:
    """Alerts (as full dicts) and final state; ``chunk`` None feeds ``update`` one event at a time."""
    suite, alerts = DetectorSuite(), []
    size = chunk or 1
    for n, start in enumerate(range(0, len(events), size)):
        if round_trip_every and n and n % round_trip_every == 0:
            state = json.loads(json.dumps(suite.state_dict()))
            suite = DetectorSuite()
            suite.load_state_dict(state)
        part = events[start:start + size]
        alerts += suite.update(part[0]) if chunk is None else suite.update_batch(part)
    return [json.dumps(a.to_dict(), sort_keys=True) for a in alerts], json.dumps(suite.state_dict(), sort_keys=True)


RUN_EVENTS = {**{name: lambda name=name: read_events(CORPUS / f"{name}.csv") for name in RUNS},
              **{f"synthetic-{seed}": lambda seed=seed: synthetic(seed) for seed in range(6)},
              **{f"steady-{seed}": lambda seed=seed: steady(seed) for seed in range(2)},
              **{f"epochs-{seed}": lambda seed=seed: epochs(seed) for seed in range(2)}}


@pytest.mark.parametrize("run", sorted(RUN_EVENTS))
def test_batched_and_restored_replays_match_the_per_event_replay(run: str) -> None:
    events = RUN_EVENTS[run]()
    reference = replay(events, None)
    assert reference[0] or run.endswith("healthy-00") or run.startswith("steady")
    for chunk, round_trip_every in ((1, None), (7, None), (50, None), (7, 13), (50, 3), (None, 97)):
        alerts, state = replay(events, chunk, round_trip_every)
        assert alerts == reference[0], (chunk, round_trip_every)
        assert state == reference[1], (chunk, round_trip_every)


def test_the_steady_run_takes_the_batch_paths(monkeypatch) -> None:
    """The shortcuts above are really taken on a steady run (else the comparison would prove little): each
    of these detectors leaves most batches of 50 steps to its batch path, not to the step-by-step loop."""
    from detectors.base import Detector

    fallbacks: dict[str, int] = {}
    loop = Detector.update_batch

    def counted(self, events):
        fallbacks[self.name] = fallbacks.get(self.name, 0) + 1
        return loop(self, events)

    monkeypatch.setattr(Detector, "update_batch", counted)
    events = steady(0)
    replay(events, 50)
    batches = len(events) // 50
    for name in ("lr_change", "lr_range", "memory_growth", "batch_size_impact", "stalled_run", "step_time",
                 "gradient_explosion", "gradient_variance", "loss_divergence"):
        assert fallbacks.get(name, 0) <= batches // 3, (name, fallbacks.get(name), batches)
