"""Generate the labelled corpus of real training runs for the detection benchmark.

Every run is real torch training on CPU over data that ships offline (scikit-learn's bundled digits,
breast-cancer, wine and diabetes sets; a character-level language model over the source of Python's
own ``textwrap`` module; a small REINFORCE policy that writes token sequences for a reward model).
Healthy runs vary optimizer, schedule, seed and batch size; failing runs have one real cause injected
at a known step (their *onset*, see README.md for how each onset is defined). Each run is written as
``corpus/<run_id>.csv`` (header ``step`` + one column per canonical metric, empty cell = not logged at
that step) and described in ``corpus/labels.json``.

    python benchmarks/detection/generate.py            # build what is missing (cached)
    python benchmarks/detection/generate.py --force    # regenerate everything
    python benchmarks/detection/generate.py --only digits-healthy-00 digits-nonfinite-00 --out /tmp/c

Everything is seeded: the same command writes the same bytes (one torch thread, no wall-clock
metrics; ``step_time`` comes from a seeded cost model, because wall time on a shared machine measures
the neighbours, not the run).
"""

from __future__ import annotations

import argparse
import codecs
import copy
import csv
import json
import math
import random
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
CORPUS_VERSION = 1

FAILURE_TYPES = (
    "nonfinite", "lr_schedule_bug", "lr_too_high", "corrupted_batches", "lr_zero", "overfitting",
    "vanishing_gradients", "batch_size_change", "gradient_explosion", "reward_hacking", "entropy_collapse",
)
SUPERVISED_COLUMNS = ("loss", "val_loss", "grad_norm", "lr", "batch_size", "step_time")
RL_COLUMNS = ("loss", "grad_norm", "lr", "batch_size", "step_time", "reward_mean", "kl", "entropy",
              "response_length")
EVAL_EVERY = 10


@dataclass
class RunSpec:
    """One run: what trains, how, and what (if anything) goes wrong at which step."""

    run_id: str
    task: str
    optimizer: str
    lr: float
    schedule: str = "constant"
    batch_size: int = 32
    steps: int = 300
    seed: int = 0
    failure: str = "healthy"
    onset: int | None = None
    hidden: int = 64
    depth: int = 1
    activation: str = "relu"
    init_std: float | None = None
    clip: float | None = None
    train_subset: int | None = None
    inject: dict[str, Any] = field(default_factory=dict)


# -- data --------------------------------------------------------------------------------------------
def _split(x, y, seed: int, val_fraction: float = 0.2):
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = int(len(x) * val_fraction)
    return x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]


def _standardize(train, other):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True) + 1e-6
    return (train - mean) / std, (other - mean) / std


def load_task(task: str, seed: int):
    """(x_train, y_train, x_val, y_val, kind, n_out) for a supervised task; all tensors."""
    import torch
    from sklearn import datasets

    if task == "charlm":
        text = Path(textwrap.__file__).read_text(encoding="utf-8") + _zen()
        vocab = sorted(set(text))
        ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
        ctx = 12
        windows = ids.unfold(0, ctx + 1, 1)
        cut = int(len(windows) * 0.9)  # contiguous split: the tail of the text is held out
        x, y = windows[:, :ctx], windows[:, ctx]
        return x[:cut], y[:cut], x[cut:][::4], y[cut:][::4], "lm", len(vocab)
    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine, "diabetes": datasets.load_diabetes}[task]
    data = loader()
    x = torch.tensor(data.data, dtype=torch.float32)
    if task == "diabetes":
        y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
        y = (y - y.mean()) / y.std()
        kind, n_out = "reg", 1
    else:
        y = torch.tensor(data.target, dtype=torch.long)
        kind, n_out = "clf", int(y.max()) + 1
    if task == "digits":
        x = x / 16.0  # pixel intensities 0..16; some pixels are constant, so no per-feature scaling
    xtr, ytr, xva, yva = _split(x, y, seed)
    if task != "digits":
        xtr, xva = _standardize(xtr, xva)
    return xtr, ytr, xva, yva, kind, n_out


def _zen() -> str:
    """The Zen of Python, from the stdlib's ``this`` module (silencing the print on import)."""
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


# -- models, optimizers, schedules -------------------------------------------------------------------
def build_model(spec: RunSpec, n_in: int, n_out: int, kind: str):
    import torch
    from torch import nn

    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[spec.activation]
    layers: list[nn.Module] = []
    if kind == "lm":
        layers += [nn.Embedding(n_out, 16), nn.Flatten()]
        width = 16 * n_in
    else:
        width = n_in
    for _ in range(spec.depth):
        layers += [nn.Linear(width, spec.hidden), act()]
        width = spec.hidden
    layers.append(nn.Linear(width, n_out))
    model = nn.Sequential(*layers)
    if spec.init_std is not None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, spec.init_std)
                    m.bias.zero_()
    return model


def build_optimizer(name: str, params, lr: float):
    import torch

    return {
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
        "sgdm": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9),
        "adam": lambda: torch.optim.Adam(params, lr=lr),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr),
    }[name]()


def schedule_factor(name: str, step: int, steps: int) -> float:
    """The multiplier on the base learning rate at ``step`` for a named schedule."""
    warm = max(1, steps // 10)
    if name == "constant":
        return 1.0
    if name == "warmup_cosine":
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "step":
        return 0.3 ** (step // 100)
    if name == "linear":
        return 1.0 - step / steps
    if name == "warmup_forever":  # the bug: the warmup ramp never hands over to the decay
        return (step + 1) / warm
    raise ValueError(f"unknown schedule {name!r}")


class StepClock:
    """Seeded per-step wall time: a cost model in the batch size, with jitter and rare host hiccups."""

    def __init__(self, seed: int, base: float):
        self.rng = random.Random(7919 * seed + 17)
        self.base = base

    def __call__(self, batch_size: int) -> float:
        t = self.base * (batch_size / 32) ** 0.7 * math.exp(self.rng.gauss(0.0, 0.06))
        if self.rng.random() < 0.005:
            t *= 1.8
        return t


# -- supervised training -------------------------------------------------------------------------------
def train_supervised(spec: RunSpec) -> list[dict[str, float]]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(spec.seed)
    xtr, ytr, xva, yva, kind, n_out = load_task(spec.task, spec.seed)
    if spec.train_subset:
        xtr, ytr = xtr[: spec.train_subset], ytr[: spec.train_subset]
    if "train_label_noise" in spec.inject:  # a small, noisy training set: memorizing it is overfitting
        flip = torch.Generator().manual_seed(spec.seed + 7)
        pick = torch.rand(len(ytr), generator=flip) < spec.inject["train_label_noise"]
        if kind == "reg":
            ytr = torch.where(pick.unsqueeze(1), ytr + 2 * torch.randn(ytr.shape, generator=flip), ytr)
        else:
            ytr = torch.where(pick, torch.randint(0, n_out, ytr.shape, generator=flip), ytr)
    model = build_model(spec, xtr.shape[1], n_out, kind)
    params = list(model.parameters())
    optimizer = build_optimizer(spec.optimizer, params, spec.lr)
    loss_fn: Callable = F.mse_loss if kind == "reg" else F.cross_entropy
    gen = torch.Generator().manual_seed(spec.seed)
    noise = torch.Generator().manual_seed(spec.seed + 99)
    clock = StepClock(spec.seed, {"charlm": 0.012, "digits": 0.004}.get(spec.task, 0.002))
    inj, onset = spec.inject, spec.onset if spec.onset is not None else spec.steps + 1
    rows = []
    for step in range(spec.steps):
        lr = spec.lr * schedule_factor(spec.schedule, step, spec.steps)
        if step >= onset and "lr_mult" in inj:
            lr *= inj["lr_mult"]
        if step >= onset and inj.get("lr_zero"):
            lr = 0.0
        for group in optimizer.param_groups:
            group["lr"] = lr
        bs = inj["batch_size"] if step >= onset and "batch_size" in inj else spec.batch_size
        idx = torch.randint(0, len(xtr), (bs,), generator=gen)
        xb, yb = xtr[idx].clone(), ytr[idx].clone()
        burst = onset <= step < onset + inj.get("burst", 0)
        if "nonfinite" in inj and step == onset:
            if kind == "lm":  # token ids cannot hold an Inf: the corruption hits an embedding row
                with torch.no_grad():
                    model[0].weight[xb[0, 0]] = float(inj["nonfinite"])
            else:
                xb[0, 0] = float(inj["nonfinite"])
        if burst and inj.get("label_noise"):
            if kind == "reg":
                yb = torch.randn(yb.shape, generator=noise) * 5
            else:
                yb = torch.randint(0, n_out, yb.shape, generator=noise)
        if burst and inj.get("input_scale"):
            if kind == "lm":
                xb = torch.randint(0, n_out, xb.shape, generator=noise)
                yb = torch.randint(0, n_out, yb.shape, generator=noise)
            else:
                xb = xb * inj["input_scale"]
        model.train()
        loss = loss_fn(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        clip = spec.clip if (spec.clip and not (step >= onset and inj.get("remove_clip"))) else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        row = {"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr,
               "batch_size": bs, "step_time": clock(bs)}
        if step % EVAL_EVERY == 0 or step == spec.steps - 1:
            model.eval()
            with torch.no_grad():
                row["val_loss"] = float(loss_fn(model(xva), yva))
        rows.append(row)
    return rows


# -- RL: a REINFORCE policy writing token sequences for an exploitable reward model ----------------
RL_VOCAB, RL_EOS, RL_MAX_LEN, RL_TARGET_LEN = 8, 0, 40, 8


def reward_model(tokens, lengths, exploitable: bool):
    """Score sequences. The proper model rewards 'good' tokens (1-3) per token and a length near 8;
    the exploitable one (a bug: a sum instead of a mean, no length term) pays for every extra token."""
    import torch

    mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    good = (((tokens >= 1) & (tokens <= 3)) & mask).float().sum(1)
    if exploitable:
        return 0.25 * good + 0.05 * lengths.float()
    return good / lengths.clamp(min=1).float() - (lengths.float() - RL_TARGET_LEN).abs() / RL_TARGET_LEN


class Policy:
    """Autoregressive token policy: logits from (position, previous token) through a small MLP."""

    def __init__(self):
        from torch import nn

        self.net = nn.Sequential(nn.Linear(RL_MAX_LEN + RL_VOCAB, 64), nn.Tanh(), nn.Linear(64, RL_VOCAB))

    def logits(self, prev, pos: int):
        import torch
        import torch.nn.functional as F

        feats = torch.cat([F.one_hot(torch.full_like(prev, pos), RL_MAX_LEN).float(),
                           F.one_hot(prev, RL_VOCAB).float()], dim=1)
        return self.net(feats)


def train_rl(spec: RunSpec) -> list[dict[str, float]]:
    import torch

    torch.manual_seed(spec.seed)
    policy = Policy()
    reference = copy.deepcopy(policy)
    for p in reference.net.parameters():
        p.requires_grad_(False)
    params = list(policy.net.parameters())
    optimizer = build_optimizer(spec.optimizer, params, spec.lr)
    gen = torch.Generator().manual_seed(spec.seed)
    clock = StepClock(spec.seed, 0.03)
    inj, onset = spec.inject, spec.onset if spec.onset is not None else spec.steps + 1
    kl_coef, ent_coef = 0.05, 0.01
    rows = []
    for step in range(spec.steps):
        after = step >= onset
        lr = spec.lr * schedule_factor(spec.schedule, step, spec.steps) * (inj.get("lr_mult", 1.0) if after else 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        b = spec.batch_size
        prev = torch.full((b,), RL_EOS, dtype=torch.long)
        alive = torch.ones(b, dtype=torch.bool)
        lengths = torch.zeros(b, dtype=torch.long)
        tokens = torch.zeros(b, RL_MAX_LEN, dtype=torch.long)
        logp = torch.zeros(b)
        kl = torch.zeros(b)
        ent_sum = torch.zeros(b)
        for pos in range(RL_MAX_LEN):
            dist = torch.distributions.Categorical(logits=policy.logits(prev, pos))
            with torch.no_grad():
                ref_logp_all = torch.log_softmax(reference.logits(prev, pos), dim=1)
            tok = torch.multinomial(dist.probs.detach(), 1, generator=gen).squeeze(1)
            step_logp = dist.log_prob(tok)
            live = alive.float()
            logp = logp + step_logp * live
            kl = kl + (step_logp.detach() - ref_logp_all.gather(1, tok.unsqueeze(1)).squeeze(1)) * live
            ent_sum = ent_sum + dist.entropy() * live
            tokens[:, pos] = tok
            lengths = lengths + alive.long()
            alive = alive & (tok != RL_EOS)
            prev = tok
            if not alive.any():
                break
        exploitable = after and inj.get("exploitable_rm", False)
        reward = reward_model(tokens, lengths, exploitable)
        coef_kl = 0.0 if after and inj.get("drop_kl") else kl_coef
        coef_ent = 0.0 if after and inj.get("drop_entropy") else ent_coef
        shaped = reward - coef_kl * kl
        advantage = shaped - shaped.mean()
        entropy = ent_sum / lengths.float()
        loss = -(advantage * logp).mean() - coef_ent * entropy.mean()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, spec.clip or math.inf))
        optimizer.step()
        rows.append({"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr,
                     "batch_size": b, "step_time": clock(b) * float(lengths.float().mean()) / RL_TARGET_LEN,
                     "reward_mean": float(reward.mean()), "kl": float(kl.mean()),
                     "entropy": float(entropy.mean().detach()), "response_length": float(lengths.float().mean())})
    return rows


# -- the corpus ----------------------------------------------------------------------------------------
def corpus_specs() -> list[RunSpec]:
    """Every run of the corpus, in a fixed order (the split in run.py relies on it)."""
    specs: list[RunSpec] = []
    rng = random.Random(2024)
    optimizers = {"sgd": 0.1, "sgdm": 0.03, "adam": 2e-3, "adamw": 2e-3, "rmsprop": 1e-3}
    schedules = ("constant", "warmup_cosine", "step", "linear")
    batch_sizes = (8, 16, 32, 64, 128)
    tasks = {"digits": 10, "breast_cancer": 7, "wine": 6, "diabetes": 7, "charlm": 8}
    for task, n in tasks.items():
        for i in range(n):
            opt = list(optimizers)[(i + len(task)) % len(optimizers)]
            lr = optimizers[opt] * (2.0 if task == "charlm" and opt != "sgd" else 1.0)
            bs = batch_sizes[(3 * i + len(task)) % len(batch_sizes)]
            if task == "wine":
                bs = min(bs, 32)
            specs.append(RunSpec(f"{task}-healthy-{i:02d}", task, opt, lr, schedules[i % 4], bs,
                                 seed=100 + i, hidden=rng.choice((32, 64, 128)),
                                 clip=1.0 if i % 3 == 0 else None))
    for i in range(10):
        opt = ("adam", "adamw", "rmsprop", "adam", "sgdm")[i % 5]
        specs.append(RunSpec(f"rl-healthy-{i:02d}", "rl", opt,
                             {"adam": 3e-3, "adamw": 3e-3, "rmsprop": 1e-3, "sgdm": 0.02}[opt],
                             ("constant", "warmup_cosine", "linear")[i % 3], (16, 32, 64)[i % 3],
                             steps=200, seed=200 + i, clip=1.0))

    def failing(kind: str, variants: Iterable[dict[str, Any]]) -> None:
        for i, v in enumerate(variants):
            base = dict(task="digits", optimizer="sgdm", lr=0.03, schedule="constant", batch_size=32,
                        seed=300 + 10 * FAILURE_TYPES.index(kind) + i)
            base.update(v)
            specs.append(RunSpec(f"{base['task']}-{kind}-{i:02d}", failure=kind, **base))

    failing("nonfinite", [
        dict(onset=180, inject={"nonfinite": math.inf}),
        dict(task="breast_cancer", optimizer="adam", lr=2e-3, onset=120, inject={"nonfinite": math.nan}),
        dict(task="charlm", optimizer="adamw", lr=4e-3, schedule="warmup_cosine", onset=210,
             inject={"nonfinite": math.inf}),
        dict(task="diabetes", optimizer="rmsprop", lr=1e-3, batch_size=16, onset=90,
             inject={"nonfinite": math.inf}),
        dict(task="wine", optimizer="sgd", lr=0.1, batch_size=16, onset=240, inject={"nonfinite": math.nan}),
        dict(optimizer="adamw", lr=2e-3, schedule="step", batch_size=64, onset=150,
             inject={"nonfinite": -math.inf}),
    ])
    failing("lr_schedule_bug", [
        dict(onset=150, inject={"lr_mult": 100.0}),
        dict(task="breast_cancer", optimizer="sgd", lr=0.1, onset=170, inject={"lr_mult": 100.0}),
        dict(task="charlm", optimizer="adam", lr=4e-3, onset=140, inject={"lr_mult": 30.0}),
        dict(task="diabetes", optimizer="adamw", lr=2e-3, onset=200, inject={"lr_mult": 100.0}),
        dict(optimizer="sgdm", lr=0.1, schedule="warmup_forever", onset=30),
        dict(task="charlm", optimizer="sgdm", lr=0.3, schedule="warmup_forever", onset=30),
    ])
    failing("lr_too_high", [
        dict(optimizer="adam", lr=0.3, onset=0),
        dict(optimizer="sgdm", lr=3.0, onset=0),
        dict(task="charlm", optimizer="adam", lr=0.2, onset=0),
        dict(task="breast_cancer", optimizer="rmsprop", lr=0.3, onset=0),
        dict(task="diabetes", optimizer="sgd", lr=1.5, onset=0, hidden=128),
        dict(task="wine", optimizer="adamw", lr=0.5, batch_size=16, onset=0),
    ])
    failing("corrupted_batches", [
        dict(onset=160, inject={"label_noise": True, "burst": 30}),
        dict(task="charlm", optimizer="adam", lr=4e-3, onset=180, inject={"input_scale": True, "burst": 25}),
        dict(task="diabetes", optimizer="adam", lr=2e-3, onset=150, inject={"label_noise": True, "burst": 30}),
        dict(optimizer="adamw", lr=2e-3, schedule="warmup_cosine", onset=200,
             inject={"input_scale": 50.0, "burst": 20}),
        dict(task="breast_cancer", optimizer="sgdm", onset=140, inject={"input_scale": 30.0, "burst": 25}),
        dict(task="wine", optimizer="rmsprop", lr=1e-3, batch_size=16, onset=170,
             inject={"label_noise": True, "burst": 40}),
    ])
    failing("lr_zero", [
        dict(onset=100, inject={"lr_zero": True}),
        dict(task="charlm", optimizer="adam", lr=4e-3, schedule="warmup_cosine", onset=120,
             inject={"lr_zero": True}),
        dict(task="breast_cancer", optimizer="adamw", lr=2e-3, onset=80, inject={"lr_zero": True}),
        dict(task="diabetes", optimizer="sgd", lr=0.05, onset=150, inject={"lr_zero": True}),
        dict(optimizer="rmsprop", lr=1e-3, schedule="step", onset=60, inject={"lr_zero": True}),
        dict(task="wine", optimizer="sgdm", batch_size=16, onset=130, inject={"lr_zero": True}),
    ])
    big = dict(hidden=512, depth=2, batch_size=16, steps=400)
    failing("overfitting", [  # onset is read off the validation curve (see label_overfit_onset)
        dict(big, optimizer="adam", lr=2e-3, train_subset=150, inject={"train_label_noise": 0.4}),
        dict(big, optimizer="adamw", lr=3e-3, train_subset=100, inject={"train_label_noise": 0.3}),
        dict(big, task="breast_cancer", optimizer="adam", lr=3e-3, train_subset=80,
             inject={"train_label_noise": 0.3}),
        dict(big, task="diabetes", optimizer="adam", lr=2e-3, train_subset=60, inject={"train_label_noise": 0.5}),
        dict(big, task="charlm", optimizer="adam", lr=3e-3, train_subset=600, batch_size=32),
        dict(big, task="wine", optimizer="rmsprop", lr=1e-3, train_subset=40, batch_size=8,
             inject={"train_label_noise": 0.3}),
    ])
    failing("vanishing_gradients", [
        dict(optimizer="sgd", lr=0.05, depth=10, activation="sigmoid", onset=0),
        dict(optimizer="sgdm", lr=0.02, depth=8, activation="sigmoid", init_std=0.01, onset=0),
        dict(task="breast_cancer", optimizer="sgd", lr=0.1, depth=12, activation="sigmoid", onset=0),
        dict(task="wine", optimizer="sgdm", lr=0.02, depth=10, activation="sigmoid", batch_size=16, onset=0),
        dict(task="charlm", optimizer="sgd", lr=0.1, depth=10, activation="sigmoid", onset=0),
        dict(optimizer="adam", lr=1e-4, depth=6, activation="tanh", init_std=1e-3, onset=0),
    ])
    failing("batch_size_change", [
        dict(batch_size=64, onset=150, inject={"batch_size": 4}),
        dict(task="charlm", optimizer="adam", lr=4e-3, batch_size=64, onset=160, inject={"batch_size": 2}),
        dict(task="breast_cancer", optimizer="sgd", lr=0.1, batch_size=32, onset=120, inject={"batch_size": 512}),
        dict(task="diabetes", optimizer="sgdm", lr=0.03, batch_size=64, onset=140, inject={"batch_size": 2}),
        dict(optimizer="adam", lr=2e-3, batch_size=16, onset=180, inject={"batch_size": 256}),
        dict(task="wine", optimizer="rmsprop", lr=1e-3, batch_size=32, onset=100, inject={"batch_size": 2}),
    ])
    failing("gradient_explosion", [
        dict(task="diabetes", optimizer="sgd", lr=0.5, clip=0.05, onset=150, inject={"remove_clip": True}),
        dict(task="charlm", optimizer="sgdm", lr=0.5, clip=0.05, onset=170, inject={"remove_clip": True}),
        dict(optimizer="sgdm", lr=1.0, clip=0.1, onset=140, inject={"remove_clip": True}),
        dict(task="breast_cancer", optimizer="sgd", lr=3.0, clip=0.1, onset=160, inject={"remove_clip": True}),
        dict(task="diabetes", optimizer="sgdm", lr=0.3, clip=0.05, hidden=128, onset=120,
             inject={"remove_clip": True}),
        dict(task="charlm", optimizer="sgd", lr=3.0, clip=0.1, onset=180,
             inject={"remove_clip": True}),
    ])
    rl = dict(task="rl", optimizer="adam", lr=3e-3, batch_size=32, steps=200, clip=1.0)
    failing("reward_hacking", [
        dict(rl, onset=80, inject={"exploitable_rm": True}),
        dict(rl, onset=100, optimizer="adamw", inject={"exploitable_rm": True, "drop_kl": True}),
        dict(rl, onset=60, batch_size=16, inject={"exploitable_rm": True}),
        dict(rl, onset=120, optimizer="rmsprop", lr=1e-3, inject={"exploitable_rm": True, "drop_kl": True}),
        dict(rl, onset=90, batch_size=64, inject={"exploitable_rm": True, "lr_mult": 2.0}),
        dict(rl, onset=70, schedule="warmup_cosine", inject={"exploitable_rm": True, "drop_kl": True}),
    ])
    failing("entropy_collapse", [
        dict(rl, onset=80, inject={"drop_entropy": True, "drop_kl": True, "lr_mult": 10.0}),
        dict(rl, onset=100, optimizer="adamw", inject={"drop_entropy": True, "drop_kl": True, "lr_mult": 10.0}),
        dict(rl, onset=60, batch_size=16, inject={"drop_entropy": True, "drop_kl": True, "lr_mult": 8.0}),
        dict(rl, onset=120, optimizer="rmsprop", lr=1e-3, inject={"drop_entropy": True, "drop_kl": True,
                                                                  "lr_mult": 20.0}),
        dict(rl, onset=90, batch_size=64, inject={"drop_entropy": True, "drop_kl": True, "lr_mult": 10.0}),
        dict(rl, onset=70, optimizer="sgdm", lr=0.02, inject={"drop_entropy": True, "drop_kl": True,
                                                              "lr_mult": 10.0}),
    ])
    return specs


def label_overfit_onset(rows: list[dict[str, float]]) -> int:
    """The eval step of the lowest validation loss: from there on the model only gets worse on
    held-out data while it keeps fitting (and memorizing) the training set."""
    evals = [(r["val_loss"], int(r["step"])) for r in rows if "val_loss" in r]
    return min(evals)[1]


def run_one(spec: RunSpec) -> tuple[list[dict[str, float]], dict[str, Any]]:
    rows = train_rl(spec) if spec.task == "rl" else train_supervised(spec)
    onset = spec.onset
    if spec.failure == "overfitting":
        onset = label_overfit_onset(rows)
    label = {"run_id": spec.run_id, "failure": spec.failure, "onset": onset, "steps": len(rows),
             "task": spec.task, "optimizer": spec.optimizer, "lr": spec.lr, "schedule": spec.schedule,
             "batch_size": spec.batch_size, "seed": spec.seed,
             "inject": {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                        for k, v in spec.inject.items()},
             "spec": {k: v for k, v in asdict(spec).items() if k not in ("inject",)}}
    return rows, label


def _fmt(x: float) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e15):
        return str(int(x))
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


def write_csv(path: Path, rows: list[dict[str, float]], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("step",) + columns)
        for r in rows:
            w.writerow([r["step"]] + [_fmt(r[c]) if c in r else "" for c in columns])


def generate(out: Path = CORPUS, force: bool = False, only: Iterable[str] | None = None,
             verbose: bool = True) -> dict[str, Any]:
    """Build (or reuse) the corpus under ``out``; return the labels document."""
    import torch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    specs = corpus_specs()
    if only is not None:
        wanted = set(only)
        unknown = wanted - {s.run_id for s in specs}
        if unknown:
            raise SystemExit(f"unknown run ids: {sorted(unknown)}")
        specs = [s for s in specs if s.run_id in wanted]
    labels_path = out / "labels.json"
    old = json.loads(labels_path.read_text()) if labels_path.exists() else {}
    cached = {r["run_id"]: r for r in old.get("runs", [])} if old.get("version") == CORPUS_VERSION else {}
    t0 = time.perf_counter()
    for spec in specs:
        csv_path = out / f"{spec.run_id}.csv"
        if spec.run_id in cached and csv_path.exists() and not force:
            continue
        t = time.perf_counter()
        rows, label = run_one(spec)
        write_csv(csv_path, rows, RL_COLUMNS if spec.task == "rl" else SUPERVISED_COLUMNS)
        cached[spec.run_id] = label
        if verbose:
            last = rows[-1]
            print(f"{spec.run_id:34s} {time.perf_counter() - t:5.1f}s onset={label['onset']} "
                  f"loss={last['loss']:.4g} val={last.get('val_loss', float('nan')):.4g}", flush=True)
    order = [s.run_id for s in corpus_specs()]  # labels in corpus order; runs generated earlier are kept
    runs = [cached[run_id] for run_id in order if run_id in cached]
    doc = {"version": CORPUS_VERSION, "eval_every": EVAL_EVERY, "failure_types": list(FAILURE_TYPES),
           "runs": runs}
    labels_path.write_text(json.dumps(doc, indent=1) + "\n")
    if verbose:
        print(f"{len(runs)} runs in {out} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=CORPUS, help="corpus folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="regenerate (the selected) runs even when cached")
    p.add_argument("--only", nargs="+", metavar="RUN_ID", help="generate just these runs")
    p.add_argument("--list", action="store_true", help="print the run ids and exit")
    args = p.parse_args(argv)
    if args.list:
        for s in corpus_specs():
            print(s.run_id, s.failure, s.onset)
        return 0
    generate(args.out, force=args.force, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
