"""One wire format for both ends: the records the producers' sender subprocess writes (``sender_child.py``
run as a script, loading ``detectors/events.py`` by its path) are read back by the worker's record reader
into the events the training job logged — non-finite values, per-step tags and single events included."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

from detectors.events import MetricEvent, encode_metric_batch
from stream_app.intake import read_record

ROOT = Path(__file__).resolve().parents[1]

#: what a training job hands its sender: (run_id, step, ts, source, metrics, tags) per step
STEPS = [
    ("run-7", 10, 1700000000.0, "torch", {"loss": 2.5, "grad_norm": 1.25, "lr": 1e-3}, {"team": "nlp"}),
    ("run-7", 11, 1700000000.5, "torch", {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3},
     {"team": "nlp"}),
    ("run-7", 12, 1700000001.0, "torch", {"loss": 3, "grad_norm": -float("inf"), "note": "text"},
     {"team": "nlp", "attempt": "1"}),
]

#: the child's import, as ``SenderProcess`` starts it: a script whose folder is on sys.path
CHILD = textwrap.dedent("""
    import base64, json, sys
    sys.path.insert(0, sys.argv[1])
    import sender_child
    steps = json.loads(sys.argv[2], parse_constant=float)
    records = [sender_child.encode_steps(sender_child.pack_steps([tuple(s)], rss=None)) for s in steps]
    records.append(sender_child.encode_steps(sender_child.pack_steps([tuple(s) for s in steps], rss=None)))
    heavy = sorted(m for m in ("numpy", "detectors", "producers", "faust", "torch") if m in sys.modules)
    print(json.dumps({"records": [base64.b64encode(r).decode() for r in records], "heavy": heavy}))
""")


def _child_records() -> tuple[list[bytes], list[str]]:
    import base64

    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "producers"), json.dumps(STEPS)],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads(out.stdout)
    return [base64.b64decode(r) for r in doc["records"]], doc["heavy"]


def _expected() -> list[MetricEvent]:
    return [MetricEvent(run_id, step, {k: float(v) for k, v in metrics.items() if not isinstance(v, str)},
                        ts=ts, source=source, tags=tags) for run_id, step, ts, source, metrics, tags in STEPS]


def _same(got: list[MetricEvent], want: list[MetricEvent]) -> None:
    assert [(e.run_id, e.step, e.ts, e.source, e.tags) for e in got] == \
        [(e.run_id, e.step, e.ts, e.source, e.tags) for e in want]
    for g, w in zip(got, want, strict=True):
        assert g.metrics.keys() == w.metrics.keys()
        for name, value in w.metrics.items():
            assert (math.isnan(value) and math.isnan(g.metrics[name])) or g.metrics[name] == value, name


def test_sender_subprocess_records_decode_to_the_logged_steps_in_the_worker():
    records, heavy = _child_records()
    assert heavy == []  # the child stays light: the format module is loaded alone, by its path
    want = _expected()
    singles, batch = records[:-1], records[-1]
    for record, event in zip(singles, want, strict=True):
        assert b"NaN" not in record or b'"NaN"' in record  # never a bare NaN token
        _same(read_record(b"run-7", record), [event])
    assert b'"steps"' in batch
    _same(read_record(b"run-7", batch), want)


def test_in_process_encoders_write_the_same_bytes_as_the_sender_subprocess():
    records, _ = _child_records()
    want = _expected()
    assert [e.to_json() for e in want] == records[:-1]
    assert encode_metric_batch(want) == records[-1]
