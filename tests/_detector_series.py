"""Real metric series for the detector tests: tiny torch trainings, healthy and with injected failures.

Supervised runs train an MLP on scikit-learn's bundled digits (no download); RLHF runs are a real PPO
bandit (a categorical policy over responses of known length and quality), a real DPO run on preference
pairs, and a real logistic reward model whose calibration is measured on held-out data. Each scenario
returns its metric events and the step where the failure was injected (None when healthy). Results are
cached for the test session: every scenario trains once.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

from detectors import MetricEvent

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> float:
    with open("/proc/self/statm", "rb") as f:
        return float(int(f.read().split()[1]) * _PAGE)


@dataclass
class Series:
    name: str
    events: list[MetricEvent]
    inject_at: int | None


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def _digits():
    torch = _torch()
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


SUPERVISED = ("healthy", "healthy_small_batch", "healthy_adam_cosine", "lr_jump", "nan", "lr_zero",
              "zero_grad_bug", "overfit", "healthy_val", "batch_shrink", "memory_leak", "slow_steps")


@functools.cache
def supervised(scenario: str, steps: int = 300, seed: int = 0) -> Series:
    """One digits-MLP run of ``scenario`` (see SUPERVISED), with the metrics the torch producer sends."""
    torch = _torch()
    F = torch.nn.functional
    torch.manual_seed(seed)
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = perm[:1297], perm[1297:]
    if scenario == "overfit":
        # memorising 100 examples, 30 % of them mislabelled: the textbook way to overfit
        train_idx = train_idx[:100]
        y = y.clone()
        noisy = train_idx[:30]
        y[noisy] = (y[noisy] + 1 + torch.randint(0, 9, (30,), generator=torch.Generator().manual_seed(seed))) % 10
    hidden = 256 if scenario == "overfit" else 64
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    batch = {"healthy_small_batch": 4, "batch_shrink": 64, "overfit": 40}.get(scenario, 32)
    if scenario == "healthy_adam_cosine":
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        warm = 30
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    elif scenario == "overfit":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = None
    else:
        lr = 0.02 if scenario == "healthy_small_batch" else 0.05
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0) if scenario == "lr_zero" else None
    inject_at = {"lr_jump": steps // 2, "nan": int(steps * 0.6), "zero_grad_bug": steps // 2,
                 "batch_shrink": steps // 2, "slow_steps": steps // 2, "lr_zero": 0, "overfit": 0,
                 "memory_leak": 0}.get(scenario)
    gen = torch.Generator().manual_seed(seed)
    leak = []
    events = []
    last = time.perf_counter()
    for step in range(steps):
        if scenario == "lr_jump" and step == inject_at:
            for g in opt.param_groups:
                g["lr"] *= 100
        if scenario == "batch_shrink" and step == inject_at:
            batch = 2
        idx = train_idx[torch.randint(0, len(train_idx), (batch,), generator=gen)]
        xb, yb = x[idx], y[idx]
        if scenario == "nan" and step >= inject_at:
            xb = xb.clone()
            xb[0, 0] = float("inf")
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        if scenario == "zero_grad_bug" and step >= inject_at:
            opt.zero_grad(set_to_none=False)  # the bug: gradients cleared between backward and step
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        if sched is not None:
            sched.step()
        if scenario == "memory_leak":
            # tensors kept in a list every step (the classic leak): 0.7 % of the process's starting RSS each,
            # so the leak is the same size relative to a small test process and to a whole suite's
            if not leak:
                leak_floats = int(_rss() * 0.007 / 4)
            leak.append(torch.ones(leak_floats))
        if scenario == "slow_steps" and inject_at <= step < inject_at + 30:
            time.sleep(0.02)  # a starved data loader
        now = time.perf_counter()
        metrics = {"loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr_now, "batch_size": batch,
                   "step_time": now - last, "rss": _rss()}
        last = now
        if scenario in ("overfit", "healthy_val") and step % 10 == 9:
            with torch.no_grad():
                metrics["val_loss"] = float(F.cross_entropy(model(x[val_idx]), y[val_idx]))
        events.append(MetricEvent(run_id=scenario, step=step, metrics=metrics, ts=1_700_000_000.0 + step))
    return Series(scenario, events, inject_at)


RLHF = ("ppo_healthy", "ppo_hacking", "ppo_kl_blowup", "ppo_entropy_collapse")


@functools.cache
def ppo(scenario: str, steps: int = 240, seed: int = 0) -> Series:
    """PPO on a bandit: a policy over 64 responses (length, quality), KL-penalised to its start.

    ``ppo_hacking`` switches to a proxy reward that also pays for length, without a KL penalty;
    ``ppo_kl_blowup`` multiplies the learning rate by 30 at the middle and drops the KL penalty;
    ``ppo_entropy_collapse`` pays for one response only, without KL penalty and with a large learning
    rate, from the middle.
    """
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    k = 64
    length = 30 + 400 * torch.rand(k, generator=g) ** 2
    quality = torch.randn(k, generator=g)
    logits = torch.nn.Parameter(0.1 * torch.randn(k, generator=g))
    ref = torch.log_softmax(logits.detach().clone(), 0)
    opt = torch.optim.Adam([logits], lr=0.01)
    beta = 1.0
    inject_at = {"ppo_hacking": steps // 3, "ppo_kl_blowup": steps // 2,
                 "ppo_entropy_collapse": steps // 2}.get(scenario)
    events = []
    for step in range(steps):
        if scenario == "ppo_kl_blowup" and step == inject_at:
            opt.param_groups[0]["lr"] *= 30
            beta = 0.0
        if scenario == "ppo_hacking" and step == inject_at:
            beta, opt.param_groups[0]["lr"] = 0.0, 0.03
        hacking = scenario == "ppo_hacking" and step >= inject_at
        with torch.no_grad():
            old = torch.log_softmax(logits, 0)
            actions = torch.multinomial(old.exp(), 64, replacement=True, generator=g)
            reward = quality[actions] + 0.3 * torch.randn(64, generator=g)
            if hacking:
                reward = reward + 0.01 * length[actions]
            if scenario == "ppo_entropy_collapse" and step >= inject_at:
                reward = (actions == int(quality.argmax())).float() * 5.0
            adv = (reward - reward.mean()) / (reward.std() + 1e-6)
        if scenario == "ppo_entropy_collapse" and step == inject_at:
            beta, opt.param_groups[0]["lr"] = 0.0, 0.3
        for _ in range(4):
            logp = torch.log_softmax(logits, 0)
            ratio = torch.exp(logp[actions] - old[actions])
            clipped = torch.clamp(ratio, 0.8, 1.2)
            kl_ref = (logp.exp() * (logp - ref)).sum()
            loss = -torch.min(ratio * adv, clipped * adv).mean() + beta * kl_ref
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logp = torch.log_softmax(logits, 0)
            p = logp.exp()
            ratio = torch.exp(logp[actions] - old[actions])
            metrics = {
                "objective/kl": float((p * (logp - ref)).sum()),
                "objective/entropy": float(-(p * logp).sum()),
                "env/reward_mean": float(reward.mean()), "env/reward_std": float(reward.std()),
                "completions/mean_length": float(length[actions].mean()),
                "policy/clipfrac": float(((ratio - 1).abs() > 0.2).float().mean()),
                "policy/ratio": float(ratio.mean()), "loss": float(loss.detach()),
            }
        events.append(MetricEvent(run_id=scenario, step=step, metrics=metrics, ts=1_700_000_000.0 + step))
    return Series(scenario, events, inject_at)


@functools.cache
def dpo(scenario: str, steps: int = 240, seed: int = 0) -> Series:
    """DPO of a linear log-probability model on preference pairs; ``dpo_swapped`` swaps chosen/rejected
    from the middle (a data-pipeline bug), which collapses the reward margin."""
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    dim, n = 16, 2048
    true_w = torch.randn(dim, generator=g)
    a, b = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    prefer_a = (a @ true_w > b @ true_w).unsqueeze(1)
    chosen, rejected = torch.where(prefer_a, a, b), torch.where(prefer_a, b, a)
    w = torch.nn.Parameter(torch.zeros(dim))
    opt = torch.optim.Adam([w], lr=0.01)
    beta = 0.1
    inject_at = steps // 2 if scenario == "dpo_swapped" else None
    events = []
    for step in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        c, r = chosen[idx], rejected[idx]
        if inject_at is not None and step >= inject_at:
            c, r = r, c
        chosen_reward, rejected_reward = beta * (c @ w), beta * (r @ w)  # log-ratios vs a zero reference
        margin = chosen_reward - rejected_reward
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            metrics = {"loss": float(loss), "rewards/chosen": float(chosen_reward.mean()),
                       "rewards/rejected": float(rejected_reward.mean()), "rewards/margins": float(margin.mean()),
                       "rewards/accuracies": float((margin > 0).float().mean())}
        events.append(MetricEvent(run_id=scenario, step=step, metrics=metrics, ts=1_700_000_000.0 + step))
    return Series(scenario, events, inject_at)


@functools.cache
def reward_model(scenario: str, steps: int = 300, seed: int = 0) -> Series:
    """A logistic reward model on scikit-learn's breast-cancer set, evaluated on held-out data every 5
    steps (ECE from calibration bins, score distribution). ``rm_unscaled_eval`` stops standardising the
    evaluation inputs from the middle (a preprocessing bug): scores saturate, calibration breaks."""
    torch = _torch()
    from sklearn.datasets import load_breast_cancer

    from detectors.rlhf import calibration_bins

    data = load_breast_cancer()
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=g)
    tr, ev = perm[:400], perm[400:]
    mean, std = x[tr].mean(0), x[tr].std(0)
    model = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inject_at = steps // 2 if scenario == "rm_unscaled_eval" else None
    events = []
    for step in range(steps):
        idx = tr[torch.randint(0, len(tr), (32,), generator=g)]
        logits = model((x[idx] - mean) / std).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = {"loss": float(loss.detach())}
        if step % 5 == 4:
            with torch.no_grad():
                xe = x[ev] if inject_at is not None and step >= inject_at else (x[ev] - mean) / std
                scores = model(xe).squeeze(1)
                metrics.update(calibration_bins(torch.sigmoid(scores).numpy(), y[ev].numpy()))
                metrics["reward_mean"], metrics["reward_std"] = float(scores.mean()), float(scores.std())
        events.append(MetricEvent(run_id=scenario, step=step, metrics=metrics, ts=1_700_000_000.0 + step))
    return Series(scenario, events, inject_at)
