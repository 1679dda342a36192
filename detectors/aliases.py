"""Metric-name aliases: framework names → lossguard's canonical names.

>>> canonical_name("train/loss"), canonical_name("objective/kl"), canonical_name("lm loss")
('loss', 'kl', 'loss')
>>> canonical_name("rollout/ep_rew_mean"), canonical_name("EpRewMean"), canonical_name("critic/score/mean")
('reward_mean', 'reward_mean', 'reward_mean')
>>> canonical_name("Loss"), canonical_name("Grad_Norm"), canonical_name("Val Loss"), canonical_name("lm_loss")
('loss', 'grad_norm', 'val_loss', 'loss')
>>> canonical_name("TrainLoss"), canonical_name("ValLoss"), canonical_name("gradNorm")
('loss', 'val_loss', 'grad_norm')
>>> canonical_name("Accuracy"), canonical_name("eval_g0_loss")
('Accuracy', 'eval_g0_loss')
>>> canonical_metrics({"eval_loss": 1.5, "my_metric": 2.0})
{'val_loss': 1.5, 'my_metric': 2.0}
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["CANONICAL", "ALIASES", "canonical_name", "canonical_metrics"]

CANONICAL = (
    "loss", "val_loss", "grad_norm", "lr", "batch_size", "step_time", "throughput", "mem_allocated",
    "mem_reserved", "perplexity", "reward_mean", "reward_std", "kl", "entropy", "response_length",
    "clipfrac", "approx_kl", "value_loss", "ratio", "chosen_reward", "rejected_reward", "reward_margin",
    "reward_accuracy", "loss_scale",
)

ALIASES: dict[str, str] = {
    # Hugging Face Trainer
    "train_loss": "loss", "train/loss": "loss", "training_loss": "loss", "train_loss_step": "loss",
    "eval_loss": "val_loss", "eval/loss": "val_loss", "validation_loss": "val_loss", "valid_loss": "val_loss",
    "val/loss": "val_loss", "val_loss_epoch": "val_loss",
    "learning_rate": "lr", "train/learning_rate": "lr", "lr-SGD": "lr", "lr-Adam": "lr", "lr-AdamW": "lr",
    "train/grad_norm": "grad_norm", "gradient_norm": "grad_norm", "grad_norm_total": "grad_norm",
    "train_samples_per_second": "throughput", "samples_per_second": "throughput",
    "train/samples_per_second": "throughput", "tokens_per_second": "throughput",
    "eval_perplexity": "perplexity", "ppl": "perplexity",
    # Megatron-LM
    "lm loss": "loss", "lm-loss": "loss", "grad norm": "grad_norm", "grad-norm": "grad_norm",
    "loss scale": "loss_scale", "loss-scale": "loss_scale", "learning rate": "lr", "learning-rate": "lr",
    "batch size": "batch_size", "batch-size": "batch_size", "elapsed time per iteration (ms)": "step_time",
    # Bedrock CSVs
    "step_number": "step", "train_perplexity": "perplexity", "validation_perplexity": "val_perplexity",
    # TRL (PPO, GRPO, RLOO, DPO)
    "objective/kl": "kl", "objective/entropy": "entropy", "objective/scores": "reward_mean",
    "objective/rlhf_reward": "reward_mean", "objective/non_score_reward": "non_score_reward",
    "env/reward_mean": "reward_mean", "env/reward_std": "reward_std", "ppo/mean_scores": "reward_mean",
    "ppo/std_scores": "reward_std", "reward": "reward_mean", "reward_std": "reward_std",
    "rewards/mean": "reward_mean", "rewards/std": "reward_std",
    "policy/clipfrac": "clipfrac", "policy/clipfrac_avg": "clipfrac", "clip_ratio": "clipfrac",
    "clip_ratio/region_mean": "clipfrac", "policy/approxkl": "approx_kl", "policy/approxkl_avg": "approx_kl",
    "policy/entropy": "entropy", "policy/entropy_avg": "entropy", "policy/ratio": "ratio",
    "val/ratio": "ratio", "val/clipfrac": "clipfrac", "loss/value_loss": "value_loss",
    "loss/value_avg": "value_loss", "ppo/loss/value": "value_loss", "ppo/policy/entropy": "entropy",
    "ppo/mean_non_score_reward": "non_score_reward", "objective/kl_coef": "kl_coef",
    "ppo/policy/clipfrac": "clipfrac", "ppo/policy/approxkl": "approx_kl", "ppo/val/clipfrac": "clipfrac",
    "ppo/mean_kl": "kl", "kl_div": "kl",
    "completions/mean_length": "response_length", "completion_length": "response_length",
    "tokens/responses_len_mean": "response_length", "env/response_length": "response_length",
    "response_length_mean": "response_length",
    "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward",
    "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy",
    # Lightning conventions
    "train_loss_epoch": "loss", "loss_step": "loss", "val_loss_step": "val_loss",
    # step timing / memory
    "iteration_time": "step_time", "step_time_s": "step_time", "time_per_step": "step_time",
    "memory_allocated": "mem_allocated", "memory_reserved": "mem_reserved", "rss_bytes": "rss",
    "cuda_memory_allocated": "mem_allocated", "cuda_memory_reserved": "mem_reserved",
    # Bedrock CSVs
    "epoch_number": "epoch",
    # reward-model calibration and more TRL names (GRPO, RLOO, KTO)
    "calibration/ece": "ece", "eval_ece": "ece", "reward_model/ece": "ece",
    "kl_coef": "kl_coef", "objective/kl_mean": "kl", "train/kl": "kl", "train/entropy": "entropy",
    "completions/mean_length_mean": "response_length", "train/completion_length": "response_length",
    "train/reward": "reward_mean", "train/reward_std": "reward_std", "rewards/chosen_mean": "chosen_reward",
    "rewards/rejected_mean": "rejected_reward", "rewards/margins_mean": "reward_margin",
    "train/rewards/margins": "reward_margin", "train/rewards/accuracies": "reward_accuracy",
    "train/rewards/chosen": "chosen_reward", "train/rewards/rejected": "rejected_reward",
    "policy/clipfrac_mean": "clipfrac", "clip_ratio/low_mean": "clipfrac",
    # what people print and paste: notebook tables (HF's "Training Loss | Validation Loss"), nanoGPT-style
    # "train loss / val loss", fairseq ("gnorm", "valid_loss"), OpenAI baselines' PPO, hand-rolled loops
    "training loss": "loss", "train loss": "loss", "validation loss": "val_loss", "val loss": "val_loss",
    "valid loss": "val_loss", "eval loss": "val_loss", "gnorm": "grad_norm", "valid_ppl": "val_perplexity",
    "grpo_loss": "loss", "policy_entropy_mean": "entropy", "policy_entropy": "entropy", "ent": "entropy",
    "completion_length_mean": "response_length", "mean_length": "response_length", "vf_loss": "value_loss",
    "clip_fraction": "clipfrac", "ratio_mean": "ratio", "reward_mean/mean": "reward_mean",
    # Stable-Baselines3 / RL Zoo (train/loss, train/learning_rate are above)
    "rollout/ep_rew_mean": "reward_mean", "train/approx_kl": "approx_kl", "train/clip_fraction": "clipfrac",
    "train/value_loss": "value_loss", "rollout/ep_len_mean": "episode_length",
    # the same return as SB3's console table and OpenAI baselines print it (ep_rew_mean, EpRewMean,
    # eprewmean), and Unity ML-Agents' "Mean Reward"
    "ep_rew_mean": "reward_mean", "eprewmean": "reward_mean", "mean reward": "reward_mean",
    # RLlib's mean return over an iteration's episodes (also what replay makes of a Monitor file's episodes)
    "episode_reward_mean": "reward_mean",
    # detectron2 (metrics.json, its log lines) and OpenNMT ("xent": the cross-entropy it trains on)
    "total_loss": "loss", "xent": "loss",
    # verl (PPO/GRPO for LLMs) and OpenRLHF
    "critic/score/mean": "reward_mean", "actor/entropy": "entropy", "actor/ppo_kl": "approx_kl",
    "actor/pg_clipfrac": "clipfrac", "actor/kl_loss": "kl", "response_length/mean": "response_length",
    "actor/grad_norm": "grad_norm", "critic/vf_loss": "value_loss", "act_lr": "lr",
    # (not verl's actor/lr: its console prints every metric to 3 decimals, an LLM's 1e-6 as 0.000)
}


#: a lower-case letter or digit followed by a capital: where a camel-case name (``TrainLoss``) parts words
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _spelling(name: str) -> str:
    """A name with case and separators (spaces, ``_``, ``-``, a camel-case hump) evened out: ``LM_Loss`` and
    ``LmLoss`` → ``lm loss``."""
    return " ".join(_CAMEL.sub(" ", name).lower().replace("_", " ").replace("-", " ").split())


#: every alias and canonical name by its spelling (no two of them share one: tests/test_replay.py checks)
SPELLINGS: dict[str, str] = {**{_spelling(k): v for k, v in ALIASES.items()}, **{_spelling(c): c for c in CANONICAL}}


@lru_cache(maxsize=4096)
def canonical_name(name: str) -> str:
    """The canonical name for a metric, whatever its case and separators (a pasted log's ``Loss``, ``LR``,
    ``lm_loss``); unknown names come back unchanged (generic detectors still see them)."""
    if name in ALIASES:
        return ALIASES[name]
    return SPELLINGS.get(_spelling(name), name)


def canonical_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Rename a metrics mapping onto canonical names; an explicit canonical name wins over an alias."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        canon = canonical_name(name)
        if canon == name or canon not in out:
            out[canon] = value
    return out
