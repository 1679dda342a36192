"""The detectors on real public training logs (benchmarks/detection/real): sparse Hugging Face histories,
fragments pasted into issues, validation-heavy runs and RLHF runs — each labelled by hand from quoted
evidence before any detector ran. These assert what the labels say, run by run, where the detectors
meet them today; benchmarks/detection/real_logs.py scores the whole corpus against the baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detectors import decode_alert
from stream_app.replay import read_events, replay_file

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "benchmarks" / "detection" / "real"
LABELS = {r["run_id"]: r for r in json.loads((REAL / "labels.json").read_text())["runs"]}
HIGH = ("high", "critical")


def firing(run_id: str, severities=HIGH):
    label = LABELS[run_id]
    return [a for a in replay_file(REAL / label["file"], run_id=run_id)
            if a.status == "firing" and a.severity in severities]


def test_the_corpus_is_what_its_readme_promises():
    runs = list(LABELS.values())
    failing = [r for r in runs if r["label"] != "healthy"]
    assert len(runs) >= 40 and len(failing) >= 15
    for r in runs:
        assert r["source_url"].startswith("https://github.com/") and r["evidence"] and r["license"], r["run_id"]
        assert r["split"] in ("tune", "report") and (r["onset_step"] is None) == (r["label"] == "healthy")
    points = {r["run_id"]: len({e.step for e in read_events(REAL / r["file"], run_id=r["run_id"])}) for r in runs}
    assert sum(points[r["run_id"]] for r in runs if r["label"] == "healthy") > sum(points.values()) / 2


@pytest.mark.parametrize("run_id", sorted(LABELS))
def test_every_real_log_replays(run_id):
    """No real log is refused: trainer_state.json folders, pasted logs with 'Training Loss' columns, epochs."""
    events = read_events(REAL / LABELS[run_id]["file"], run_id=run_id)
    assert events and all(e.metrics for e in events)


@pytest.mark.parametrize("run_id", sorted(r for r, lab in LABELS.items() if lab["label"] == "nonfinite"))
def test_a_nonfinite_value_pages_at_its_step(run_id):
    """Fragments of 2-13 points and sparse HF histories alike: high/critical at the very step."""
    assert LABELS[run_id]["onset_step"] in {a.step for a in firing(run_id) if a.alert_type == "nonfinite_metric"}


@pytest.mark.parametrize("run_id", ["hf_bashkir_asr", "hf_luojiu_7b_base", "hf_mt5_az_news_summ",
                                    "hf_qlora_25ep_fujump", "hf_t5_summarization_demo", "gh_sherrywan_grpo_seed42",
                                    "s9a_credibility_cls_large_gradnorm", "s10b_emonettcn",
                                    "s11c_grpo_q35_9b_rho300_s43_ok", "s12c_sb3_frozenlake8x8_ppo",
                                    "s12c_sb3_flappybird_dqn", "s12c_verl_ppo_gsm8k_dstack", "s12a_cecilia_gpt2_124m",
                                    "s12d_d2_rpn_fpn_ref"])
def test_healthy_sparse_and_rlhf_runs_do_not_page(run_id):
    """Sparse HF histories of 400-1,700 points (a cosine tail to LR 0, an epoch sawtooth, a slow fine-tune,
    grad norms of 20-300), a classifier whose grad norm wanders 0.7-136 and survives a 250, a 500-epoch log
    whose validation loss sits at 0.0008-0.0023 printed to 4 decimals, a healthy GRPO run whose loss sits
    near 0 and whose grad norm is exactly 0 at many points (groups with one reward), SB3 PPO on FrozenLake
    whose return rises to 1.0 and stays (solved), SB3 DQN on Flappy Bird whose rolling return falls -74 →
    -90 while it explores (no reward_std logged), verl PPO printed to 3 decimals (its LR reads 0.000), a
    19k-step GPT-2 pretraining log and a 4,500-point
    detectron2 reference log: nothing high/critical."""
    assert LABELS[run_id]["label"] == "healthy"
    assert firing(run_id) == []


def test_a_sparse_divergence_is_caught_within_points():
    """QLoRA at LR 0.005, logged every 10 steps: the loss climbs 1.0 -> 29.6 in a 10-point history."""
    run_id = "hf_qlora_lr0005_divergence"
    onset = LABELS[run_id]["onset_step"]
    alerts = firing(run_id)
    assert alerts and min(a.step for a in alerts) <= onset + 20


def test_overfitting_on_an_evaluated_run_reaches_high():
    """Eval loss 0.51 -> 1.23 over evaluations while the training loss falls (an NER fine-tune)."""
    alerts = firing("hf_bert_medmentions_ner_overfit")
    assert any(a.alert_type == "val_train_divergence" for a in alerts)


def test_grpo_with_no_learning_signal_pages_through_the_cli():
    """TRL GRPO, every completion truncated: reward 0 and grad norm 0 at every logged step (a 3-point
    fragment from an issue) — through `lossguard replay`, a real subprocess."""
    label = LABELS["gh_trl5697_grpo_trunc_zero_reward"]
    proc = subprocess.run([sys.executable, "-m", "stream_app", "replay", str(REAL / label["file"])], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    alerts = [decode_alert(line) for line in proc.stdout.splitlines()]
    assert any(a.severity in HIGH and a.alert_type in ("reward_flat", "gradient_vanishing") for a in alerts)
    assert {a.run_id for a in alerts} == {"gh_trl5697_grpo_trunc_zero_reward"}


def test_a_ppo_kl_blowup_in_a_five_row_fragment_reaches_high():
    """OpenAI baselines PPO, one iteration's optimizer table pasted into an issue: the KL leaves 0.017 for
    1.76 and keeps climbing to 4.5 — no warm-up history at all."""
    run_id = "gh_baselines975_ppo_kl_blowup"
    alerts = [a for a in firing(run_id) if a.alert_type == "kl_blowup"]
    assert alerts and min(a.step for a in alerts) <= LABELS[run_id]["onset_step"] + 2


def test_a_validation_only_history_that_turns_up_reaches_high():
    """nanoGPT with 12 layers: only the validation losses were pasted, falling to 1.49 at 1250 and then
    rising three evaluations in a row to 1.56 — overfitting with no training loss to compare."""
    run_id = "gh_nanogpt211_nlayer12_val"
    alerts = [a for a in firing(run_id) if a.alert_type == "val_train_divergence"]
    assert [a.step for a in alerts] == [2000]


def test_an_epoch_log_whose_validation_turns_up_reaches_high():
    """A Keras LSTM's fit log, one row per epoch: val_loss rises five epochs in a row (0.6765 -> 0.7586)
    while the training loss falls — too few evaluations for the noise test, a clear trend all the same."""
    run_id = "s6_keras3056_lstm_overfit"
    alerts = [a for a in firing(run_id) if a.alert_type == "val_train_divergence"]
    assert alerts and min(a.step for a in alerts) <= LABELS[run_id]["onset_step"] + 2


def test_a_wildly_noisy_validation_set_is_no_trend():
    """A healthy fine-tune whose validation loss jumps 0.5 -> 3.9 -> 1.0 from epoch to epoch: three rises
    in a row happen by chance there, and must not page."""
    assert [a for a in firing("gh_deeplense_ft100_resumed") if a.alert_type == "val_train_divergence"] == []


def test_a_caffe_loss_at_the_float32_clamp_pages_at_once():
    """A Caffe solver log pasted into an issue: "loss = 87.3366" at iteration 0 — −ln(FLT_MIN), every
    sample's probability underflowed — then stuck at 8.26. Nothing is NaN, yet the net is broken."""
    run_id = "s6_caffe1255_plateau"
    alerts = [a for a in firing(run_id) if a.alert_type == "saturated_loss"]
    assert [(a.step, a.severity) for a in alerts] == [(0, "high")]


def test_a_loss_passing_by_the_clamps_is_no_saturation():
    """A healthy loss falling through 87.3 and 16.1 (a summed detection loss does) never sits at a clamp:
    only a value within printing precision of one is a saturated loss."""
    from detectors import DetectorSuite, MetricEvent

    suite = DetectorSuite()
    losses = [90.0 - 0.0137 * s for s in range(5500)]  # passes 87.3365 and 16.1181 between two points
    assert not any(87.3364 <= x <= 87.3366 or 16.118 <= x <= 16.1182 for x in losses)
    alerts = [a for s, x in enumerate(losses) for a in suite.update(MetricEvent("r", s, {"loss": x}))]
    assert [a for a in alerts if a.alert_type == "saturated_loss"] == []


def test_a_jump_the_validation_loss_repeats_is_a_spike_at_once():
    """A Keras GRU's epoch summaries quoted in an issue: loss 0.39 -> 0.88 at epoch 20 with val_loss
    0.37 -> 0.74 beside it. 2.2x is no 5x jump, but the held-out loss jumping with it makes it no hard
    batch: high at that epoch, with nothing before it."""
    run_id = "s6_chemts8_epoch20_spike"
    alerts = firing(run_id)
    assert [(a.alert_type, a.step) for a in alerts][:1] == [("loss_spike", 20)]
    assert "validation loss jumped" in alerts[0].message


def test_an_epoch_log_whose_validation_climbs_five_epochs_reaches_high():
    """A steganalysis net's five epochs pasted into an issue ("You are overfitting", said the maintainer):
    val_loss 0.75 -> 1.48, each epoch above the last, while the training loss falls 0.54 -> 0.21. The
    climb's own steps make its noise look large; five rises in a row are the trend all the same."""
    run_id = "s7a_stegolab1_xunet_overfit"
    alerts = [a for a in firing(run_id) if a.alert_type == "val_train_divergence"]
    assert [a.step for a in alerts] == [5]


def test_a_loss_stuck_at_one_exact_value_pages():
    """A custom TensorFlow loop pasted into an issue: the loss jumps around for 8 steps, then prints exactly
    0.6931 (ln 2: a binary classifier predicting 50/50) at every step. Its median fell, so "not learning"
    sees progress; five identical values in a row are a model whose outputs no longer change."""
    run_id = "s7a_tf12287_loss_const_0p6931"
    alerts = [a for a in firing(run_id) if a.alert_type == "convergence_plateau"]
    assert [a.step for a in alerts] == [LABELS[run_id]["onset_step"] + 4]
    assert "exactly 0.6931" in alerts[0].message


def test_an_epoch_that_repeats_the_last_ones_losses_pages():
    """A Llama-3 LoRA run whose adapter never took effect, pasted into an issue ("there is no change in
    Loss"): with a fixed data order, epoch 2's batches give epoch 1's losses to the 4th decimal. The file
    names its column ``Loss``, which maps onto ``loss`` whatever its case."""
    run_id = "s9b_trace5_lora_noop_plateau"
    alerts = [a for a in firing(run_id) if a.alert_type == "convergence_plateau"]
    assert [a.step for a in alerts] == [11] and alerts[0].metadata["repeat_lag"] == 8


def test_a_jump_that_stays_in_a_sparse_fragment_reaches_high():
    """A 120B LoRA run's diagnosis pasted with its key iterations: ``lm_loss`` 1.45 -> 0.55, then 1.13, 2.35,
    2.28, 2.28 ("does not recover"). Two rises are a low alert; staying up there for two more points is
    the failure. ``lm_loss`` maps onto ``loss`` like Megatron's ``lm loss``."""
    run_id = "s8a_nemotron120b_lora_spike"
    alerts = [a for a in firing(run_id, ("low", "medium", "high", "critical"))
              if a.alert_type == "convergence_divergence"]
    assert [(a.step, a.severity) for a in alerts] == [(1273, "low"), (1275, "high")]


def test_each_named_evaluation_set_is_watched_on_its_own():
    """A Trainer with an ``eval_dataset`` dict logs ``eval_<set>_loss`` per set and no ``eval_loss``: six
    groups' validation losses climb from step 401-802 while the training loss falls 1.11 → 0.05. Each set
    pages high under its own name, and the camel-case ``TrainLoss``/``ValLoss`` columns of a resumed Keras-style
    log are read as the training and validation loss."""
    alerts = [a for a in firing("s7b_multigroup_eval_overfit_30ep") if a.alert_type == "val_train_divergence"]
    named = {a.message.split()[0] for a in alerts}
    assert {"eval_g0_loss", "eval_g5_loss"} <= named and len({a.metadata["episode_key"] for a in alerts}) == len(named)
    assert min(a.step for a in alerts if a.message.startswith("eval_g0_loss ")) <= 2005
    low = replay_file(REAL / LABELS["s10b_skinlesion_vgg16_resume"]["file"], run_id="skin")
    assert any(a.alert_type == "val_train_divergence" and a.message.startswith("val_loss ") for a in low)


def test_an_entropy_collapse_on_a_sparse_log_reaches_high():
    """A GRPO chess run logged every 160-360 steps: entropy 3.2 → 0.71 ("the root cause is entropy
    collapse"). Five logged points of a trip span a thousand steps there; three are enough for high."""
    alerts = [a for a in firing("s8a_chess_grpo_entropy_collapse") if a.alert_type == "entropy_collapse"]
    assert alerts and alerts[0].step <= 1793  # the third point under half its recent median


def test_a_noisy_per_step_loss_cut_into_excerpts_is_no_climb():
    """A 6,687-step SFT history logged every step, its loss wandering 0.24-0.64 from step to step: pasted as
    16-point excerpts (no history), three rises in a row to 1.5x the median happen by chance; a
    fragment's climb must reach twice the median before it."""
    from detectors.events import MetricEvent
    from stream_app.replay import replay_events

    events = read_events(REAL / LABELS["s11a_baize_tcm"]["file"], run_id="baize")
    paged = []
    for start in range(1600, 3400, 8):
        part = [MetricEvent(f"baize@{start}", e.step, e.metrics, ts=e.ts) for e in events[start:start + 16]]
        paged += [a.run_id for a in replay_events(part) if a.alert_type == "convergence_divergence"
                  and a.status == "firing" and a.severity in HIGH]
    assert paged == []


def test_overfitting_whose_best_came_before_any_training_loss_reaches_high():
    """A classifier evaluated every epoch (98 steps) with its training loss logged every 500 steps: the best
    evaluation (0.82 at step 490) came before the first training loss, and validation then climbs 45
    epochs to 1.29 while training falls 0.94 → 0.0004. The first training loss logged after the best
    stands in for the one at it."""
    alerts = [a for a in firing("s11a_reqclass") if a.alert_type == "val_train_divergence"]
    assert alerts and alerts[0].step <= 1176


@pytest.mark.parametrize("run_id, by_step", [("s12d_darknet1400_stuck69", 40249), ("s12d_pnn2_stuck_ln2", 14)])
def test_a_loss_sitting_at_chance_pages(run_id, by_step):
    """Darknet on ImageNet, picked up at iteration 40,245: the loss sits at 6.908-6.917 — ln 1000, a uniform
    guess over the 1000 classes — and pages at its fifth point. A product-based net's epoch log from its
    start: 0.6936 → 0.6932 (ln 2, AUC 0.5) pages once past its first 10 points."""
    alerts = [a for a in firing(run_id) if a.alert_type == "convergence_plateau"]
    assert alerts and alerts[0].step <= by_step and "chance_classes" in alerts[0].metadata


def test_a_run_that_starts_at_chance_and_learns_is_no_plateau():
    """An untrained 10-class classifier starts at ln 10 and a DPO run at ln 2: a dense run that sits there
    for its first 10 steps (an LR warm-up) and then learns, and a preference run whose loss stays near ln 2
    for 15 steps, page nothing."""
    import math as m

    from detectors import DetectorSuite, MetricEvent

    warm = [m.log(10) * (1 - 0.0001 * s) for s in range(10)] + [2.3 * m.exp(-s / 30) + 0.2 for s in range(200)]
    dpo = [m.log(2) - 0.0002 * s for s in range(15)] + [0.69 * m.exp(-s / 40) for s in range(1, 100)]
    for name, losses, extra in (("warm", warm, {}), ("dpo", dpo, {"rewards/margins": 0.01})):
        suite = DetectorSuite()
        alerts = [a for s, x in enumerate(losses) for a in suite.update(MetricEvent(name, s, {"loss": x, **extra}))]
        assert [a for a in alerts if a.alert_type == "convergence_plateau" and a.severity in HIGH] == [], name


def test_a_negative_likelihood_loss_that_blows_up_is_a_spike():
    """WaveGlow's loss is a negative log-likelihood that lives below 0 (-4.07 … -4.49); at step 78,620 it is
    4,191.68 ("the loss explode"). A negative loss no longer turns the spike detector off (only a
    policy-gradient run does); the jump is judged by its size against the losses before it."""
    alerts = [a for a in firing("s13b_waveglow_loss_jump") if a.alert_type == "loss_spike"]
    assert [a.step for a in alerts] == [78620] and "above the median" in alerts[0].message


def test_an_epoch_log_whose_training_loss_turns_and_climbs_reaches_high():
    """An epoch log (train and validation loss on every row): the training loss falls 2.58 → 0.061 over 13
    epochs, then climbs 0.067, 0.110, 0.204, 0.334 … 0.554. The descent inflated the noise estimate and the
    log is shorter than a per-step warm-up; an epoch log is coarse, and three rises in a row to 3x the best
    are a climb."""
    run_id = "s12b_optiver_rv_diverge"
    alerts = [a for a in firing(run_id) if a.alert_type == "convergence_divergence"]
    assert alerts and min(a.step for a in alerts) <= LABELS[run_id]["onset_step"] + 2


@pytest.mark.parametrize("run_id", ["s10b_catclassifier_keras", "s11d_keras_alzheimer_cnn2d", "s10b_emonettcn",
                                    "s12d_era_resnet50_imagenet", "s10b_brats2020_keras"])
def test_healthy_epoch_logs_raise_no_climb(run_id):
    """Healthy epoch logs (Keras CSVLogger files and epoch tables, validation on every row) keep the coarse
    cadence's climb rule quiet: a training loss that bounces up an epoch or two is no climb."""
    assert LABELS[run_id]["label"] == "healthy"
    assert [a for a in firing(run_id) if a.alert_type == "convergence_divergence"] == []


def test_a_return_that_jumped_and_then_collapsed_reaches_high():
    """ML-Agents PPO, mean reward per summary: 2.3 → 70 in one jump ("super-human"), then 56, 52 … 8.7 …
    0.18. The lagging average's deviations counted the jump as noise (60 off for points); the spread of the
    point-to-point changes does not, and the collapse pages high."""
    run_id = "s12c_mlagents_ppo_reward_drop"
    alerts = [a for a in firing(run_id) if a.alert_type == "reward_collapse"]
    assert alerts and LABELS[run_id]["onset_step"] <= min(a.step for a in alerts) <= 22


def test_a_grpo_reward_in_eighths_that_dips_is_no_collapse():
    """A healthy GRPO run whose reward is a mean over 8 completions (steps of 1/8): it dips from 0.5 to
    0.125-0.25 for a few points. Most changes are one step either way, so their robust spread is 0 — no
    noise estimate — and the EMA's stands."""
    run_id = "s11c_grpo_q35_9b_g2_adq_s44_ok"
    assert LABELS[run_id]["label"] == "healthy"
    assert firing(run_id, ("medium", "high", "critical")) == []


def test_three_rises_among_a_hundred_and_fifty_evaluations_are_no_trend():
    """A healthy sentiment fine-tune evaluated at every logged point, 150 times: its validation loss rises
    three evaluations in a row, 8-12 % above its best, now and then. With a full window of evaluations the
    noise test decides, not the few-evaluations shortcut."""
    run_id = "s12b_sentiment_150evals"
    assert LABELS[run_id]["label"] == "healthy"
    assert [a for a in firing(run_id) if a.alert_type == "val_train_divergence"] == []


def test_a_grpo_policy_already_near_deterministic_has_no_entropy_collapse_left():
    """A healthy 2,400-step GRPO run whose per-token entropy starts at 0.04 nats and swings 0.0002-0.07 with
    the batch: ratios of numbers that small are noise, so nothing below ``entropy_floor`` (0.1) collapses."""
    run_id = "s15c_finqa_grpo_long2400"
    assert LABELS[run_id]["label"] == "healthy"
    assert [a for a in firing(run_id, ("medium", "high", "critical")) if a.alert_type == "entropy_collapse"] == []


def test_reward_groups_scoring_alike_while_the_mean_is_up_are_no_drift_warning():
    """The same run: as the model learns, more GRPO groups score all alike and the reward σ sinks to a fifth
    of its early level while the mean sits above where it began — the task learned, not a lost learning
    signal. Every medium-or-worse drift alert left is a fall in the mean (or a σ widening)."""
    alerts = [a for a in firing("s15c_finqa_grpo_long2400", ("medium", "high", "critical"))
              if a.alert_type == "reward_distribution_drift"]
    assert all(a.value <= 0 or a.metadata["std_ratio"] > 4 for a in alerts), [a.message for a in alerts]


def test_one_ppo_update_over_the_clip_band_is_low():
    """SB3 PPO on a wheel-runner task: clip_fraction crosses 0.3 for one update now and then (0.31-0.45) in a
    healthy run. One point is low, as for KL, entropy and length; two in a row are medium."""
    run_id = "s15d_hirokame_wheelrunner_ppo"
    assert LABELS[run_id]["label"] == "healthy"
    alerts = [a for a in firing(run_id, ("medium", "high", "critical")) if a.alert_type == "clipfrac_out_of_band"]
    assert all(a.metadata["consecutive"] >= 2 for a in alerts)
    assert any(a.alert_type == "clipfrac_out_of_band" for a in firing(run_id, ("low",)))


def test_a_jump_at_a_floor_near_zero_that_undoes_nothing_is_no_spike():
    """A healthy Bert2Bert summarisation run logged every step: its loss falls from ~8 to a floor of
    0.0001-0.0005 (printed to 4 decimals), where 0.0004 → 0.0032 is 8x its median. A spike must undo a part
    (5 %) of what the run learned, as a divergence must."""
    run_id = "s15a_bert2bert_liputan6"
    assert LABELS[run_id]["label"] == "healthy"
    assert [a for a in firing(run_id) if a.alert_type == "loss_spike"] == []
