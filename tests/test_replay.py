"""``lossguard replay`` on the three file kinds (and Bedrock CSVs), through a real subprocess."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import _detector_series as series
import pytest

from detectors import decode_alert
from stream_app.replay import ReplayError, read_events, replay_file

ROOT = Path(__file__).resolve().parent.parent
HIGH = ("high", "critical")


def lossguard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stream_app", "replay", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return path


def cell(x: float) -> str:
    return repr(x) if math.isfinite(x) else {math.inf: "inf", -math.inf: "-inf"}.get(x, "nan")


def test_csv_with_gaps_and_nonfinite_cells(tmp_path):
    events = series.supervised("nan").events
    rows = []
    for e in events:
        rows.append({"step": e.step, "train/loss": cell(e.metrics["loss"]),
                     # grad norm only logged every other step: the empty cells must not read as zeros
                     "grad_norm": cell(e.metrics["grad_norm"]) if e.step % 2 == 0 else None,
                     "learning_rate": e.metrics["lr"]})
    path = write_csv(tmp_path / "digits-nan.csv", rows, ["step", "train/loss", "grad_norm", "learning_rate"])
    out = tmp_path / "alerts.jsonl"
    proc = lossguard(str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    alerts = [decode_alert(line) for line in out.read_text().splitlines()]
    assert {a.run_id for a in alerts} == {"digits-nan"}
    first_high = [a for a in alerts if a.severity in HIGH]
    assert first_high[0].alert_type == "nonfinite_metric" and first_high[0].step == 180
    assert "nonfinite" not in {a.detector for a in alerts if a.step < 180}
    # the Python function gives the very same alerts
    assert [a.alert_id for a in replay_file(path)] == [a.alert_id for a in alerts]
    assert all(e.metrics.get("grad_norm") is None for e in read_events(path) if e.step % 2)


def test_jsonl_events_to_stdout(tmp_path):
    path = tmp_path / "run.jsonl"
    events = series.supervised("lr_jump").events
    path.write_text("".join(e.to_json().decode() + "\n" for e in events))
    proc = lossguard(str(path), "--run-id", "jump")
    assert proc.returncode == 0, proc.stderr
    alerts = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert ("lr_sudden_change", "critical", 150) in {(a.alert_type, a.severity, a.step) for a in alerts}
    assert {a.run_id for a in alerts} == {"jump"}
    assert "alert event(s)" in proc.stderr


def test_trainer_state_json_with_eval_entries(tmp_path):
    events = series.supervised("overfit").events
    history = []
    for e in events:
        history.append({"epoch": e.step / 10, "grad_norm": e.metrics["grad_norm"], "learning_rate": e.metrics["lr"],
                        "loss": e.metrics["loss"], "step": e.step + 1})
        if "val_loss" in e.metrics:
            history.append({"epoch": e.step / 10, "eval_loss": e.metrics["val_loss"], "eval_runtime": 0.1,
                            "step": e.step + 1})
    # the end-of-training summary; its train_loss is an average and must not read as a step's loss
    history.append({"epoch": 30.0, "step": len(events), "total_flos": 1.0, "train_loss": 99.0,
                    "train_runtime": 10.0, "train_samples_per_second": 100.0})
    # trainer.predict() after each epoch, as a real ChatGLM fine-tune saved it: no step at all
    history += [{"epoch": float(n), "predict_loss": 0.6 - n / 10, "predict_rouge-1": 47.0 + n} for n in (1, 2)]
    path = tmp_path / "whisper-small-ta" / "checkpoint-500" / "trainer_state.json"  # as HF saves it
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"global_step": len(events), "log_history": history}))
    proc = lossguard(str(path))
    assert proc.returncode == 0, proc.stderr
    alerts = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert any(a.alert_type == "val_train_divergence" and a.severity in HIGH for a in alerts)
    assert {a.run_id for a in alerts} == {"whisper-small-ta"}  # the run's folder, not "trainer_state"
    assert not any(a.alert_type == "loss_spike" and a.step == len(events) for a in alerts)
    assert "skipped 2 log_history entries without a 'step' (predict_loss, predict_rouge-1)" in proc.stderr


def test_bedrock_training_and_validation_csvs_make_one_run(tmp_path):
    events = series.supervised("lr_jump").events
    train = write_csv(tmp_path / "step_wise_training_metrics.csv",
                      [{"step_number": e.step, "epoch_number": 0, "training_loss": cell(e.metrics["loss"]),
                        "perplexity": cell(math.exp(min(e.metrics["loss"], 700)))} for e in events],
                      ["step_number", "epoch_number", "training_loss", "perplexity"])
    val = write_csv(tmp_path / "validation_metrics.csv",
                    [{"step_number": e.step, "epoch_number": 0, "validation_loss": cell(e.metrics["loss"] * 1.1)}
                     for e in events if e.step % 25 == 0],
                    ["step_number", "epoch_number", "validation_loss"])
    merged = read_events(train, "job") + read_events(val, "job")
    assert {e.step for e in merged if "validation_loss" in e.metrics} == set(range(0, 300, 25))
    alerts = replay_file(train, run_id="job")
    proc = lossguard(str(train), str(val), "--run-id", "job")
    assert proc.returncode == 0, proc.stderr
    both = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert {a.run_id for a in both} == {"job"}
    assert any(a.alert_type == "loss_spike" and a.severity in HIGH and 150 <= a.step <= 155 for a in both)
    assert len(alerts) >= 1


@pytest.mark.parametrize("content,suffix,expected", [
    ("step,loss\n1,2.3\n2,abc\n", ".csv", ":3: column 'loss'"),
    ("loss,lr\n2.3,0.1\n", ".csv", "no 'step' column (nor a date/time column)"),
    ("Wall time,Step,Value\n1700000000.5,1,2.3\n", ".csv", "column 'Value': a 'Value' column, but which metric"),
    ("step,loss\n1.5,2.3\n", ".csv", ":2: column 'step'"),
    ('{"run_id": "r", "step": 1, "metrics": {"loss": 1}}\n{"run_id": "r", "step": 2, "metrics": {"loss": "high"}}\n',
     ".jsonl", ":2: column 'metrics.loss'"),
    ('{"log_history": [{"loss": 1.0}]}', ".json", "log_history[0]: 'step' must be an integer"),
])
def test_bad_input_exits_2_naming_file_line_and_column(tmp_path, content, suffix, expected):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ReplayError, match=None) as err:
        replay_file(path)
    assert expected in str(err.value)
    if suffix == ".csv" and "abc" in content:  # one real subprocess per failure kind is enough
        proc = lossguard(str(path))
        assert proc.returncode == 2
        assert str(path) in proc.stderr and expected in proc.stderr


def test_missing_file_and_bad_config_exit_2(tmp_path):
    proc = lossguard(str(tmp_path / "nope.csv"))
    assert proc.returncode == 2 and "no such file" in proc.stderr
    good = write_csv(tmp_path / "ok.csv", [{"step": 1, "loss": 1.0}], ["step", "loss"])
    config = tmp_path / "lossguard.toml"
    config.write_text("[gradient]\nexplosion_treshold = 3.0\n")
    proc = lossguard(str(good), "--config", str(config))
    assert proc.returncode == 2 and "gradient.explosion_treshold" in proc.stderr


def test_config_file_changes_thresholds(tmp_path):
    events = series.supervised("lr_jump").events
    path = write_csv(tmp_path / "jump.csv", [{"step": e.step, "lr": e.metrics["lr"]} for e in events], ["step", "lr"])
    config = tmp_path / "lossguard.toml"
    config.write_text("[learning_rate]\nmax_lr = 10.0\n")
    default = {a.alert_type for a in replay_file(path)}
    relaxed = {a.alert_type for a in replay_file(path, config=config)}
    assert "lr_too_high" in default and "lr_too_high" not in relaxed


# -- the logs people have: time columns, text columns, TensorBoard and W&B exports ---------------------------
def _climbing(n: int = 60) -> list[float]:
    """A loss that learns for a third of the run, then climbs from about 3 to about 1000."""
    return [3.0 - s / 40 if s < n // 3 else 2.5 * 1.2 ** (s - n // 3) for s in range(n)]


def test_tensorboard_csv_export_reads_value_as_the_tagged_metric(tmp_path):
    path = tmp_path / "run-exp1-tag-train_loss.csv"  # the name TensorBoard's download gives it
    path.write_text("Wall time,Step,Value\n" + "".join(
        f"{1_700_000_000 + 30 * s},{10 * s},{x!r}\n" for s, x in enumerate(_climbing())))
    events = read_events(path)
    assert [e.metrics for e in events[:2]] == [{"train_loss": 3.0}, {"train_loss": 3.0 - 1 / 40}]
    assert events[1].ts == 1_700_000_030 and events[1].step == 10
    proc = lossguard(str(path))
    assert proc.returncode == 0, proc.stderr
    alerts = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert any(a.severity in HIGH and a.status == "firing" for a in alerts), alerts
    # the same file under another name needs --metric, and says so
    other = tmp_path / "export.csv"
    other.write_bytes(path.read_bytes())
    proc = lossguard(str(other))
    assert proc.returncode == 2 and "--metric" in proc.stderr
    assert [e.metrics for e in read_events(other, metric="loss")[:1]] == [{"loss": 3.0}]


def test_logbook_by_date_with_a_notes_column(tmp_path):
    path = tmp_path / "logbook.csv"
    rows = ["date,lm loss,notes"]
    for day, x in enumerate([2.9, 2.7, 2.6, 2.5, 2.45, 2.4, float("nan"), 2.4]):
        note = '"restarted from ckpt, spike"' if day == 5 else ""
        rows.append(f"2022-03-{day + 1:02d},{x},{note}")
    path.write_text("\n".join(rows) + "\n")
    proc = lossguard(str(path))
    assert proc.returncode == 0, proc.stderr
    assert "skipped column(s) 'notes'" in proc.stderr
    events = read_events(path)
    assert [e.step for e in events] == list(range(8))
    assert events[1].ts - events[0].ts == 86_400
    alerts = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert [(a.alert_type, a.severity, a.step) for a in alerts if a.status == "firing"][:1] == [
        ("nonfinite_metric", "critical", 6)]


def test_wandb_history_exports_csv_and_jsonl(tmp_path):
    climbing = _climbing()
    csv_path = tmp_path / "wandb_export.csv"
    lines = ["Name,_step,_runtime,_timestamp,train/loss,train/learning_rate"]
    for name, xs in (("good-run", [3.0 - s / 40 for s in range(60)]), ("bad-run", climbing)):
        lines += [f"{name},{s},{s * 2.0},{1_700_000_000 + 2 * s},{x!r},0.0003" for s, x in enumerate(xs)]
    csv_path.write_text("\n".join(lines) + "\n")
    events = read_events(csv_path)
    assert {e.run_id for e in events} == {"good-run", "bad-run"}
    assert events[0].metrics == {"train/loss": 3.0, "train/learning_rate": 0.0003}
    alerts = replay_file(csv_path)
    assert {a.run_id for a in alerts if a.severity in HIGH} == {"bad-run"}

    jsonl = tmp_path / "wandb-history.jsonl"
    jsonl.parent.joinpath("files").mkdir()
    jsonl = jsonl.parent / "files" / "wandb-history.jsonl"
    jsonl.write_text("".join(json.dumps({"_step": s, "_runtime": s * 2.0, "_timestamp": 1_700_000_000 + 2 * s,
                                         "train/loss": x, "train/epoch": s / 60}) + "\n"
                             for s, x in enumerate(climbing)))
    events = read_events(jsonl)
    assert events[3].step == 3 and events[3].ts == 1_700_000_006 and "_runtime" not in events[3].metrics
    assert {e.run_id for e in events} == {tmp_path.name}  # "files" and the generic stem name nothing
    assert any(a.severity in HIGH for a in replay_file(jsonl))


def test_wandb_chart_export_splits_runs_and_skips_min_max(tmp_path):
    path = tmp_path / "chart.csv"
    lines = ["Step,a - train/loss,a - train/loss__MIN,a - train/loss__MAX,b - train/loss"]
    lines += [f"{s},{3.0 - s / 40},{2.9 - s / 40},{3.1 - s / 40},{x!r}" for s, x in enumerate(_climbing())]
    path.write_text("\n".join(lines) + "\n")
    events = read_events(path)
    assert {e.run_id for e in events} == {"a", "b"}
    assert all(set(e.metrics) == {"train/loss"} for e in events)


def test_tensorboard_event_files_written_by_torch(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard's reader is the [tensorboard] extra")
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "runs" / "exp-tb"
    writer = SummaryWriter(log_dir=str(logdir))
    for s, x in enumerate(_climbing()):
        writer.add_scalar("train/loss", x, global_step=10 * s)
        writer.add_scalar("train/lr", 3e-4, global_step=10 * s)
    writer.add_scalar("eval/loss", math.nan, global_step=600)
    writer.close()
    events = read_events(logdir)
    assert {e.run_id for e in events} == {"exp-tb"}
    assert events[1].step == 10 and events[1].metrics == {"train/loss": pytest.approx(3.0 - 1 / 40),
                                                          "train/lr": pytest.approx(3e-4)}
    assert math.isnan(events[-1].metrics["eval/loss"])
    proc = lossguard(str(logdir))
    assert proc.returncode == 0, proc.stderr
    alerts = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert any(a.alert_type == "nonfinite_metric" and a.severity == "critical" and a.step == 600 for a in alerts)
    assert any(a.severity in HIGH and a.step < 600 for a in alerts)


def test_many_files_show_progress_on_a_terminal_only(tmp_path):
    """Replaying many files shows a progress line on a terminal (a real pty); piped, stderr has none."""
    import os
    import pty

    paths = []
    for i in range(5):
        paths.append(str(write_csv(tmp_path / f"run{i}.csv", [{"step": s, "loss": 2.0 - s / 100} for s in range(30)],
                                   ["step", "loss"])))
    piped = lossguard(*paths)
    assert piped.returncode == 0 and "read 5/5 files" not in piped.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "stream_app", "replay", *paths], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    assert b"read 1/5 files" in seen and b"read 5/5 files" in seen, seen


def test_a_run_no_detector_reads_is_named_not_silently_quiet(tmp_path):
    """A GAN's loss log (CycleGAN's D_A/G_A columns): no alias knows them, so nothing but a non-finite
    value could alert — the notice says so and names the columns; a log with a `loss` column gets none."""
    gan = tmp_path / "cyclegan.csv"
    gan.write_text("step,D_A,G_A,cycle_A\n0,0.186,0.381,0.232\n1,0.208,0.352,0.216\n2,61.812,108.169,0.783\n")
    proc = lossguard(str(gan))
    assert proc.returncode == 0, proc.stderr
    assert "run cyclegan: no detector reads any of its metrics (D_A, G_A, cycle_A)" in proc.stderr
    named = tmp_path / "named.csv"
    named.write_text("step,loss,D_A\n0,0.4,0.2\n1,0.35,0.2\n")
    proc = lossguard(str(named))
    assert proc.returncode == 0 and "no detector reads" not in proc.stderr, proc.stderr


def test_metric_names_match_whatever_their_case_and_separators():
    """A pasted log writes ``Loss``, ``lm_loss``, ``Grad-Norm``, ``LR``: each reaches the detectors under its
    canonical name, and no two aliases or canonical names collapse onto one spelling with different
    meanings (the spelling table would silently keep one of them)."""
    from detectors.aliases import ALIASES, CANONICAL, SPELLINGS, _spelling, canonical_name

    assert [canonical_name(n) for n in ("Loss", "lm_loss", "Grad-Norm", "LR", "Train Loss", "VAL_LOSS")] == [
        "loss", "loss", "grad_norm", "lr", "loss", "val_loss"]
    meanings: dict[str, set[str]] = {}
    for name, canon in [*ALIASES.items(), *((c, c) for c in CANONICAL)]:
        meanings.setdefault(_spelling(name), set()).add(canon)
    assert {k: v for k, v in meanings.items() if len(v) > 1} == {}
    assert len(SPELLINGS) == len(meanings)


def test_a_log_without_a_clock_has_no_stall_and_one_with_a_clock_does(tmp_path):
    """A pasted excerpt jumps from step 50 to 4950: with no time column that is a gap in the log, not a
    silence of the run (replay reads it at one second per step); the same jump with a timestamp column
    4,900 s apart is a past stall, medium."""
    rows = [(s, 2.0 - s / 10000) for s in [*range(1, 51), *range(4950, 5000)]]
    stepped = tmp_path / "excerpt.csv"
    stepped.write_text("step,loss\n" + "".join(f"{s},{x}\n" for s, x in rows))
    timed = tmp_path / "timed.csv"
    timed.write_text("step,ts,loss\n" + "".join(f"{s},{1.7e9 + s},{x}\n" for s, x in rows))
    assert [a for a in replay_file(stepped) if a.alert_type == "stalled_run"] == []
    stalls = [a for a in replay_file(timed) if a.alert_type == "stalled_run" and a.status == "firing"]
    assert [(a.step, a.severity) for a in stalls] == [(4950, "medium")]


def test_a_glog_time_column_is_time(tmp_path):
    """Caffe's solver log stamps each line glog's way ("I0515 11:05:31.873651": no year); a log transcribed
    with that column is read, its times 19-20 s apart, not refused."""
    log = tmp_path / "caffe.csv"
    log.write_text("time,step,loss\n0515 11:05:31.873651,0,6.91161\nI0515 11:05:51.320263,20,6.90501\n"
                   "0515 11:06:10.9,40,6.91\n")
    events = read_events(log)
    assert [e.step for e in events] == [0, 20, 40]
    assert [round(b.ts - a.ts, 3) for a, b in itertools.pairwise(events)] == [19.447, 19.58]


def test_a_keras_csvlogger_file_is_numbered_by_its_epoch_column(tmp_path):
    """Keras' CSVLogger writes 'epoch,loss,val_loss' with no step column: its whole-number epochs number
    the rows. A fractional epoch column (Hugging Face's) is no step: without a step column that file is
    still refused, by name."""
    log = tmp_path / "history.csv"
    log.write_text("epoch,loss,val_loss\n0,2.1,2.2\n1,1.5,1.9\n2,1.1,2.4\n")
    assert [(e.step, e.metrics) for e in read_events(log)] == [
        (0, {"loss": 2.1, "val_loss": 2.2}), (1, {"loss": 1.5, "val_loss": 1.9}), (2, {"loss": 1.1, "val_loss": 2.4})]
    hf = tmp_path / "fractional.csv"
    hf.write_text("epoch,loss\n0.5,2.1\n1.0,1.5\n")
    with pytest.raises(ReplayError, match="no 'step' column"):
        read_events(hf)


def test_a_stable_baselines3_monitor_file_reads_as_episodes_and_their_mean_return(tmp_path):
    """Stable-Baselines3's Monitor wrapper writes ``0.monitor.csv``: a ``#{"t_start": …}`` line, then one
    ``r,l,t`` row per episode. Written here by SB3 itself around CartPole (random actions, 250 episodes):
    replay numbers the rows by episode, names the run after the folder, reads the times against t_start,
    and every 100th row carries the mean return of those 100 episodes — the reward the detectors watch."""
    import gymnasium as gym
    from stable_baselines3.common import monitor
    folder = tmp_path / "cartpole_random"
    folder.mkdir()
    env = monitor.Monitor(gym.make("CartPole-v1"), str(folder / "0"))
    env.action_space.seed(0)
    for episode in range(250):
        env.reset(seed=episode)
        while not any(env.step(env.action_space.sample())[2:4]):
            pass
    env.close()
    path = folder / "0.monitor.csv"
    rows = list(csv.DictReader(path.read_text().splitlines()[1:]))
    assert path.read_text().startswith('#{"t_start"') and len(rows) == 250
    events = read_events(path)
    assert [e.step for e in events] == list(range(250)) and {e.run_id for e in events} == {"cartpole_random"}
    assert [e.metrics["episode_reward"] for e in events] == [float(r["r"]) for r in rows]
    assert [e.metrics["episode_length"] for e in events] == [float(r["l"]) for r in rows]
    t_start = json.loads(path.read_text().splitlines()[0][1:])["t_start"]
    assert [e.ts for e in events] == pytest.approx([t_start + float(r["t"]) for r in rows])
    means = {e.step: e.metrics["episode_reward_mean"] for e in events if "episode_reward_mean" in e.metrics}
    assert means == pytest.approx({99: sum(float(r["r"]) for r in rows[:100]) / 100,
                                   199: sum(float(r["r"]) for r in rows[100:200]) / 100})
    proc = lossguard(str(path))
    assert proc.returncode == 0, proc.stderr
    assert "no detector reads" not in proc.stderr
