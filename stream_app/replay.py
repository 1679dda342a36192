"""``lossguard replay``: run the detectors offline over a logged run — no Kafka, same alerts.

    lossguard replay FILE... [--config C] [--run-id ID] [--metric NAME] [--detector MODULE:CLASS] [--out F]

A FILE is a CSV/TSV log (a step column, or a date/time column for a log kept by date; TensorBoard's and
W&B's CSV exports too), JSONL (metric events or flat records such as W&B's history), a Hugging Face
``trainer_state.json``, or TensorBoard event files (a file or a log directory) — see
:mod:`stream_app.logfiles` for the rules. Metric names go through the alias map. Entries of one run at the
same step are merged into one event. The run id is the file's (its stem, or its folder for
``trainer_state.json`` and event files), or ``--run-id`` for all files — which is how a Bedrock training
CSV and its validation CSV become one run. Alerts are written as JSONL alert events; exit 0 when the
replay ran (alerts or not), 2 on bad input, with the file, line and column in the message. Columns it
skips (text, a run's notes) are named once on stderr. A log with no time column has no clock (its events
are read at one second per step): ``stalled_run`` stays out of it, since a gap in its step numbers is no
silence.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from detectors import Alert, DetectorSuite, MetricEvent, RunDriver, load_detectors
from detectors.aliases import canonical_name
from detectors.config import ConfigError
from detectors.driver import DetectorLoadError
from detectors.suite import enabled_detectors

from .logfiles import Notice, ReplayError, read_events
from .settings import load_settings

__all__ = ["ReplayError", "read_events", "replay_events", "replay_file", "replay_files", "add_parser"]

EXIT_BAD_INPUT = 2


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


def _unread_metrics(run_events: list[MetricEvent], suite: DetectorSuite) -> list[str]:
    """The run's metric names when no detector but the non-finite check reads any of them, else []."""
    names = {name for e in run_events for name in e.metrics}
    canonical = tuple({canonical_name(name) for name in names})
    if any(d.metrics is not None and d.reads(canonical) for d in suite.detectors.values()):
        return []
    return sorted(names)


def replay_events(events: Iterable[MetricEvent],
                  config: Mapping[str, Any] | str | os.PathLike | None = None,
                  notice: Notice | None = None) -> list[Alert]:
    """Run a fresh detector suite per run over ``events`` (merged per step, in step order). ``notice`` is
    told about a run whose metrics no detector reads (only a non-finite value could alert there)."""
    cfg = _detector_config(config)
    alerts: list[Alert] = []
    makers: dict[bool, Callable[[], DetectorSuite]] = {}  # the config validated once, not per run
    for run_id, run_events in _merge_by_step(events).items():
        # a log with no clock is read at one second per step (logfiles): a jump in its step numbers (an
        # excerpt's gap, a sparse logging interval) is no silence, so stalled_run does not judge it
        clockless = all(e.ts == e.step for e in run_events)
        if clockless not in makers:
            chosen = [name for name in enabled_detectors(cfg) if name != "stalled_run"] if clockless else None
            makers[clockless] = DetectorSuite.factory(cfg, chosen)
        suite = makers[clockless]()
        unread = _unread_metrics(run_events, suite)
        if unread and notice is not None:
            shown = ", ".join(unread[:8]) + (", ..." if len(unread) > 8 else "")
            notice(f"run {run_id}: no detector reads any of its metrics ({shown}), so only a non-finite value "
                   f"can alert; name the loss column 'loss' (or a name detectors/aliases.py maps)")
        alerts.extend(RunDriver(suite).feed(run_events))
    return alerts


def replay_files(paths: Iterable[str | os.PathLike], config: Mapping[str, Any] | str | os.PathLike | None = None,
                 run_id: str | None = None, notice: Notice | None = None, metric: str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[Alert]:
    """Replay several files; with ``run_id`` they are one run, else each file is the run it names.
    ``progress(done, total)`` is called after each file is read."""
    paths = list(paths)
    events: list[MetricEvent] = []
    for done, path in enumerate(paths, start=1):
        events.extend(read_events(path, run_id, notice, metric))
        if progress is not None:
            progress(done, len(paths))
    return replay_events(events, config, notice)


def _terminal_progress(done: int, total: int) -> None:
    """One line on stderr, rewritten in place, for a terminal only (a pipe or a log gets none)."""
    end = "\n" if done == total else ""
    print(f"\rlossguard replay: read {done}/{total} files", end=end, file=sys.stderr, flush=True)


def replay_file(path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None,
                run_id: str | None = None, notice: Notice | None = None, metric: str | None = None) -> list[Alert]:
    """The alerts the detectors raise over one logged run."""
    return replay_files([path], config, run_id, notice, metric)


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        load_detectors(args.detector)
    except DetectorLoadError as exc:
        print(f"lossguard replay: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        config = load_settings(args.config).detector_config if args.config else None
        alerts = replay_files(args.files, config, args.run_id,
                              lambda text: print(f"lossguard replay: note: {text}", file=sys.stderr), args.metric,
                              _terminal_progress if sys.stderr.isatty() and len(args.files) > 1 else None)
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
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="CSV/TSV, JSONL, trainer_state.json, or TensorBoard event files (a file or a log folder)")
    p.add_argument("--run-id", help="run id for all files (default: each file's stem, or its folder's name)")
    p.add_argument("--metric", help="the metric of a single-value file (TensorBoard's Wall time,Step,Value CSV)")
    p.add_argument("--out", help="write alerts here as JSONL (default stdout)")
    p.add_argument("--detector", action="append", default=[], metavar="MODULE:CLASS",
                   help="also run this Detector subclass (repeatable; entry points of lossguard.detectors load too)")
    p.set_defaults(func=cmd_replay)
