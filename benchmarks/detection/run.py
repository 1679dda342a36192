"""Score lossguard's detectors and the baselines on the labelled corpus of real training runs.

Every run is replayed step by step, through a fresh ``DetectorSuite`` (one per run, as the worker
keeps one per run) and through each baseline in baselines.py. A method *detects* a failing run when
it raises a high/critical alarm at or after ``onset - TOLERANCE``; alarms before that, and any alarm
on a healthy run, are false alarms. Alarms are counted as episodes: an alarm within ``EPISODE_GAP``
steps of the previous one continues the same episode (lossguard's own alerts already are episodes).
The table reports, per failure type and overall, recall and median detection delay (steps after onset),
and high/critical false alarms per 10k healthy steps (healthy runs + the pre-onset part of failing runs).

    python benchmarks/detection/run.py                    # report half, prints the markdown table
    python benchmarks/detection/run.py --split tune       # the half used for tuning and diagnosis
    python benchmarks/detection/run.py --quick            # one run per type: a smoke test
    python benchmarks/detection/run.py --regenerate       # rebuild the corpus first

Writes benchmarks/results/detection.json (per method, per type and per run details).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import BASELINES  # noqa: E402
from generate import CORPUS, FAILURE_TYPES, corpus_specs, generate  # noqa: E402

from detectors import Alert, DetectorSuite, MetricEvent  # noqa: E402

try:  # the product's own offline path (`lossguard replay`); the bare suite where it is not there
    from stream_app.replay import replay_file
except ImportError:  # pragma: no cover
    replay_file = None

RESULTS = HERE.parent / "results" / "detection.json"
TOLERANCE = 2  # an alarm this many steps before the labelled onset still counts as a detection
EPISODE_GAP = 20  # alarms closer than this continue one episode (lossguard's resolve_after)
FA_BUDGET = 1.0  # false alarms per 10k healthy steps allowed to the "best combination" of baselines
LOSSGUARD = "lossguard"

T0 = 1_700_000_000.0


def intervals(detected: int, failing: int, alarms: int, healthy: int) -> dict[str, list[float] | None]:
    """95 % intervals for what a half this small can say: recall (Wilson score interval of a binomial) and
    alarms per 10k healthy points/steps (exact Poisson interval) — scipy's, not hand-written formulas. A
    tune/report gap inside both halves' intervals is as likely the luck of the split as over-fitting."""
    from scipy.stats import binomtest, chi2

    recall = None
    if failing:
        ci = binomtest(detected, failing).proportion_ci(confidence_level=0.95, method="wilson")
        recall = [round(ci.low, 3), round(ci.high, 3)]
    per_10k = None
    if healthy:
        low = chi2.ppf(0.025, 2 * alarms) / 2 if alarms else 0.0
        high = chi2.ppf(0.975, 2 * alarms + 2) / 2
        per_10k = [round(1e4 * low / healthy, 1), round(1e4 * high / healthy, 1)]
    return {"recall": recall, "per_10k": per_10k}


def interval_json(summary: Mapping[str, Any], noisy: int) -> dict[str, Any]:
    """The 95 % intervals of lossguard's figures (``summary`` as :func:`summarize` gives it), for the
    results file and :func:`interval_line`."""
    overall, healthy = summary["overall"], summary["healthy_steps"]
    return {"high_critical": intervals(overall["detected"], overall["runs"], summary["false_alarms"], healthy),
            "medium_or_worse_per_10k": intervals(0, 0, noisy, healthy)["per_10k"]}


def interval_line(summary: Mapping[str, Any], ci: Mapping[str, Any], unit: str) -> str:
    """One line: lossguard's recall and alarm rates with their 95 % intervals (``ci``: :func:`interval_json`)."""
    def pct(pair: list[float] | None) -> str:
        return "–" if pair is None else f"{pair[0]:.0%}–{pair[1]:.0%}"

    def rate(pair: list[float] | None) -> str:
        return "–" if pair is None else f"{pair[0]:.1f}–{pair[1]:.1f}"

    overall, fa = summary["overall"], ci["high_critical"]
    return (f"95 % intervals: recall {overall['detected']}/{overall['runs']} → {pct(fa['recall'])}; high/critical FA "
            f"per 10k healthy {unit} {rate(fa['per_10k'])}; medium-or-worse {rate(ci['medium_or_worse_per_10k'])}")


# -- the corpus and its split ----------------------------------------------------------------------
def split_of_runs() -> dict[str, str]:
    """run_id → "tune" | "report": alternate within each failure type (healthy included) in corpus order,
    so both halves hold every failure type, task and optimizer in the same proportions."""
    seen: dict[str, int] = {}
    split = {}
    for spec in corpus_specs():
        i = seen.get(spec.failure, 0)
        seen[spec.failure] = i + 1
        split[spec.run_id] = "tune" if i % 2 == 0 else "report"
    return split


@dataclass
class Run:
    run_id: str
    failure: str
    onset: int | None
    steps: list[tuple[int, dict[str, float]]]
    columns: frozenset[str]
    path: Path
    label: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy_until(self) -> int:
        """Steps before this step are healthy (all of a healthy run; the pre-onset part of a failing one)."""
        if self.onset is None:
            return self.steps[-1][0] + 1 if self.steps else 0
        return max(0, self.onset - TOLERANCE)

    @property
    def healthy_steps(self) -> int:
        return sum(1 for step, _ in self.steps if step < self.healthy_until)


def read_run_csv(path: Path) -> tuple[list[tuple[int, dict[str, float]]], frozenset[str]]:
    """Rows of a run CSV as (step, {metric: value}); an empty cell is a metric not logged at that step."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = []
        for cells in reader:
            metrics = {name: float(cell) for name, cell in zip(header[1:], cells[1:], strict=True) if cell != ""}
            rows.append((int(cells[0]), metrics))
    return rows, frozenset(header[1:])


def load_runs(corpus: Path, split: str, quick: bool) -> list[Run]:
    labels = json.loads((corpus / "labels.json").read_text())
    assignment = split_of_runs()
    runs = []
    taken: dict[str, int] = {}
    for label in labels["runs"]:
        if split != "all" and assignment.get(label["run_id"]) != split:
            continue
        if quick:  # one run per failure type, three healthy ones
            if taken.get(label["failure"], 0) >= (3 if label["failure"] == "healthy" else 1):
                continue
            taken[label["failure"]] = taken.get(label["failure"], 0) + 1
        path = corpus / f"{label['run_id']}.csv"
        rows, columns = read_run_csv(path)
        runs.append(Run(label["run_id"], label["failure"], label["onset"], rows, columns, path, label))
    return runs


# -- methods: step → alarm ------------------------------------------------------------------------------
def lossguard_alerts(run: Run) -> list[Alert]:
    """Every alert lossguard raises over the run: through ``stream_app.replay.replay_file`` (what
    ``lossguard replay FILE`` runs) when it exists, else a fresh ``DetectorSuite`` fed row by row."""
    if replay_file is not None:
        return replay_file(run.path, run_id=run.run_id)
    suite = DetectorSuite()
    alerts: list[Alert] = []
    for step, metrics in run.steps:
        alerts.extend(suite.update(MetricEvent(run_id=run.run_id, step=step, metrics=dict(metrics),
                                               ts=T0 + step, source="benchmark")))
    return alerts


def lossguard_alarms(run: Run) -> tuple[list[int], list[dict[str, Any]], int]:
    """Steps at which lossguard raised a high/critical firing alert, those alerts in brief, and how many
    medium-or-worse firing alerts came while the run was healthy (the noise an on-call person sees)."""
    steps, alerts, noisy = [], [], 0
    for alert in lossguard_alerts(run):
        if alert.status != "firing" or alert.severity == "low":
            continue
        noisy += alert.step < run.healthy_until
        if alert.severity == "medium":
            continue
        steps.append(alert.step)
        alerts.append({"step": alert.step, "detector": alert.detector, "alert_type": alert.alert_type,
                       "severity": alert.severity, "message": alert.message})
    return steps, alerts, noisy


def baseline_alarms(run: Run, cls) -> list[int]:
    baseline = cls(run.columns)
    return [step for step, metrics in run.steps if baseline.update(step, metrics)]


def episodes(steps: Iterable[int]) -> list[int]:
    """First step of each alarm episode (alarms within EPISODE_GAP of the previous one merge)."""
    starts: list[int] = []
    last = None
    for s in sorted(steps):
        if last is None or s - last > EPISODE_GAP:
            starts.append(s)
        last = s
    return starts


# -- scoring -----------------------------------------------------------------------------------------
def run_outcome(run: Run, alarm_steps: Sequence[int]) -> dict[str, Any]:
    """False alarms before onset (or anywhere on a healthy run) and the first detection, if any."""
    before = [s for s in alarm_steps if s < run.healthy_until]
    after = [s for s in alarm_steps if s >= run.healthy_until] if run.onset is not None else []
    first = min(after) if after else None
    return {"false_alarms": episodes(before),
            "detected_at": first,
            "delay": None if first is None else max(0, first - run.onset)}


def summarize(runs: Sequence[Run], outcomes: Mapping[str, dict[str, Any]],
              kinds: Sequence[str] = FAILURE_TYPES) -> dict[str, Any]:
    healthy_steps = sum(r.healthy_steps for r in runs)
    fa = sum(len(outcomes[r.run_id]["false_alarms"]) for r in runs)
    per_type = {}
    for kind in kinds:
        failing = [r for r in runs if r.failure == kind]
        if not failing:
            continue
        delays = [outcomes[r.run_id]["delay"] for r in failing if outcomes[r.run_id]["delay"] is not None]
        per_type[kind] = {"runs": len(failing), "detected": len(delays), "recall": len(delays) / len(failing),
                          "median_delay": statistics.median(delays) if delays else None}
    failing = [r for r in runs if r.failure != "healthy"]
    delays = [outcomes[r.run_id]["delay"] for r in failing if outcomes[r.run_id]["delay"] is not None]
    return {
        "per_type": per_type,
        "overall": {"runs": len(failing), "detected": len(delays),
                    "recall": len(delays) / len(failing) if failing else None,
                    "median_delay": statistics.median(delays) if delays else None},
        "false_alarms": fa,
        "healthy_steps": healthy_steps,
        "fa_per_10k": 1e4 * fa / healthy_steps if healthy_steps else None,
    }


def union_outcomes(runs: Sequence[Run], raw: Mapping[str, Mapping[str, list[int]]],
                   names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {r.run_id: run_outcome(r, sorted({s for n in names for s in raw[n][r.run_id]})) for r in runs}


def best_combination(runs: Sequence[Run], raw: Mapping[str, Mapping[str, list[int]]],
                     names: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """The subset of baselines with the highest recall at ≤ FA_BUDGET false alarms per 10k healthy steps
    (ties: lower median delay, then fewer baselines)."""
    best: tuple | None = None
    for k in range(1, len(names) + 1):
        for combo in itertools.combinations(names, k):
            summary = summarize(runs, union_outcomes(runs, raw, combo))
            if summary["fa_per_10k"] is not None and summary["fa_per_10k"] > FA_BUDGET:
                continue
            key = (-(summary["overall"]["recall"] or 0), summary["overall"]["median_delay"] or math.inf, k)
            if best is None or key < best[0]:
                best = (key, list(combo))
    return (best[1], best[0]) if best else ([], ())


# -- the table ---------------------------------------------------------------------------------------------
def cell(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("recall") is None:
        return "–"
    delay = entry["median_delay"]
    return f"{100 * entry['recall']:.0f}% · {'–' if delay is None else f'{delay:g}'}"


def markdown_table(results: Mapping[str, Any], methods: Sequence[str], kinds: Sequence[str] = FAILURE_TYPES,
                   unit: str = "steps") -> str:
    short = {m: m.split("_", 1)[-1] if m.startswith(("keras", "lightning", "llmfoundry", "smdebug", "river"))
             else m for m in methods}
    short.update({"wandb_zscore": "z-score(30,3σ)"})
    lines = ["| failure type (runs) | " + " | ".join(short.get(m, m) for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    summaries = results["methods"]
    for kind in [k for k in kinds if k in summaries[methods[0]]["per_type"]]:
        n = summaries[methods[0]]["per_type"][kind]["runs"]
        lines.append(f"| {kind} ({n}) | " + " | ".join(cell(summaries[m]["per_type"].get(kind)) for m in methods)
                     + " |")
    n = summaries[methods[0]]["overall"]["runs"]
    lines.append(f"| **overall** ({n}) | " + " | ".join(f"**{cell(summaries[m]['overall'])}**" for m in methods)
                 + " |")
    steps = summaries[methods[0]]["healthy_steps"]
    lines.append(f"| high/critical FA per 10k healthy {unit} ({steps} {unit}) | "
                 + " | ".join(f"{summaries[m]['fa_per_10k']:.1f} ({summaries[m]['false_alarms']})" for m in methods)
                 + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("tune", "report", "all"), default="report")
    p.add_argument("--quick", action="store_true", help="one run per failure type and three healthy runs")
    p.add_argument("--corpus", type=Path, default=CORPUS, help="corpus folder (default: %(default)s)")
    p.add_argument("--regenerate", action="store_true", help="rebuild the corpus before scoring")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default: %(default)s)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.regenerate or not (args.corpus / "labels.json").exists():
        generate(args.corpus, force=args.regenerate)
    runs = load_runs(args.corpus, args.split, args.quick)
    if not runs:
        raise SystemExit(f"no runs of split {args.split!r} in {args.corpus}")
    baseline_names = [cls.name for cls in BASELINES]
    raw: dict[str, dict[str, list[int]]] = {LOSSGUARD: {}}
    lossguard_alerts, noise = {}, {}
    for run in runs:
        raw[LOSSGUARD][run.run_id], lossguard_alerts[run.run_id], noise[run.run_id] = lossguard_alarms(run)
        for cls in BASELINES:
            raw.setdefault(cls.name, {})[run.run_id] = baseline_alarms(run, cls)
    outcomes = {name: union_outcomes(runs, raw, [name]) for name in raw}
    # The combination is chosen on the tune half and then scored on the half being reported.
    tune_runs = runs if args.split == "tune" else load_runs(args.corpus, "tune", args.quick)
    tune_raw = raw if args.split == "tune" else {
        cls.name: {r.run_id: baseline_alarms(r, cls) for r in tune_runs} for cls in BASELINES}
    combo, _ = best_combination(tune_runs, tune_raw, baseline_names)
    combo_name, all_name = "best baselines ≤1 FA/10k", "all baselines"
    outcomes[combo_name] = union_outcomes(runs, raw, combo)
    outcomes[all_name] = union_outcomes(runs, raw, baseline_names)
    methods = [LOSSGUARD, *baseline_names, combo_name, all_name]
    results = {
        "split": args.split, "quick": args.quick, "tolerance": TOLERANCE, "episode_gap": EPISODE_GAP,
        "runs": len(runs), "failing_runs": sum(r.failure != "healthy" for r in runs),
        "best_combination": combo,
        "methods": {m: summarize(runs, outcomes[m]) for m in methods},
        "lossguard": {"medium_or_worse": sum(noise.values()),
                      "medium_or_worse_per_10k": 1e4 * sum(noise.values()) / max(1, sum(r.healthy_steps for r in runs)),
                      "nonfinite_at_step": [sum(outcomes[LOSSGUARD][r.run_id]["delay"] == 0 for r in runs
                                                if r.failure == "nonfinite"),
                                            sum(r.failure == "nonfinite" for r in runs)]},
        "per_run": {r.run_id: {"failure": r.failure, "onset": r.onset, "steps": len(r.steps),
                               "outcomes": {m: outcomes[m][r.run_id] for m in methods},
                               "lossguard_alerts": lossguard_alerts[r.run_id]} for r in runs},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    results["intervals_95"] = interval_json(results["methods"][LOSSGUARD], results["lossguard"]["medium_or_worse"])
    results["table_markdown"] = markdown_table(results, methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"split={args.split} runs={len(runs)} (failing {results['failing_runs']}); cells: recall · median "
          f"delay in steps; best combination (chosen on tune): {' + '.join(combo) or 'none'}\n")
    print(results["table_markdown"])
    m = results["lossguard"]
    print(f"\nlossguard: non-finite caught at the step {m['nonfinite_at_step'][0]}/{m['nonfinite_at_step'][1]}; "
          f"medium-or-worse alerts per 10k healthy steps {m['medium_or_worse_per_10k']:.1f} ({m['medium_or_worse']})")
    print(interval_line(results["methods"][LOSSGUARD], results["intervals_95"], "steps"))
    print(f"({results['seconds']}s; details in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
