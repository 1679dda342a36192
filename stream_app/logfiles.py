"""The training logs people already have, read into metric events for ``lossguard replay``.

* **CSV / TSV** — a step column (``step``, ``Step``, ``_step``, ``global_step``, ``iteration``, Bedrock's
  ``step_number`` …; else a whole-number ``epoch`` column, as Keras' CSVLogger writes) and one column per
  metric. An empty cell means "not logged at that step";
  ``nan``/``inf``/``-inf`` mean a non-finite value *was* logged. A column of dates, ISO times or unix
  timestamps (``date``, ``ts``, ``_timestamp``, ``Wall time`` …) is time; a log kept by date (a logbook,
  one row a day) has no step column and its rows are numbered in order. Any other column whose first
  value is not a number (a run name, notes) is skipped with one notice — a real log is never refused for
  an extra column. TensorBoard's CSV download (``Wall time,Step,Value``) takes its metric from the file
  name TensorBoard gives it (``run-NAME-tag-TAG.csv``) or ``--metric``; a file whose metric cannot be
  identified is an error that says so, never an empty result. W&B exports read as they are: history
  exports (``_step``, ``train/loss``, ``_timestamp``, a run-name column, whose values name the runs) and
  chart exports (``Step``, ``RUN - train/loss``, with their ``__MIN``/``__MAX`` columns skipped).
  Stable-Baselines3's ``monitor.csv`` (a ``#{"t_start": …}`` line, then ``r,l,t``: one row per episode)
  reads as ``episode_reward``, ``episode_length`` and the time, its rows numbered by episode; every 100th row
  also carries ``episode_reward_mean``, those 100 episodes' mean return (the reward the detectors watch).
* **JSONL** — lossguard metric events, or flat records such as W&B's ``wandb-history.jsonl``
  (``{"_step": 3, "train/loss": 2.1, "_timestamp": …}``).
* **Hugging Face ``trainer_state.json``** — its ``log_history``; eval entries give ``val_loss``.
* **TensorBoard event files** (``events.out.tfevents.*``, or a log directory holding them), read with
  TensorBoard's own reader (``pip install 'lossguard[tensorboard]'``): every scalar tag.

Metric names go through the alias map later (the suite canonicalizes them). A file's run id is its stem,
or, for files whose name says nothing (``trainer_state.json``, ``metrics.csv``, event files), the name of
the folder they are in (``checkpoint-*`` and ``version_*`` folders are skipped).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from detectors import MetricEvent, SchemaError
from detectors.aliases import canonical_name

__all__ = ["ReplayError", "read_events", "run_id_of"]

#: step columns, in order of preference (compared lower-case, after the alias map)
_STEP_COLUMNS = ("step", "_step", "global_step", "trainer/global_step", "iteration", "iter", "it",
                 "optimizer_step", "train/global_step")
#: time columns: unix seconds, or dates / ISO times (compared lower-case)
_TIME_COLUMNS = ("ts", "timestamp", "_timestamp", "wall time", "wall_time", "walltime", "time", "date",
                 "datetime", "created_at", "day")
#: columns that name the run a row belongs to (W&B exports)
_RUN_COLUMNS = ("name", "run", "run_name", "run_id", "run name")
#: bookkeeping columns that measure nothing about training
_SKIP_COLUMNS = ("_runtime", "_wandb", "runtime", "total_flos")
#: Stable-Baselines3's Monitor columns (``monitor.csv``): an episode's return, its length in steps, and the
#: seconds since the header's ``t_start``
_MONITOR_COLUMNS = {"r": "episode_reward", "l": "episode_length", "t": "time"}
#: a Monitor file's episodes per reward point (SB3's own ``rollout/ep_rew_mean`` averages the last 100)
_MONITOR_WINDOW = 100
#: file names that say nothing about the run: the folder names it instead
_GENERIC_STEMS = {"trainer_state", "metrics", "log", "logs", "history", "wandb-history", "events", "progress",
                  "scalars", "train", "training", "log_history", "results"}
_MONITOR_FILE = re.compile(r"^(\d+\.)?monitor\.csv$", re.IGNORECASE)
_GENERIC_FOLDER = re.compile(r"^(checkpoint-\d+|version_\d+|run-\d+|logs?|files|\.)$")
#: HF log_history keys that describe the entry rather than measure the step
_HF_SKIP = {"step", "epoch", "total_flos"}
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_TB_FILE = re.compile(r"-tag-(?P<tag>.+)\.csv$", re.IGNORECASE)
_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d.%m.%Y", "%m/%d/%Y", "%b %d, %Y", "%B %d, %Y", "%d %b %Y",
                 "%d %B %Y", "%Y-%m-%d %H:%M:%S", "%Y/%m/%d %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M")

#: glog's time stamp: an optional severity letter, MMDD, then the clock
_GLOG_TIME = re.compile(r"^[IWEF]?(?P<month>\d\d)(?P<day>\d\d) (?P<clock>\d\d:\d\d:\d\d(?:\.\d+)?)$")

Notice = Callable[[str], None]


class ReplayError(ValueError):
    """Input that cannot be replayed; the message names file, line and column where known."""

    def __init__(self, path: str | os.PathLike, reason: str, line: int | None = None, column: str | None = None):
        where = str(path) + (f":{line}" if line is not None else "") + (f": column {column!r}" if column else "")
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.column, self.reason = str(path), line, column, reason


def run_id_of(path: str | os.PathLike) -> str:
    """The run id a file stands for: its stem, or its folder's name when the file name is generic.

    >>> run_id_of("runs/whisper-small-ta/checkpoint-4000/trainer_state.json")
    'whisper-small-ta'
    >>> run_id_of("logs/exp7/events.out.tfevents.1700000000.host.1.0"), run_id_of("sweep/lr3e-4.csv")
    ('exp7', 'lr3e-4')
    >>> run_id_of("logs/ppo_breakout/0.monitor.csv")
    'ppo_breakout'
    """
    p = Path(path)
    stem = p.name.split(".")[0] if p.name.startswith("events.out.tfevents") else p.stem
    # Stable-Baselines3's monitor.csv, 0.monitor.csv (one per worker) say nothing either: the folder is the run
    if stem.lower() not in _GENERIC_STEMS and not _MONITOR_FILE.match(p.name):
        return stem
    for folder in Path(os.path.abspath(p)).parents:
        if folder.name and not _GENERIC_FOLDER.match(folder.name):
            return folder.name
    return stem


def read_events(path: str | os.PathLike, run_id: str | None = None, notice: Notice | None = None,
                metric: str | None = None) -> list[MetricEvent]:
    """The metric events in one log file (or TensorBoard log directory); the kind comes from the name,
    else the content.

    ``run_id`` names the run of every event (default: :func:`run_id_of`; JSONL events and W&B rows with a
    run name keep their own). ``notice`` receives one line per thing skipped (a text column, say);
    ``metric`` names the metric of a single-value file (TensorBoard's ``Wall time,Step,Value``).
    """
    p = Path(path)
    say = notice or (lambda text: None)
    rid = run_id or run_id_of(p)
    if p.is_dir() or p.name.startswith("events.out.tfevents"):
        return _read_tensorboard(p, run_id, say)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ReplayError(p, "no such file") from None
    except OSError as exc:
        raise ReplayError(p, f"cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReplayError(p, f"cannot read it: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_table(p, text, rid, run_id is not None, say, metric, "\t" if suffix == ".tsv" else ",")
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p, text, rid, run_id is not None)
    try:
        doc = json.loads(text)
    except ValueError:
        if text.lstrip().startswith("{"):
            return _read_jsonl(p, text, rid, run_id is not None)
        first = text.partition("\n")[0]
        if "," in first or "\t" in first:
            return _read_table(p, text, rid, run_id is not None, say, metric, "\t" if "\t" in first else ",")
        raise ReplayError(p, "not CSV, JSONL, a trainer_state.json or TensorBoard event file") from None
    if isinstance(doc, dict) and "log_history" not in doc:
        return _read_jsonl(p, text, rid, run_id is not None)  # a one-record JSONL file
    return _read_trainer_state(p, doc, rid, say)


# -- CSV ---------------------------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    try:
        return float(text)  # float() reads nan, inf, -inf, Infinity as well
    except ValueError:
        return None


def _time(text: str) -> float | None:
    """Unix seconds from a number, an ISO date/time, a common date format or glog's ``I0515 11:05:31.873651``
    (UTC when no zone is given).

    >>> _time("I0515 11:05:51.320263") - _time("0515 11:05:31.873651")
    19.446612
    """
    value = _number(text)
    if value is not None:
        return value if math.isfinite(value) else None
    text = text.strip()
    glog = _GLOG_TIME.match(text)
    if glog:  # glog's "I0515 11:05:31.873651" (Caffe, darknet forks...): no year, one is assumed (2000, a leap year)
        text = f"2000-{glog['month']}-{glog['day']} {glog['clock']}"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        for fmt in _DATE_FORMATS:
            try:
                moment = datetime.strptime(text, fmt)
                break
            except ValueError:
                continue
        else:
            return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _first_value(rows: list[list[str]], i: int) -> str | None:
    return next((row[i].strip() for row in rows if i < len(row) and row[i].strip()), None)


def _read_table(path: Path, text: str, run_id: str, fixed_run: bool, say: Notice, metric: str | None,
                delimiter: str) -> list[MetricEvent]:
    t_start, first_line = 0.0, 1
    if text.startswith("#{"):  # Stable-Baselines3's Monitor: {"t_start": unix seconds, "env_id": …} above r,l,t
        comment, _, text = text.partition("\n")
        first_line = 2
        try:
            t_start = float(json.loads(comment[1:]).get("t_start") or 0.0)
        except (ValueError, TypeError, AttributeError):
            raise ReplayError(path, "a '#' first line that is not Stable-Baselines3's Monitor header "
                                    "({\"t_start\": …})", 1) from None
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)]
    if not rows:
        raise ReplayError(path, "empty file: expected a header with a 'step' column", first_line)
    header = [h.strip() for h in rows[0]]
    body = [(line, row) for line, row in enumerate(rows[1:], start=first_line + 1)
            if row and any(c.strip() for c in row)]
    cells = [row for _, row in body]
    lower = [h.lower() for h in header]
    monitor = set(lower) - set(_STEP_COLUMNS) == set(_MONITOR_COLUMNS)
    if monitor:  # one row per episode: its return, its length, and the seconds since t_start
        header = [_MONITOR_COLUMNS.get(h, h) for h in lower]
        lower = [h.lower() for h in header]

    step_col = next((lower.index(name) for name in _STEP_COLUMNS if name in lower), None)
    if step_col is None:
        step_col = next((i for i, h in enumerate(header) if canonical_name(h) == "step"), None)
    if step_col is None and "epoch" in lower:  # Keras' CSVLogger: one row per epoch, numbered by 'epoch'
        i = lower.index("epoch")
        numbers = [_number(row[i]) for row in cells if i < len(row) and row[i].strip()]
        if numbers and all(v is not None and math.isfinite(v) and v.is_integer() for v in numbers):
            step_col = i
    time_col = next((lower.index(name) for name in _TIME_COLUMNS if name in lower), None)
    run_col = None if fixed_run else next((lower.index(name) for name in _RUN_COLUMNS if name in lower), None)
    metric_cols: dict[int, tuple[str | None, str]] = {}  # column → (run named in the header, metric)
    skipped = []
    for i, name in enumerate(header):
        if i in (step_col, time_col, run_col) or name.lower() in _SKIP_COLUMNS or name.endswith(("__MIN", "__MAX")):
            continue
        first = _first_value(cells, i)
        if first is not None and _number(first) is None:
            if time_col is None and _time(first) is not None:
                time_col = i  # a column of dates, whatever its name
            else:
                skipped.append(name)
            continue
        run, sep, tail = name.partition(" - ")
        metric_cols[i] = (run.strip(), tail.strip()) if sep and tail.strip() and not fixed_run else (None, name)
    if skipped:
        say(f"{path}: skipped column(s) {', '.join(map(repr, skipped))}: not numbers")
    if step_col is None and time_col is None:
        raise ReplayError(path, f"no 'step' column (nor a date/time column) in the header {header}", 1)
    for i, (run, name) in list(metric_cols.items()):
        if name.lower() == "value" and run is None:
            metric_cols[i] = (None, _single_value_metric(path, metric))
    if not metric_cols:
        raise ReplayError(path, f"no metric column in the header {header}: every column is a step, time, run "
                                f"name or text", 1)

    events: list[MetricEvent] = []
    offset, last_step, last_epoch = 0, None, None
    returns: list[float] = []  # a Monitor file's last episodes' returns
    for index, (line, row) in enumerate(body):
        if len(row) != len(header):
            raise ReplayError(path, f"{len(row)} cells where the header has {len(header)}", line)
        ts = None
        if time_col is not None and row[time_col].strip():
            ts = _time(row[time_col])
            if ts is None:
                raise ReplayError(path, f"expected a date, time or unix seconds, got {row[time_col]!r}", line,
                                  header[time_col])
            if monitor:
                ts += t_start
        if step_col is None:
            step = index  # a log kept by date: its rows in order
        else:
            raw_step = row[step_col].strip()
            value = _number(raw_step) if raw_step else math.nan
            if value is None or not math.isfinite(value) or not value.is_integer():
                raise ReplayError(path, f"step must be an integer, got {raw_step!r}", line, header[step_col])
            step = int(value)
        by_run: dict[str, dict[str, float]] = {}
        row_run = row[run_col].strip() if run_col is not None and row[run_col].strip() else run_id
        for i, (run, name) in metric_cols.items():
            cell = row[i].strip()
            if not cell:
                continue
            value = _number(cell)
            if value is None:
                raise ReplayError(path, f"expected a number (or nan/inf/-inf, or empty), got {cell!r}", line,
                                  header[i])
            by_run.setdefault(run or row_run, {})[name] = value
        if monitor and "episode_reward" in by_run.get(row_run, {}):
            # every 100 episodes, their mean return (as a logger that reports once per 100 episodes would): one
            # episode's return is far noisier than the batch means the reward detectors are made for, and a
            # mean over the last 100 taken at every episode moves by 1/100 of an episode a point — its
            # changes say nothing of its noise
            returns.append(by_run[row_run]["episode_reward"])
            if len(returns) == _MONITOR_WINDOW:
                by_run[row_run]["episode_reward_mean"] = math.fsum(returns) / len(returns)
                returns.clear()
        epoch = next((m.get("epoch_number", m.get("epoch")) for m in by_run.values()), None)
        # Bedrock restarts step numbers every epoch: keep them increasing across epochs
        if last_step is not None and step + offset <= last_step and epoch is not None and epoch != last_epoch:
            offset = last_step
        step += offset
        last_step, last_epoch = step, epoch
        for run, metrics in by_run.items():
            events.append(MetricEvent(run_id=run, step=step, metrics=metrics, ts=float(step) if ts is None else ts,
                                      source="replay-csv"))
    return events


def _single_value_metric(path: Path, metric: str | None) -> str:
    """The metric of a ``Wall time,Step,Value`` file: ``--metric``, else the tag in TensorBoard's file name."""
    if metric:
        return metric
    found = _TB_FILE.search(path.name)
    if found:
        return found["tag"]
    raise ReplayError(path, "a 'Value' column, but which metric is it? Name the file as TensorBoard does "
                            "(run-NAME-tag-TAG.csv, e.g. run-exp1-tag-train_loss.csv) or pass --metric NAME",
                      column="Value")


# -- JSONL -------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, text: str, run_id: str, override: bool) -> list[MetricEvent]:
    events = []
    for line, record in enumerate(text.splitlines(), start=1):
        if not record.strip():
            continue
        try:
            doc = json.loads(record)
        except ValueError as exc:
            raise ReplayError(path, f"not valid JSON ({exc})", line) from None
        if isinstance(doc, dict) and "metrics" not in doc:
            doc = _flat_record(path, line, doc)
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


def _flat_record(path: Path, line: int, doc: dict[str, Any]) -> dict[str, Any]:
    """A flat record (W&B's history, a logger's JSON lines) as a metric event: numbers are metrics."""
    step_key = next((k for k in doc if k.lower() in _STEP_COLUMNS), None)
    if step_key is None:
        raise ReplayError(path, f"a record with neither 'metrics' nor a step key ({', '.join(_STEP_COLUMNS[:4])})",
                          line)
    time_key = next((k for k in doc if k.lower() in _TIME_COLUMNS), None)
    metrics = {k: v for k, v in doc.items() if k not in (step_key, time_key) and k.lower() not in _SKIP_COLUMNS
               and (isinstance(v, (int, float)) and not isinstance(v, bool) or v in _NONFINITE)}
    out = {"step": doc[step_key], "metrics": metrics, "source": "replay-jsonl"}
    if time_key is not None:
        out["ts"] = _time(str(doc[time_key]))
    return out


# -- Hugging Face trainer_state.json ---------------------------------------------------------------------------
def _read_trainer_state(path: Path, doc: Any, run_id: str, say: Notice) -> list[MetricEvent]:
    history = doc.get("log_history") if isinstance(doc, dict) else None
    if not isinstance(history, list):
        raise ReplayError(path, "a JSON file must be a Hugging Face trainer_state.json with a 'log_history' list")
    events, stepless = [], []
    for i, entry in enumerate(history):
        where = f"log_history[{i}]"
        if not isinstance(entry, dict):
            raise ReplayError(path, f"{where}: expected an object, got {entry!r}")
        if "train_runtime" in entry:
            continue  # the end-of-training summary: its train_loss is an average, not a step
        if "step" not in entry and all(k == "epoch" or k.startswith(("predict_", "test_")) for k in entry):
            # a result logged outside the training loop (trainer.predict() per epoch writes predict_*
            # entries with an epoch and no step): not a point of the run's curve
            stepless.append(i)
            continue
        step = entry.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ReplayError(path, f"{where}: 'step' must be an integer, got {step!r}", column="step")
        metrics = {}
        for name, value in entry.items():
            if name in _HF_SKIP or isinstance(value, str) and value not in _NONFINITE:
                continue
            try:
                metrics[name] = float(value) if not isinstance(value, str) else _NONFINITE[value]
            except (TypeError, ValueError):
                raise ReplayError(path, f"{where}: expected a number, got {value!r}", column=name) from None
        events.append(MetricEvent(run_id=run_id, step=step, metrics=metrics, ts=float(step), source="replay-hf"))
    if stepless:
        names = sorted({k for i in stepless for k in history[i] if k != "epoch"})
        say(f"{path}: skipped {len(stepless)} log_history entr{'y' if len(stepless) == 1 else 'ies'} without a "
            f"'step' ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): results logged outside training")
    return events


# -- TensorBoard event files ------------------------------------------------------------------------------------
def _read_tensorboard(path: Path, run_id: str | None, say: Notice) -> list[MetricEvent]:
    try:
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util
    except ImportError:
        raise ReplayError(path, "reading TensorBoard event files needs TensorBoard's reader: "
                                "pip install 'lossguard[tensorboard]'") from None
    if not path.exists():
        raise ReplayError(path, "no such file")
    files = sorted(path.rglob("events.out.tfevents*")) if path.is_dir() else [path]
    if not files:
        raise ReplayError(path, "a folder without TensorBoard event files (events.out.tfevents.*)")
    events: list[MetricEvent] = []
    for file in files:
        acc = event_accumulator.EventAccumulator(str(file), size_guidance={event_accumulator.SCALARS: 0,
                                                                           event_accumulator.TENSORS: 0})
        try:
            acc.Reload()
        except Exception as exc:  # a truncated or foreign file: TensorBoard's reader raises its own kinds
            raise ReplayError(file, f"not a readable TensorBoard event file ({exc})") from None
        rid = run_id or run_id_of(file)
        values: list[tuple[str, int, float, float]] = []  # (tag, step, wall time, value)
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            values += [(tag, s.step, s.wall_time, float(s.value)) for s in acc.Scalars(tag)]
        for tag in tags.get("tensors", []):
            for t in acc.Tensors(tag):
                value = tensor_util.make_ndarray(t.tensor_proto)
                if value.size == 1 and value.dtype.kind in "fiu":
                    values.append((tag, t.step, t.wall_time, float(value.reshape(()))))
        points: dict[int, MetricEvent] = {}
        for tag, step, wall, value in values:
            event = points.get(step)
            if event is None:
                event = points[step] = MetricEvent(run_id=rid, step=step, metrics={}, ts=wall,
                                                   source="replay-tensorboard")
            event.metrics[tag] = value
            event.ts = max(event.ts, wall)
        if not points:
            say(f"{file}: no scalar values in it")
        events.extend(points[s] for s in sorted(points))
    return events
