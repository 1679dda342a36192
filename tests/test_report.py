"""The chart history kept with a run's summary, and the self-contained HTML report drawn in Chromium."""

from __future__ import annotations

import gc
import json
import math
import re

from detectors import Alert, MetricEvent
from stream_app.aggregates import RunSummary
from stream_app.history import History
from stream_app.report import render_html, summarize
from tests.browser import browser, open_page  # noqa: F401 — the fixture

T0 = 1_700_000_000.0


def _events(run_id: str, steps: int, spike_at: int, nan_at: int) -> list[MetricEvent]:
    return [MetricEvent(run_id, s, {"loss": math.nan if s == nan_at else 2.0 - s / 1000 + 0.05 * math.sin(s / 5),
                                    "grad_norm": 40.0 if s == spike_at else 1.0 + 0.1 * math.cos(s / 7),
                                    "lr": 1e-3, "step_time": 0.1}, ts=T0 + s) for s in range(steps)]


def test_history_is_bounded_keeps_spikes_and_is_the_same_by_batch_or_by_step():
    events = _events("h", 5000, spike_at=3217, nan_at=4000)
    one_by_one, batched = RunSummary("h"), RunSummary("h")
    for event in events:
        assert one_by_one.observe(event) == "new"
    for i in range(0, len(events), 128):
        assert batched.observe_new(events[i:i + 128])
    assert one_by_one.history.to_dict() == batched.history.to_dict()
    history = batched.history
    assert set(history.series) == {"loss", "grad_norm", "lr"}  # step_time is not charted
    assert all(len(points) <= history.max_points for points in history.series.values())
    assert (3217, 40.0) in history.series["grad_norm"]
    assert history.nonfinite["loss"] == [4000]
    steps = [p[0] for p in history.series["loss"]]
    assert steps == sorted(steps) and steps[0] < history.stride and steps[-1] >= 5000 - 2 * history.stride
    # it travels inside the run's table value and comes back whole
    restored = RunSummary.from_dict(json.loads(json.dumps(batched.to_dict())))
    assert restored.history.to_dict() == history.to_dict()
    restored.observe(MetricEvent("h", 5000, {"loss": 9.0}, ts=T0 + 5000))
    assert restored.history.series["loss"][-1] == (5000, 9.0)
    gc.collect()  # points are tuples of numbers: after a collection the garbage collector no longer tracks them
    assert not any(gc.is_tracked(p) for points in restored.history.series.values() for p in points)


def test_a_resumed_runs_replayed_steps_do_not_go_back_on_the_chart():
    history = History()
    for step in (1, 2, 3, 2, 3, 4):
        history.add(step, {"loss": float(step)})
    assert [p[0] for p in history.series["loss"]] == [1, 2, 3, 4]


def test_report_lists_every_episode_most_severe_first_and_draws_offline(browser, tmp_path):  # noqa: F811
    summary_state = RunSummary("rep")
    summary_state.observe_new(_events("rep", 600, spike_at=450, nan_at=590))
    critical = Alert.new(run_id="rep", step=3, detector="nonfinite", category="numerics",
                         alert_type="nonfinite_metric", severity="critical", message="loss is NaN at step 3",
                         ts=T0 + 3)
    # many later low alerts: the critical one at step 3 must still be in the report, first
    noise = [Alert.new(run_id="rep", step=100 + 20 * i, detector="step_time", category="performance",
                       alert_type="step_time_anomaly", severity="low", message=f"slow step {100 + 20 * i}",
                       ts=T0 + 100 + 20 * i) for i in range(15)]
    spike = Alert.new(run_id="rep", step=450, detector="gradient", category="gradient",
                      alert_type="gradient_explosion", severity="high", message="grad norm 40 > 10", ts=T0 + 450)
    summary = summarize("rep", [*noise, critical, spike])
    assert [e["alert_type"] for e in summary["episodes"][:2]] == ["nonfinite_metric", "gradient_explosion"]
    assert summary["total_alerts"] == 17 and sum(len(e["alerts"]) for e in summary["episodes"]) == 17

    run = {**summary_state.overview(), "first_ts": summary_state.first_ts, "windows": summary_state.windows,
           "history": summary_state.history.to_dict()}
    page_html = render_html(summary, run, {"gradient": {"explosion_threshold": 10.0}})
    assert "loss is NaN at step 3" in page_html and "explosion_threshold" in page_html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page_html), "the report must not load anything"
    assert "2023-11-14" in page_html  # times are dates, not Unix seconds
    out = tmp_path / "rep.report.html"
    out.write_text(page_html)

    errors: list[str] = []
    page = open_page(browser, out.as_uri(), errors)
    page.wait_for_selector(".lg-chart[data-metric=loss] canvas")
    charts = page.eval_on_selector_all(".lg-chart", "els => els.map(e => e.dataset.metric)")
    assert charts == ["loss", "grad_norm", "lr"]
    # the critical marker is drawn in its colour on the loss chart: sample the canvas column at step 3
    drawn = page.evaluate("""() => {
        const box = document.querySelector('.lg-chart[data-metric=loss]');
        const canvas = box.querySelector('canvas');
        const ctx = canvas.getContext('2d');
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let red = 0;
        for (let i = 0; i < data.length; i += 4)
            if (data[i] > 180 && data[i + 1] < 80 && data[i + 2] < 80) red++;
        return red;
    }""")
    assert drawn > 50, f"no critical-coloured marker pixels on the loss chart ({drawn})"
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert errors == []


def test_rlhf_metrics_are_charted_and_other_metrics_are_not():
    summary = RunSummary("ppo")
    summary.observe_new([MetricEvent("ppo", s, {"loss": 1.0, "reward_mean": 0.1 * s, "kl": 0.01 * s, "entropy": 2.0,
                                               "response_length": 100.0 + s, "clipfrac": 0.2}, ts=T0 + s)
                         for s in range(50)])
    assert set(summary.history.series) == {"loss", "reward_mean", "kl", "entropy", "response_length"}
