"""Score lossguard's detectors and the baselines on real public training logs (``real/``).

Every run is a log somebody else made — a Hugging Face ``trainer_state.json`` committed to a repository, a
log pasted into a GitHub issue, a logbook — labelled by hand from the human evidence quoted beside it in
``real/labels.json`` (source URL, licence note, label, onset, evidence). Each file goes through
``stream_app.replay.replay_file`` with default settings: exactly what ``lossguard replay FILE`` runs.

Real logs are sparse (one point every 10–500 steps) and often short, so the score counts **logged points**,
not steps: onset, detection delay, episodes and the healthy denominator are all in points (the event of
one step, all its metrics merged, is one point). A failing run is caught when a high/critical firing alert
comes at or after the point ``TOLERANCE`` points before the labelled onset; a non-finite failure counts as
caught "at the step" when a high/critical alert comes at the onset's very step. False alarms are high/critical episodes on healthy runs and
before onset on failing ones; "noise" is every medium-or-worse firing alert there.

    python benchmarks/detection/real_logs.py                 # report half, markdown table
    python benchmarks/detection/real_logs.py --split tune    # the half used for diagnosis and tuning
    python benchmarks/detection/real_logs.py --run ID -v     # one run's alerts, for diagnosis

Writes benchmarks/results/detection-real.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import BASELINES  # noqa: E402
from run import (  # noqa: E402
    FA_BUDGET,
    LOSSGUARD,
    Run,
    best_combination,
    interval_json,
    interval_line,
    markdown_table,
    summarize,
    union_outcomes,
)

from detectors.aliases import canonical_metrics  # noqa: E402
from stream_app.replay import ReplayError, read_events, replay_file  # noqa: E402

REAL = HERE / "real"
RESULTS = HERE.parent / "results" / "detection-real.json"
LABELS = ("nonfinite", "divergence", "spike", "plateau", "overfit", "reward_collapse", "rl_other")
HIGH = ("high", "critical")
MEDIUM_OR_WORSE = ("medium", "high", "critical")


def load_labels(real: Path = REAL) -> list[dict[str, Any]]:
    return json.loads((real / "labels.json").read_text())["runs"]


def load_run(real: Path, label: Mapping[str, Any]) -> Run:
    """The run's logged points as (point index, canonical metrics); the onset as a point index."""
    path = real / label["file"]
    by_step: dict[int, dict[str, float]] = {}
    for event in read_events(path, run_id=label["run_id"]):
        by_step.setdefault(event.step, {}).update(canonical_metrics(event.metrics))
    steps = sorted(by_step)
    onset = label.get("onset_step")
    index = None if onset is None else next((i for i, s in enumerate(steps) if s >= onset), len(steps) - 1)
    points = [(i, by_step[s]) for i, s in enumerate(steps)]
    columns = frozenset(name for _, metrics in points for name in metrics)
    run = Run(label["run_id"], label["label"], index, points, columns, path, dict(label))
    run.label["step_of_point"] = steps
    return run


def lossguard_alerts(run: Run) -> tuple[list[int], list[dict[str, Any]], list[int]]:
    """Points of high/critical firing alerts, all alerts in brief, and points of medium-or-worse ones."""
    point_of = {s: i for i, s in enumerate(run.label["step_of_point"])}
    high, brief, noisy = [], [], []
    for alert in replay_file(run.path, run_id=run.run_id):
        point = point_of.get(alert.step, 0)
        brief.append({"step": alert.step, "point": point, "status": alert.status, "severity": alert.severity,
                      "alert_type": alert.alert_type, "message": alert.message})
        if alert.status != "firing":
            continue
        if alert.severity in HIGH:
            high.append(point)
        if alert.severity in MEDIUM_OR_WORSE:
            noisy.append(point)
    return high, brief, noisy


def baseline_alarms(run: Run, cls) -> list[int]:
    baseline = cls(run.columns)
    return [point for point, metrics in run.steps if baseline.update(point, metrics)]


def nonfinite_at_step(runs: Sequence[Run], briefs: Mapping[str, list[dict[str, Any]]]) -> tuple[int, int]:
    """(caught, total) non-finite failures with a high/critical alert at the onset's very step."""
    failing = [r for r in runs if r.failure == "nonfinite"]
    caught = sum(any(a["status"] == "firing" and a["severity"] in HIGH
                     and a["step"] == r.label["step_of_point"][r.onset] for a in briefs[r.run_id]) for r in failing)
    return caught, len(failing)


def healthy_excerpts(labels: Sequence[Mapping[str, Any]], real: Path = REAL,
                     lengths: Sequence[int] = (4, 8, 16, 30)) -> dict[int, dict[str, Any]]:
    """Healthy runs cut into excerpts of ``lengths`` points (windows at half-length strides), each replayed
    as a run of its own — what a healthy log pasted into an issue or a chat looks like: no warm-up history,
    the fragment rules in play. By length: excerpts, and those with a high/critical alert (by type)."""
    from detectors.events import MetricEvent
    from stream_app.replay import replay_events

    out = {n: {"excerpts": 0, "paging": 0, "by_type": {}} for n in lengths}
    for label in labels:
        if label["label"] != "healthy":
            continue
        by_step: dict[int, list[MetricEvent]] = {}
        for event in read_events(real / label["file"], run_id=label["run_id"]):
            by_step.setdefault(event.step, []).append(event)
        steps = sorted(by_step)
        for n in lengths:
            for start in range(0, len(steps) - n + 1, max(1, n // 2)):
                run_id = f"{label['run_id']}[{start}:{start + n}]"
                events = [MetricEvent(run_id, e.step, e.metrics, ts=e.ts) for s in steps[start:start + n]
                          for e in by_step[s]]
                paging = {a.alert_type for a in replay_events(events)
                          if a.status == "firing" and a.severity in HIGH}
                out[n]["excerpts"] += 1
                out[n]["paging"] += bool(paging)
                for kind in paging:
                    out[n]["by_type"][kind] = out[n]["by_type"].get(kind, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("tune", "report", "all"), default="report")
    p.add_argument("--real", type=Path, default=REAL, help="corpus folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default: %(default)s)")
    p.add_argument("--run", help="only this run (diagnosis)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run's outcome and alerts")
    p.add_argument("--excerpts", action="store_true",
                   help="also replay the split's healthy runs cut into 4-30-point excerpts (see healthy_excerpts)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    labels = [lab for lab in load_labels(args.real)
              if (args.split == "all" or lab["split"] == args.split) and (not args.run or lab["run_id"] == args.run)]
    runs, refused = [], {}
    for label in labels:
        try:
            runs.append(load_run(args.real, label))
        except ReplayError as exc:
            refused[label["run_id"]] = str(exc)
    if not runs:
        raise SystemExit(f"no runs of split {args.split!r} in {args.real}")
    raw: dict[str, dict[str, list[int]]] = {LOSSGUARD: {}}
    briefs, noise = {}, {}
    for run in runs:
        raw[LOSSGUARD][run.run_id], briefs[run.run_id], noise[run.run_id] = lossguard_alerts(run)
        for cls in BASELINES:
            raw.setdefault(cls.name, {})[run.run_id] = baseline_alarms(run, cls)
    baseline_names = [cls.name for cls in BASELINES]
    outcomes = {name: union_outcomes(runs, raw, [name]) for name in raw}
    tune_labels = [lab for lab in load_labels(args.real) if lab["split"] == "tune"]
    tune_runs = [load_run(args.real, lab) for lab in tune_labels if lab["run_id"] not in refused]
    tune_raw = {cls.name: {r.run_id: baseline_alarms(r, cls) for r in tune_runs} for cls in BASELINES}
    combo, _ = best_combination(tune_runs, tune_raw, baseline_names)
    combo_name, all_name = "best baselines ≤1 FA/10k", "all baselines"
    outcomes[combo_name] = union_outcomes(runs, raw, combo)
    outcomes[all_name] = union_outcomes(runs, raw, baseline_names)
    methods = [LOSSGUARD, *baseline_names, combo_name, all_name]
    summaries = {m: summarize(runs, outcomes[m], LABELS) for m in methods}
    healthy_points = summaries[LOSSGUARD]["healthy_steps"]
    noisy = sum(1 for r in runs for point in noise[r.run_id] if point < r.healthy_until)
    caught, nonfinite = nonfinite_at_step(runs, briefs)
    results = {
        "split": args.split, "runs": len(runs), "failing_runs": sum(r.failure != "healthy" for r in runs),
        "points": sum(len(r.steps) for r in runs), "refused": refused, "best_combination": combo,
        "fa_budget": FA_BUDGET,
        "lossguard": {"medium_or_worse_per_10k": 1e4 * noisy / healthy_points if healthy_points else None,
                      "medium_or_worse": noisy, "nonfinite_at_step": [caught, nonfinite]},
        "intervals_95": interval_json(summaries[LOSSGUARD], noisy),
        "methods": summaries,
        "per_run": {r.run_id: {"failure": r.failure, "onset_point": r.onset, "points": len(r.steps),
                               "source_url": r.label.get("source_url"),
                               "outcomes": {m: outcomes[m][r.run_id] for m in methods},
                               "lossguard_alerts": briefs[r.run_id]} for r in runs},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    results["table_markdown"] = markdown_table(results, methods, LABELS, unit="points")
    if args.excerpts:
        results["healthy_excerpts"] = healthy_excerpts(labels, args.real)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.verbose:
        for r in runs:
            o = outcomes[LOSSGUARD][r.run_id]
            print(f"{r.run_id} [{r.failure} onset={r.onset} points={len(r.steps)}] detected={o['detected_at']} "
                  f"FA={o['false_alarms']}")
            for a in briefs[r.run_id]:
                if a["status"] == "firing":
                    print(f"   p{a['point']} s{a['step']} {a['severity']:8} {a['alert_type']}: {a['message']}")
    print(f"real logs, split={args.split}: {len(runs)} runs ({results['failing_runs']} failing), "
          f"{results['points']} points, {len(refused)} refused; cells: recall at high/critical · median delay in "
          f"logged points; best combination (chosen on tune): {' + '.join(combo) or 'none'}\n")
    print(results["table_markdown"])
    m = results["lossguard"]
    print(f"\nlossguard: non-finite caught at the step {caught}/{nonfinite}; medium-or-worse alerts per 10k healthy "
          f"points {m['medium_or_worse_per_10k']:.1f} ({noisy})")
    print(interval_line(summaries[LOSSGUARD], results["intervals_95"], "points"))
    if args.excerpts:
        for n, e in results["healthy_excerpts"].items():
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(e["by_type"].items(), key=lambda kv: -kv[1]))
            print(f"healthy excerpts of {n} points: {e['paging']} of {e['excerpts']} page "
                  f"({e['paging'] / max(1, e['excerpts']):.1%}){': ' + kinds if kinds else ''}")
    for rid, why in refused.items():
        print(f"refused: {rid}: {why}")
    print(f"({results['seconds']}s; details in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
