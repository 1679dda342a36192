"""``lossguard replay``: run the detectors offline over a logged run — no Kafka, same alerts.

    lossguard replay FILE... [--config C] [--run-id ID] [--out alerts.jsonl]

A FILE is one of

* CSV: a ``step`` column (or an alias such as Bedrock's ``step_number``) and one column per metric; an
  empty cell means "not logged at that step", ``nan``/``inf``/``-inf`` mean a non-finite value *was*
  logged. Bedrock's ``step_number, epoch_number, training_loss, perplexity`` and validation
  ``validation_loss`` files read as they are; an optional ``ts`` column gives unix seconds.
* JSONL metric events, one per line (their own ``run_id``s, unless ``--run-id`` is given; the file stem
  where they have none).
* a Hugging Face ``trainer_state.json``: its ``log_history`` entries; eval entries give ``val_loss``.

Metric names go through the alias map. Entries of one run at the same step are merged into one event.
The run id is the file stem, or ``--run-id`` for all files — which is how a Bedrock training CSV and its
validation CSV become one run. Alerts are written as JSONL alert events; exit 0 when the replay ran
(alerts or not), 2 on bad input, with the file, line and column in the message.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from detectors import Alert, DetectorSuite, MetricEvent, RunDriver, SchemaError, load_detectors
from detectors.aliases import canonical_name
from detectors.config import ConfigError
from detectors.driver import DetectorLoadError

from .settings import load_settings

__all__ = ["ReplayError", "read_events", "replay_events", "replay_file", "replay_files", "add_parser"]

EXIT_BAD_INPUT = 2
#: columns that carry the step (after the alias map)
_STEP_COLUMNS = {"step", "global_step", "iteration", "iter", "trainer/global_step"}
_TS_COLUMNS = {"ts", "timestamp", "time"}
#: HF log_history keys that describe the entry rather than measure the step
_HF_SKIP = {"step", "epoch", "total_flos"}


class ReplayError(ValueError):
    """Input that cannot be replayed; the message names file, line and column where known."""

    def __init__(self, path: str | os.PathLike, reason: str, line: int | None = None, column: str | None = None):
        where = str(path) + (f":{line}" if line is not None else "") + (f": column {column!r}" if column else "")
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.column, self.reason = str(path), line, column, reason


def _cell(path: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text)  # float() reads nan, inf, -inf, Infinity as well
    except ValueError:
        raise ReplayError(path, f"expected a number (or nan/inf/-inf, or empty), got {text!r}", line, column) from None


def _read_csv(path: Path, run_id: str) -> list[MetricEvent]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ReplayError(path, "empty file: expected a header with a 'step' column", 1) from None
        steps = [i for i, h in enumerate(header) if h.lower() in _STEP_COLUMNS or canonical_name(h) == "step"]
        if not steps:
            raise ReplayError(path, f"no 'step' column in the header {header}", 1)
        step_col = steps[0]
        ts_cols = [i for i, h in enumerate(header) if h.lower() in _TS_COLUMNS]
        events: list[MetricEvent] = []
        offset, last_step, last_epoch = 0, None, None
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ReplayError(path, f"{len(row)} cells where the header has {len(header)}", line)
            raw_step = row[step_col].strip()
            step_value = _cell(path, line, header[step_col], raw_step) if raw_step else math.nan
            if not math.isfinite(step_value) or not step_value.is_integer():
                raise ReplayError(path, f"step must be an integer, got {raw_step!r}", line, header[step_col])
            metrics: dict[str, float] = {}
            for i, (name, text) in enumerate(zip(header, row, strict=True)):
                if i == step_col or i in ts_cols or not text.strip():
                    continue
                metrics[name] = _cell(path, line, name, text.strip())
            epoch = metrics.get("epoch_number", metrics.get("epoch"))
            step = int(step_value)
            # Bedrock restarts step numbers every epoch: keep them increasing across epochs
            if last_step is not None and step + offset <= last_step and epoch is not None and epoch != last_epoch:
                offset = last_step
            step += offset
            last_step, last_epoch = step, epoch
            ts = _cell(path, line, header[ts_cols[0]], row[ts_cols[0]]) if ts_cols and row[ts_cols[0]].strip() \
                else float(step)
            events.append(MetricEvent(run_id=run_id, step=step, metrics=metrics, ts=ts, source="replay-csv"))
        return events


def _read_jsonl(path: Path, run_id: str, override: bool) -> list[MetricEvent]:
    events = []
    with path.open() as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                doc = json.loads(text)
            except ValueError as exc:
                raise ReplayError(path, f"not valid JSON ({exc})", line) from None
            if isinstance(doc, dict):
                if override:
                    doc["run_id"] = run_id
                doc.setdefault("run_id", run_id)
                doc.setdefault("ts", float(doc["step"]) if isinstance(doc.get("step"), int) else None)
            try:
                events.append(MetricEvent.from_dict(doc))
            except SchemaError as exc:
                raise ReplayError(path, exc.reason, line, exc.field) from None
    return events


def _read_trainer_state(path: Path, doc: Any, run_id: str) -> list[MetricEvent]:
    history = doc.get("log_history") if isinstance(doc, dict) else None
    if not isinstance(history, list):
        raise ReplayError(path, "a JSON file must be a Hugging Face trainer_state.json with a 'log_history' list")
    events = []
    for i, entry in enumerate(history):
        where = f"log_history[{i}]"
        if not isinstance(entry, dict):
            raise ReplayError(path, f"{where}: expected an object, got {entry!r}")
        if "train_runtime" in entry:
            continue  # the end-of-training summary: its train_loss is an average, not a step
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ReplayError(path, f"{where}: 'step' must be an integer, got {step!r}", column="step")
        metrics = {}
        for name, value in entry.items():
            if name in _HF_SKIP or isinstance(value, str) and value not in ("NaN", "Infinity", "-Infinity"):
                continue
            try:
                metrics[name] = float(value) if not isinstance(value, str) else {
                    "NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
            except (TypeError, ValueError):
                raise ReplayError(path, f"{where}: expected a number, got {value!r}", column=name) from None
        events.append(MetricEvent(run_id=run_id, step=step, metrics=metrics, ts=float(step), source="replay-hf"))
    return events


def read_events(path: str | os.PathLike, run_id: str | None = None) -> list[MetricEvent]:
    """The metric events in a CSV, JSONL or ``trainer_state.json`` file (kind from suffix, else content).

    ``run_id`` names the run of every event (default: the file stem; JSONL events keep their own).
    """
    p = Path(path)
    rid = run_id or p.stem
    try:
        if p.suffix.lower() in (".csv", ".tsv"):
            return _read_csv(p, rid)
        text = p.read_text()
    except FileNotFoundError:
        raise ReplayError(p, "no such file") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReplayError(p, f"cannot read it ({exc})") from None
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(p, rid, run_id is not None)
    try:
        doc = json.loads(text)
    except ValueError:
        if text.lstrip().startswith("{"):
            return _read_jsonl(p, rid, run_id is not None)
        if "," in text.partition("\n")[0]:
            return _read_csv(p, rid)
        raise ReplayError(p, "not CSV, JSONL or a trainer_state.json") from None
    if isinstance(doc, dict) and "log_history" not in doc and "metrics" in doc:
        return _read_jsonl(p, rid, run_id is not None)  # a one-event JSONL file
    return _read_trainer_state(p, doc, rid)


def _merge_by_step(events: Iterable[MetricEvent]) -> dict[str, list[MetricEvent]]:
    """Events grouped per run, one per step (metrics merged, later files win), in step order."""
    runs: dict[str, dict[int, MetricEvent]] = defaultdict(dict)
    for e in events:
        seen = runs[e.run_id].get(e.step)
        if seen is None:
            runs[e.run_id][e.step] = MetricEvent(run_id=e.run_id, step=e.step, metrics=dict(e.metrics), ts=e.ts,
                                                 source=e.source, tags=dict(e.tags))
        else:
            seen.metrics.update(e.metrics)
            seen.tags.update(e.tags)
            seen.ts = max(seen.ts, e.ts)
    return {rid: [by_step[s] for s in sorted(by_step)] for rid, by_step in runs.items()}


def _detector_config(config: Mapping[str, Any] | str | os.PathLike | None) -> Mapping[str, Any] | None:
    if config is None or isinstance(config, Mapping):
        return config
    return load_settings(config).detector_config


def replay_events(events: Iterable[MetricEvent],
                  config: Mapping[str, Any] | str | os.PathLike | None = None) -> list[Alert]:
    """Run a fresh detector suite per run over ``events`` (merged per step, in step order)."""
    cfg = _detector_config(config)
    alerts: list[Alert] = []
    for run_events in _merge_by_step(events).values():
        alerts.extend(RunDriver(DetectorSuite(cfg)).feed(run_events))
    return alerts


def replay_files(paths: Iterable[str | os.PathLike], config: Mapping[str, Any] | str | os.PathLike | None = None,
                 run_id: str | None = None) -> list[Alert]:
    """Replay several files; with ``run_id`` they are one run, else each file is the run named by its stem."""
    events: list[MetricEvent] = []
    for path in paths:
        events.extend(read_events(path, run_id))
    return replay_events(events, config)


def replay_file(path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None,
                run_id: str | None = None) -> list[Alert]:
    """The alerts the detectors raise over one logged run."""
    return replay_files([path], config, run_id)


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        load_detectors(args.detector)
    except DetectorLoadError as exc:
        print(f"lossguard replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        config = load_settings(args.config).detector_config if args.config else None
        alerts = replay_files(args.files, config, args.run_id)
    except ReplayError as exc:
        print(f"lossguard replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"lossguard replay: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    lines = b"".join(a.to_json() + b"\n" for a in alerts)
    if args.out:
        Path(args.out).write_bytes(lines)
    else:
        sys.stdout.buffer.write(lines)
        sys.stdout.flush()
    firing = Counter(a.severity for a in alerts if a.status == "firing")
    summary = ", ".join(f"{firing[s]} {s}" for s in ("critical", "high", "medium", "low") if firing[s]) or "none"
    print(f"lossguard replay: {len(alerts)} alert event(s) ({summary} firing)"
          + (f" written to {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("replay", parents=[common], help="run the detectors offline over logged runs",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE", help="CSV, JSONL metric events, or trainer_state.json")
    p.add_argument("--run-id", help="run id for all files (default: each file's stem)")
    p.add_argument("--out", help="write alerts here as JSONL (default stdout)")
    p.add_argument("--detector", action="append", default=[], metavar="MODULE:CLASS",
                   help="also run this Detector subclass (repeatable; entry points of lossguard.detectors load too)")
    p.set_defaults(func=cmd_replay)
