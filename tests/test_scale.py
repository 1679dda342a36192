"""Two workers split 6 partitions; SIGKILL one and its runs move to the other with their state."""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter

import pytest

from detectors import MetricEvent
from stream_app.cli import main as lossguard
from tests.conftest import Topics, collect_alerts
from tests.stream_fixtures import healthy, send, wait_runs

pytestmark = pytest.mark.slow
RUNS = sorted(f"run-{i}" for i in range(12))


def owned(worker, topic: str) -> set[int]:
    """The metrics partitions the worker's latest assignment gave it (from its info log)."""
    tables = re.findall(rf"\| {re.escape(topic)}\s+\| \{{([\d, -]*)\}}", worker.log())
    parts: set[int] = set()
    for item in tables[-1].split(",") if tables else ():
        low, _, high = item.strip().partition("-")  # Faust writes runs as "0-5"
        parts.update(range(int(low), int(high or low) + 1))
    return parts


def wait_owned(workers, topic: str, sizes: list[int], timeout: float = 60.0) -> list[set[int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [owned(w, topic) for w in workers]
        if [len(p) for p in parts] == sizes:
            return parts
        time.sleep(0.5)
    return [owned(w, topic) for w in workers]


@pytest.fixture
def topics(bootstrap: str) -> Topics:
    return Topics(bootstrap, partitions=6)


def test_killing_a_worker_moves_its_runs_with_their_state_and_pages_nothing_twice(topics, start_worker,
                                                                                   capsys, monkeypatch):
    workers = [start_worker(extra_env={"LOSSGUARD_LOG_LEVEL": "info"}) for _ in range(2)]
    metrics = topics.name("metrics")
    split = wait_owned(workers, metrics, [3, 3])
    assert [len(p) for p in split] == [3, 3], "the two workers did not split the 6 partitions"
    # warm-up done on both workers (loss-spike needs 20 steps), batched 5 steps per record
    send(topics.bootstrap, metrics, [e for run in RUNS for e in healthy(run, range(0, 25))], batch=5)
    runs = wait_runs(topics.bootstrap, topics.app_id,
                     lambda r: len(r) == len(RUNS) and all(s.events == 25 for s in r.values()))
    assert sorted(runs) == RUNS and all(s.events == 25 for s in runs.values()), workers[0].log()[-2000:]

    workers[0].stop(signal.SIGKILL)
    assert wait_owned(workers[1:], metrics, [6])[0] == set(range(6)), workers[1].log()[-2000:]
    # after the kill: more steps, a NaN, and a loss spike for every run
    after = [e for run in RUNS for e in healthy(run, range(25, 30))]
    after += [MetricEvent(run, 30, {"loss": float("nan")}, ts=1_030.0) for run in RUNS]
    after += [MetricEvent(run, 31, {"loss": 9.0}, ts=1_031.0) for run in RUNS]
    send(topics.bootstrap, metrics, after)

    def missing(alerts):
        kinds = {(a.run_id, a.alert_type) for a in alerts}
        return [(run, t) for run in RUNS for t in ("nonfinite_metric", "loss_spike") if (run, t) not in kinds]

    alerts = collect_alerts(topics, lambda found: not missing(found), timeout=90)
    if missing(alerts):
        runs = wait_runs(topics.bootstrap, topics.app_id, lambda r: False, timeout=1)
        states = {r: (s.events, s.duplicates, s.last_step) for r, s in runs.items()}
        log = workers[1].log()
        pytest.fail(f"missing alerts {missing(alerts)}; runs {states}\n{log[:6000]}\n...\n{log[-6000:]}")
    spikes = {a.run_id: a.step for a in alerts if a.alert_type == "loss_spike"}
    assert spikes == dict.fromkeys(RUNS, 31), "warm-up state was lost for some runs"

    # every event processed once: 32 steps per run, whatever the kill replayed counts as duplicates
    runs = wait_runs(topics.bootstrap, topics.app_id, lambda r: all(s.events == 32 for s in r.values()))
    assert {run: s.events for run, s in runs.items()} == dict.fromkeys(RUNS, 32), {r: (s.events, s.duplicates, s.out_of_order, s.resumes, s.last_step) for r, s in runs.items() if s.events != 32}
    # after dedup by id, one firing alert per (run, type, episode): nobody is paged twice
    unique = {a.alert_id: a for a in alerts}
    episodes = Counter((a.run_id, a.alert_type, a.metadata["episode_step"], a.severity, a.status)
                       for a in unique.values())
    assert max(episodes.values()) == 1

    monkeypatch.setenv("LOSSGUARD_BOOTSTRAP", topics.bootstrap)
    assert lossguard(["runs", "--json", "--prefix", topics.prefix, "--app-id", topics.app_id]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["run_id"] for r in listed) == RUNS
    assert all(r["last_step"] == 31 and r["alerts"]["critical"] >= 1 for r in listed)
