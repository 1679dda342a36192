"""RLHF and reward-model detectors: calibration, reward drift, KL blow-up, entropy collapse, reward
hacking, length explosion, PPO clipping out of band and DPO reward-margin collapse.

Metric names are the canonical ones (``kl``, ``entropy``, ``reward_mean``, ``reward_std``,
``response_length``, ``clipfrac``, ``ratio``, ``reward_margin``, ``reward_accuracy``, ``ece``); TRL's
``objective/kl``, ``rewards/margins``, ``completions/mean_length`` ... reach them through the alias map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import pairwise

import numpy as np

from .alerts import Alert
from .base import Detector, cadence, is_sparse, register_detector
from .events import MetricEvent
from .stats import compact, ema, push, robust_center_scale
from .stats import median as _median

__all__ = [
    "CalibrationDetector", "RewardDistributionDriftDetector", "KLBlowupDetector", "EntropyCollapseDetector",
    "LengthExplosionDetector", "RewardHackingDetector", "RewardCollapseDetector", "PPOClipDetector",
    "DPOMarginCollapseDetector",
    "calibration_bins", "ece_from_metrics", "REWARD_DRIFT_DEFAULTS", "RLHF_DEFAULTS",
]

#: the ``[reward_drift]`` section (first two keys are users' existing keys)
REWARD_DRIFT_DEFAULTS = {
    "drift_threshold": 0.1,
    "calibration_threshold": 0.7,
    "baseline": 20,
    "shift_threshold": 2.0,
    "patience": 3,
    "resolve_after": 5,
}

#: the ``[rlhf]`` section
#: rewards kept for the noise of their point-to-point changes (``RewardCollapseDetector``)
REWARD_NOISE_POINTS = 20

RLHF_DEFAULTS = {
    "window": 30,
    "persist": 5,
    "kl_threshold": 20.0,
    "kl_ratio": 10.0,
    "kl_floor": 1.0,
    "entropy_ratio": 0.2,
    "entropy_drop": 0.5,
    "entropy_floor": 0.1,
    "length_ratio": 2.5,
    "hack_kl_ratio": 5.0,
    "hack_kl_min": 10.0,
    "hack_length_ratio": 2.0,
    "clipfrac_max": 0.3,
    "ratio_low": 0.8,
    "ratio_high": 1.25,
    "margin_collapse_ratio": 0.2,
    "margin_floor": 0.5,
    "reward_drop": 0.5,
    "reward_flat_points": 20,
    "resolve_after": 20,
}


def calibration_bins(probs: Sequence[float], outcomes: Sequence[float], n_bins: int = 10) -> dict[str, float]:
    """Reliability-diagram metrics of predicted probabilities vs 0/1 outcomes, plus their ECE.

    ECE (Naeini et al. 2015) is the count-weighted mean gap between a bin's mean confidence and its
    observed frequency. The result is flat metrics (``ece``, ``calibration_bin3_confidence`` ...) ready to
    travel in a metric event.

    >>> m = calibration_bins([0.9, 0.8, 0.95, 0.2, 0.1], [1, 1, 0, 0, 0], n_bins=5)
    >>> round(m["ece"], 3), m["calibration_bin4_count"]
    (0.19, 3.0)
    """
    p = np.clip(np.asarray(probs, dtype=float).ravel(), 0.0, 1.0)
    y = np.asarray(outcomes, dtype=float).ravel()
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"need as many outcomes as predictions, got {p.size} and {y.size}")
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out: dict[str, float] = {}
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        if not mask.any():
            continue
        conf, acc = float(p[mask].mean()), float(y[mask].mean())
        ece += mask.sum() / p.size * abs(conf - acc)
        out.update({f"calibration_bin{b}_confidence": conf, f"calibration_bin{b}_accuracy": acc,
                    f"calibration_bin{b}_count": float(mask.sum())})
    out["ece"] = float(ece)
    return out


def ece_from_metrics(metrics: Mapping[str, float]) -> float | None:
    """The ECE an event carries: ``ece`` itself, else its calibration bins, else ``|confidence - accuracy|``
    from a paired ``reward_confidence`` / ``reward_accuracy`` (a one-bin ECE)."""
    if "ece" in metrics:
        return metrics["ece"]
    bins = [k[: -len("_count")] for k in metrics if k.startswith("calibration_bin") and k.endswith("_count")]
    if bins:
        total = sum(metrics[f"{b}_count"] for b in bins)
        if total > 0:
            return sum(metrics[f"{b}_count"] / total * abs(metrics[f"{b}_confidence"] - metrics[f"{b}_accuracy"])
                       for b in bins)
    if "reward_confidence" in metrics and "reward_accuracy" in metrics:
        return abs(metrics["reward_confidence"] - metrics["reward_accuracy"])
    return None


def _finite(event: MetricEvent, name: str) -> float | None:
    x = event.metrics.get(name)
    return x if x is not None and math.isfinite(x) else None


@register_detector
class CalibrationDetector(Detector):
    """Reward-model calibration: quality ``1 - ECE`` below ``calibration_threshold``, and ECE drift.

    ECE comes from the event (``ece``, calibration bins, or paired confidence/accuracy, see
    :func:`ece_from_metrics`). ``calibration_poor`` when ``1 - ECE < calibration_threshold``;
    ``calibration_drift`` when ECE rose more than ``drift_threshold`` above its median over the first
    ``baseline`` evaluations. Both ``medium``, ``high`` after ``patience`` evaluations in a row.

    >>> from detectors.events import MetricEvent
    >>> d = CalibrationDetector(baseline=3)
    >>> eces = [0.04, 0.05, 0.03, 0.05, 0.12, 0.2, 0.22, 0.35, 0.36, 0.4]
    >>> [(a.alert_type, a.severity, a.step) for s, e in enumerate(eces) for a in d.update(MetricEvent("r", s, {"ece": e}))]
    [('calibration_drift', 'medium', 5), ('calibration_poor', 'medium', 7), ('calibration_drift', 'high', 7), ('calibration_poor', 'high', 9)]
    """

    name = "calibration"
    category = "reward_drift"
    section = "reward_drift"
    defaults = REWARD_DRIFT_DEFAULTS
    state_fields = ("early", "poor_run", "drift_run")

    def reset(self) -> None:
        self.early: list[float] = []
        self.poor_run = 0
        self.drift_run = 0

    def reads(self, names: tuple[str, ...]) -> bool:
        return any(name == "ece" or name.startswith("calibration_bin") or name in ("reward_confidence", "reward_accuracy")
                   for name in names)

    def update(self, event: MetricEvent) -> list[Alert]:
        ece = ece_from_metrics(event.metrics)
        if ece is None or not math.isfinite(ece):
            return []
        if len(self.early) < self.baseline:
            push(self.early, ece, self.baseline)
        quality = 1.0 - ece
        poor = quality < self.calibration_threshold
        self.poor_run = self.poor_run + 1 if poor else 0
        alerts = self._report(
            event, "calibration_poor", poor, severity="high" if self.poor_run >= self.patience else "medium",
            value=quality, threshold=self.calibration_threshold,
            message=f"calibration quality 1-ECE = {quality:.3f} below {self.calibration_threshold:g} "
                    f"for {self.poor_run} evaluation(s)",
            metadata={"ece": ece})
        if len(self.early) < self.baseline:
            return alerts
        base = _median(self.early)
        drift = ece - base > self.drift_threshold
        self.drift_run = self.drift_run + 1 if drift else 0
        alerts += self._report(
            event, "calibration_drift", drift, severity="high" if self.drift_run >= self.patience else "medium",
            value=ece, threshold=base + self.drift_threshold,
            message=f"ECE {ece:.3f} drifted {ece - base:+.3f} from its early level {base:.3f}",
            metadata={"baseline_ece": base, "evaluations": self.drift_run})
        return alerts


@register_detector
class RewardDistributionDriftDetector(Detector):
    """Reward distribution moving away from its early shape: mean shift in early-σ units, σ ratio.

    The first ``baseline`` observations fix a reference mean and spread (mean ``reward_std``, else the spread
    of ``reward_mean`` itself). After that an EMA (span 10) of mean and σ is compared with it. Rising reward
    is the goal of RL fine-tuning, so an upward shift is ``low``; a fall of more than ``shift_threshold``
    σ, or σ collapsing below ¼ (all responses scored alike) with the mean no higher than it began (with it
    higher, the groups score alike because the task is learned), or widening over 4×, is ``medium``, and
    ``high`` once it has lasted ``baseline`` observations at twice the shift (or the collapse persists) —
    when the run logs ``reward_std``. Without it the σ is the early means' own wobble (an episode return's
    rolling mean barely moves), not the rewards' spread, and the shift stays ``medium``.

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(0)
    >>> d = RewardDistributionDriftDetector()
    >>> ok = [a for s in range(100) for a in d.update(MetricEvent("r", s, {"reward_mean": 1 + s / 100 + rng.gauss(0, .1), "reward_std": 1.0}))]
    >>> [a.severity for a in ok if a.severity in ("high", "critical")]
    []
    >>> bad = [a for s in range(100, 160) for a in d.update(MetricEvent("r", s, {"reward_mean": -4 + rng.gauss(0, .1), "reward_std": 1.0}))]
    >>> [(a.severity, a.step) for a in bad if a.status == "firing"]
    [('medium', 103), ('high', 127)]
    """

    name = "reward_distribution_drift"
    category = "reward_drift"
    section = "reward_drift"
    defaults = REWARD_DRIFT_DEFAULTS
    state_fields = ("early_means", "early_stds", "mean", "std", "run_length")
    metrics = ("reward_mean",)

    def reset(self) -> None:
        self.early_means: list[float] = []
        self.early_stds: list[float] = []
        self.mean: float | None = None
        self.std: float | None = None
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        m, s = _finite(event, "reward_mean"), _finite(event, "reward_std")
        if m is None:
            return []
        if len(self.early_means) < self.baseline:
            push(self.early_means, m, self.baseline)
            if s is not None:
                push(self.early_stds, s, self.baseline)
        self.mean = ema(self.mean, m, 2 / 11)
        if s is not None:
            self.std = ema(self.std, s, 2 / 11)
        if len(self.early_means) < self.baseline:
            return []
        base_mean = float(np.mean(self.early_means))
        base_std = float(np.mean(self.early_stds)) if self.early_stds else float(np.std(self.early_means))
        if base_std <= 0:
            return []
        shift = (self.mean - base_mean) / base_std
        ratio = self.std / base_std if self.std is not None and self.early_stds else 1.0
        down = shift < -self.shift_threshold
        # every response scored alike while the mean is no better than it began: no learning signal. With the
        # mean up, it is the task learned (a GRPO group all correct), not a collapse
        collapsed, widened = ratio < 0.25 and shift <= 0, ratio > 4.0
        up = shift > self.shift_threshold
        strong = shift < -2 * self.shift_threshold or collapsed
        self.run_length = self.run_length + 1 if strong else 0
        active = down or collapsed or widened or up
        if self.run_length >= self.baseline and self.early_stds:
            severity = "high"
        elif down or collapsed or widened:
            severity = "medium"
        else:
            severity = "low"
        return self._report(
            event, "reward_distribution_drift", active, severity=severity, value=shift,
            threshold=self.shift_threshold,
            message=(f"reward distribution moved: mean {self.mean:.4g} is {shift:+.1f} early σ from "
                     f"{base_mean:.4g}, σ ratio {ratio:.2f}"),
            metadata={"baseline_mean": base_mean, "baseline_std": base_std, "std_ratio": ratio})


class _LaggingRatio(Detector):
    """A metric compared with the median of its own last ``window`` ordinary values.

    Values that trip the test do not enter the window, so a sustained blow-up keeps being one; gradual
    change (KL growing as the policy moves, responses lengthening over a long run) moves the median along.
    """

    category = "rlhf"
    section = "rlhf"
    defaults = RLHF_DEFAULTS
    state_fields = ("recent", "run_length", "first_step", "interval")
    metric = ""

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    def reset(self) -> None:
        self.recent: list[float] = []
        self.run_length = 0
        #: the metric's first step and the steps between its first two values (its logging cadence)
        self.first_step: int | None = None
        self.interval: int | None = None

    def _persist(self) -> int:
        """Points a trip must last to be ``high``: ``persist``, or 3 where the metric is logged sparsely (every
        ``SPARSE_INTERVAL`` steps or more) — there ``persist`` points span hundreds of optimizer steps, and a sparse log may hold a dozen."""
        return min(self.persist, 3) if is_sparse(self.interval) else self.persist

    def _step(self, event: MetricEvent) -> tuple[float, float, bool] | None:
        """``(value, median, tripped)`` after warm-up, else None; subclasses define ``_tripped``."""
        x = _finite(event, self.metric)
        if x is None:
            return None
        self.first_step, self.interval = cadence(self.first_step, self.interval, event.step)
        if len(self.recent) < min(self.window, 10):
            # warm-up: a fragment (a few points pasted around an incident) has no median to speak of,
            # so only a jump the subclass calls unmistakable against the largest value so far trips
            ref = max(self.recent) if self.recent else 0.0
            tripped = bool(self.recent) and self._fragment_tripped(x, ref)
            self.run_length = self.run_length + 1 if tripped else 0
            if not tripped:
                push(self.recent, x, self.window)
                if not self.episodes:
                    return None
            return x, ref, tripped
        median = _median(self.recent)
        tripped = self._tripped(x, median)
        self.run_length = self.run_length + 1 if tripped else 0
        if not tripped:
            push(self.recent, x, self.window)
        return x, median, tripped

    def _tripped(self, x: float, median: float) -> bool:
        raise NotImplementedError

    def _fragment_tripped(self, x: float, largest: float) -> bool:
        """During warm-up: whether ``x`` trips against the largest value seen so far (never, by default)."""
        return False


@register_detector
class KLBlowupDetector(_LaggingRatio):
    """KL to the reference policy far above its recent level, or above an absolute ceiling.

    Active when ``kl > kl_threshold``, or ``kl > kl_ratio × median(last window)`` and ``kl > kl_floor``
    (tiny KLs early in a run have meaningless ratios). In the first 10 points (a short fragment, a run's
    start) only ``kl > kl_ratio ×`` the largest KL so far and ``> kl_floor`` counts. ``low`` for one point
    (isolated one-step KL spikes happen in healthy runs), ``medium`` for two, ``high`` after 3 steps, ``critical`` after ``persist`` steps at 5× ``kl_threshold``.

    >>> from detectors.events import MetricEvent
    >>> d = KLBlowupDetector()
    >>> kls = [0.02 * s for s in range(1, 100)] + [25.0, 40.0, 60.0]
    >>> [(a.severity, a.step) for s, k in enumerate(kls) for a in d.update(MetricEvent("r", s, {"kl": k}))]
    [('low', 99), ('medium', 100), ('high', 101)]
    >>> d = KLBlowupDetector()   # a pasted PPO table: the KL leaves 0.017 for 1.76 and stays there
    >>> [(a.severity, a.step) for s, k in enumerate([0.017, 1.76, 3.79, 4.34, 4.47]) for a in d.update(MetricEvent("r", s, {"kl": k}))]
    [('low', 1), ('medium', 2), ('high', 3)]
    """

    name = "kl_blowup"
    metric = "kl"

    def _tripped(self, x: float, median: float) -> bool:
        return x > self.kl_threshold or (x > self.kl_floor and x > self.kl_ratio * max(median, 0.0))

    def _fragment_tripped(self, x: float, largest: float) -> bool:
        # healthy KL grows from ~0 a few-fold per logged point; ten times the largest value so far, past
        # kl_floor, is the policy jumping away (PPO's "crash to a much worse policy")
        return largest > 0 and x > self.kl_floor and x > self.kl_ratio * largest

    def update(self, event: MetricEvent) -> list[Alert]:
        out = self._step(event)
        if out is None:
            return []
        x, median, tripped = out
        severity = ("critical" if self.run_length >= self.persist and x > 5 * self.kl_threshold
                    else "high" if self.run_length >= 3 else "medium" if self.run_length >= 2 else "low")
        return self._report(event, "kl_blowup", tripped, severity=severity, value=x, threshold=self.kl_threshold,
                            message=f"KL {x:.4g} vs recent median {median:.4g} for {self.run_length} step(s)",
                            metadata={"median": median, "consecutive": self.run_length})


@register_detector
class EntropyCollapseDetector(_LaggingRatio):
    """Policy entropy collapsing: the policy became (nearly) deterministic.

    Two ways to get there, both tripping the test: fast, below ``entropy_drop`` of its recent median (the
    median of the last ``window`` ordinary values, which a healthy run's slow decline moves along), and
    slowly, below ``entropy_ratio`` of its early level (the median of the first ``window`` values) — each
    only from a level above ``entropy_floor`` (0.1 nats): an LLM policy at 0.04 nats a token is as good as
    deterministic already, and its per-step entropy swings 0.003-0.07 with the batch.
    ``low`` for one point (a noisy metric's blip), ``medium`` for two, ``high`` after ``persist`` points (3 on a
    sparse log: see ``_persist``), ``critical``
    when it lasts 4× that below a quarter of ``entropy_ratio`` of the early level.

    >>> from detectors.events import MetricEvent
    >>> d = EntropyCollapseDetector()
    >>> ent = [2.0 - s / 200 for s in range(100)] + [0.1] * 10
    >>> [(a.severity, a.step) for s, e in enumerate(ent) for a in d.update(MetricEvent("r", s, {"entropy": e}))]
    [('low', 100), ('medium', 101), ('high', 104)]
    >>> d = EntropyCollapseDetector()   # a healthy, slow decline by a third
    >>> [a for s in range(300) for a in d.update(MetricEvent("r", s, {"entropy": 2.0 - s / 450}))]
    []
    """

    name = "entropy_collapse"
    metric = "entropy"
    state_fields = _LaggingRatio.state_fields + ("early",)

    def reset(self) -> None:
        super().reset()
        self.early: list[float] = []

    def _early_level(self) -> float:
        return _median(self.early) if self.early else math.nan

    def _tripped(self, x: float, median: float) -> bool:
        early = self._early_level()
        floor = self.entropy_floor  # a policy already this sure of itself has no collapse left to make
        return (median > floor and x < self.entropy_drop * median) or (early > floor and x < self.entropy_ratio * early)

    def update(self, event: MetricEvent) -> list[Alert]:
        x = _finite(event, self.metric)
        if x is not None and len(self.early) < self.window:
            push(self.early, x, self.window)
        out = self._step(event)
        if out is None:
            return []
        x, median, tripped = out
        early = self._early_level()
        persist = self._persist()
        severity = ("critical" if self.run_length >= 4 * persist and x < self.entropy_ratio / 4 * early
                    else "high" if self.run_length >= persist else "medium" if self.run_length >= 2 else "low")
        return self._report(event, "entropy_collapse", tripped, severity=severity, value=x,
                            threshold=max(self.entropy_drop * median, self.entropy_ratio * early),
                            message=f"entropy {x:.4g} collapsed from a recent {median:.4g} (early {early:.4g}) "
                                    f"for {self.run_length} step(s)",
                            metadata={"median": median, "early": early, "consecutive": self.run_length})


@register_detector
class LengthExplosionDetector(_LaggingRatio):
    """Mean response length above ``length_ratio`` × its recent median (runaway generations).

    ``low`` for one point (one batch of long answers), ``medium`` for two, ``high`` after ``persist`` points (3 on
    a sparse log), ``critical`` after twice that at twice the ratio.

    >>> from detectors.events import MetricEvent
    >>> d = LengthExplosionDetector()
    >>> lengths = [180 + s % 7 for s in range(60)] + [600, 900, 1300, 1800, 2048, 2048, 2048]
    >>> [(a.severity, a.step) for s, n in enumerate(lengths) for a in d.update(MetricEvent("r", s, {"response_length": n}))]
    [('low', 60), ('medium', 61), ('high', 64)]
    """

    name = "length_explosion"
    metric = "response_length"

    def _tripped(self, x: float, median: float) -> bool:
        return median > 0 and x > self.length_ratio * median

    def update(self, event: MetricEvent) -> list[Alert]:
        out = self._step(event)
        if out is None:
            return []
        x, median, tripped = out
        persist = self._persist()
        severity = ("critical" if self.run_length >= 2 * persist and x > 2 * self.length_ratio * median
                    else "high" if self.run_length >= persist else "medium" if self.run_length >= 2 else "low")
        return self._report(event, "length_explosion", tripped, severity=severity, value=x,
                            threshold=self.length_ratio * median,
                            message=f"response length {x:.0f} is {x / median:.1f}x its recent median {median:.0f}",
                            metadata={"median": median, "consecutive": self.run_length})


@register_detector
class RewardHackingDetector(Detector):
    """Reward rising while KL and/or response length explode: the policy games the reward model.

    The first ``window`` observations fix reference levels; EMAs (span 10) are then compared with them.
    Reward is *up* when its EMA exceeds the reference by 1 reference σ (``reward_std``, else 10 % of its
    size); KL *explodes* past ``hack_kl_ratio``× its reference and ``hack_kl_min`` nats, length past
    ``hack_length_ratio``×. Reward up with one of them is ``medium``; ``high`` with both, with length for
    ``persist`` steps, or with KL above ``kl_threshold`` for ``persist`` steps.

    >>> from detectors.events import MetricEvent
    >>> d = RewardHackingDetector()
    >>> steps = [{"reward_mean": 0.1 + 0.002 * s, "kl": 0.05 + 0.001 * s, "response_length": 120.0} for s in range(60)]
    >>> steps += [{"reward_mean": 0.3 + 0.05 * s, "kl": 0.5 * s, "response_length": 120 + 12.0 * s} for s in range(40)]
    >>> [(a.severity, a.step) for s, m in enumerate(steps) for a in d.update(MetricEvent("r", s, m))]
    [('medium', 75), ('high', 79)]
    """

    name = "reward_hacking"
    category = "rlhf"
    section = "rlhf"
    defaults = RLHF_DEFAULTS
    state_fields = ("n", "ref", "ema", "run_length")
    metrics = ("reward_mean",)

    def reset(self) -> None:
        self.n = 0
        self.ref: dict[str, float] = {}
        self.ema: dict[str, float] = {}
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        reward = _finite(event, "reward_mean")
        if reward is None:
            return []
        self.n += 1
        for name in ("reward_mean", "reward_std", "kl", "response_length"):
            x = _finite(event, name)
            if x is None:
                continue
            self.ema[name] = ema(self.ema.get(name), x, 2 / 11)
            if self.n <= self.window:
                # a running mean over the reference window
                k = self.n
                self.ref[name] = compact(self.ref.get(name, x) + (x - self.ref.get(name, x)) / k)
        if self.n <= self.window:
            return []
        scale = self.ref.get("reward_std") or 0.1 * abs(self.ref["reward_mean"]) or 1e-3
        reward_up = self.ema["reward_mean"] - self.ref["reward_mean"] > scale
        # healthy RLHF moves away from the reference (KL of a few nats is normal); "exploded" means both
        # far above its early level and past hack_kl_min
        kl_up = ("kl" in self.ema and self.ema["kl"] > self.hack_kl_min
                 and self.ema["kl"] > self.hack_kl_ratio * max(self.ref.get("kl", 0.0), 1e-6))
        len_up = ("response_length" in self.ema and self.ref.get("response_length", 0) > 0
                  and self.ema["response_length"] > self.hack_length_ratio * self.ref["response_length"])
        active = reward_up and (kl_up or len_up)
        self.run_length = self.run_length + 1 if active else 0
        # length exploding with the reward is the classic hack; KL alone must also pass kl_threshold
        confident = len_up and (kl_up or self.run_length >= self.persist) or (
            kl_up and self.ema["kl"] > self.kl_threshold and self.run_length >= self.persist)
        severity = "high" if active and confident else "medium"
        exploding = " and ".join(n for n, up in (("KL", kl_up), ("response length", len_up)) if up)
        return self._report(
            event, "reward_hacking", active, severity=severity, value=self.ema["reward_mean"],
            threshold=self.ref["reward_mean"] + scale,
            message=(f"reward up {self.ema['reward_mean'] - self.ref['reward_mean']:+.3g} while {exploding} "
                     f"exploded (KL {self.ema.get('kl', math.nan):.3g}, length "
                     f"{self.ema.get('response_length', math.nan):.0f})"),
            metadata={"reference": dict(self.ref), "kl_exploded": kl_up, "length_exploded": len_up,
                      "consecutive": self.run_length})


@register_detector
class RewardCollapseDetector(Detector):
    """The policy's reward falling away from the best it reached, or not moving at all.

    An EMA of ``reward_mean`` (span 10 points; 3 on a run logged every 5 steps or more) and its noise (an
    EMA of the absolute deviation, as it was at the best) against the best EMA so far: ``reward_collapse`` when the EMA has lost
    more than ``reward_drop`` of what the run gained since its start (of the best's size, when it gained
    nothing beyond the noise or a twentieth of where the reward started), by over twice the noise —
    ``medium`` at once, ``high`` after ``persist`` points (3 on a sparse run). ``reward_flat`` (``high``) when
    the reward is exactly the same number for ``reward_flat_points`` points in a row, or for 3 points with a
    grad norm of exactly 0: every completion gets the same reward, so there is nothing to learn from —
    unless the reward rose to that number (a solved task: every episode reaches the goal).

    >>> from detectors.events import MetricEvent
    >>> d = RewardCollapseDetector()
    >>> rewards = [0.2 + 0.01 * s for s in range(40)] + [0.6 - 0.05 * s for s in range(12)] + [0.05] * 5
    >>> [(a.alert_type, a.severity, a.step) for s, r in enumerate(rewards) for a in d.update(MetricEvent("r", s, {"reward_mean": r}))]
    [('reward_collapse', 'medium', 48), ('reward_collapse', 'high', 52)]
    >>> d = RewardCollapseDetector()   # GRPO with every completion truncated: reward 0, nothing to learn
    >>> [(a.alert_type, a.step) for s in (1, 2, 10) for a in d.update(MetricEvent("r", s, {"reward_mean": 0.0, "grad_norm": 0.0}))]
    [('reward_flat', 10)]
    """

    name = "reward_collapse"
    category = "rlhf"
    section = "rlhf"
    defaults = RLHF_DEFAULTS
    state_fields = ("smooth", "absdev", "best", "best_noise", "start", "seen", "run_length", "same", "last",
                    "first_step", "interval", "low", "recent")
    metrics = ("reward_mean",)

    def reset(self) -> None:
        self.smooth: float | None = None
        self.absdev = 0.0
        self.best: float | None = None
        #: the noise when the best was reached (a falling reward inflates the EMA's deviations)
        self.best_noise = 0.0
        self.start: float | None = None
        self.seen = 0
        self.run_length = 0
        #: points in a row with exactly the reward ``last``
        self.same = 0
        self.last: float | None = None
        #: the lowest reward seen
        self.low: float | None = None
        self.first_step: int | None = None
        self.interval: int | None = None
        #: the last ``REWARD_NOISE_POINTS`` rewards (the noise of their point-to-point changes)
        self.recent: list[float] = []

    def update(self, event: MetricEvent) -> list[Alert]:
        x = _finite(event, "reward_mean")
        if x is None:
            return []
        self.first_step, self.interval = cadence(self.first_step, self.interval, event.step)
        span, warmup, persist = (3, 3, 3) if is_sparse(self.interval) else (10, 10, self.persist)
        alpha = 2.0 / (span + 1)
        if self.smooth is not None:
            self.absdev = ema(self.absdev, abs(x - self.smooth), alpha)
        self.smooth = ema(self.smooth, x, alpha)
        push(self.recent, x, REWARD_NOISE_POINTS)
        self.seen += 1
        self.same = self.same + 1 if x == self.last else 1
        self.last = x
        self.low = x if self.low is None else min(self.low, x)
        if self.start is None:
            self.start = self.smooth
        alerts = []
        zero_grad = event.metrics.get("grad_norm") == 0.0
        # a reward that rose to a constant is a solved task (every episode at the goal), not one stuck
        flat = x <= self.low and (self.same >= self.reward_flat_points or (self.same >= 3 and zero_grad))
        alerts += self._report(event, "reward_flat", flat, severity="high", value=x, threshold=None,
                               message=f"reward has been exactly {x:.4g} for {self.same} points"
                                       f"{' with a grad norm of 0' if zero_grad else ''}: every completion gets "
                                       f"the same reward, the policy has nothing to learn from",
                               metadata={"points": self.same})
        if self.seen < warmup:
            return alerts
        if self.best is None or self.smooth >= self.best:
            # the EMA's deviations count a climb to the best as noise (a return that jumps 5 → 70 keeps the
            # lagging average 60 off for points): when they are over 3x the robust spread of the point-to-point
            # changes, they measure the climb, and that spread is the noise (unless it is 0: rewards in steps of
            # 1/8, most changes one step either way)
            noise = 1.25 * self.absdev
            if len(self.recent) >= 5:
                changes = robust_center_scale([b - a for a, b in pairwise(self.recent)])[1] / math.sqrt(2)
                noise = changes if noise > 3 * changes > 0 else noise
            self.best, self.best_noise = self.smooth, noise
        drop, gain = self.best - self.smooth, self.best - self.start
        # a gain is what the run learned when it clears the noise and a twentieth of where the reward started
        # (an episode return of -75 that drifts to -74.6 learned nothing: losing half of that is no collapse)
        scale = gain if gain > 2 * self.best_noise and gain > 0.05 * abs(self.start) else max(abs(self.best), 1e-6)
        active = drop > self.reward_drop * scale and drop > 2 * self.best_noise
        self.run_length = self.run_length + 1 if active else 0
        severity = "high" if self.run_length >= persist else "medium"
        alerts += self._report(event, "reward_collapse", active, severity=severity, value=self.smooth,
                               threshold=self.best - self.reward_drop * scale,
                               message=f"reward {self.smooth:.4g} (smoothed) fell {drop:.3g} below its best "
                                       f"{self.best:.4g} for {self.run_length} point(s)",
                               metadata={"best": self.best, "start": self.start, "consecutive": self.run_length})
        return alerts


@register_detector
class PPOClipDetector(Detector):
    """PPO clip fraction above ``clipfrac_max`` or mean probability ratio outside ``[ratio_low, ratio_high]``.

    Either means the policy moves too far per update (learning rate or epochs too large). ``low`` for one
    point (a noisy update, as for KL, entropy and length), ``medium`` for two in a row; ``high`` after
    ``persist`` steps when clipfrac exceeds 1.5× its bound or the ratio leaves [0.5, 2].

    >>> from detectors.events import MetricEvent
    >>> d = PPOClipDetector()
    >>> cf = [0.12, 0.15, 0.1, 0.14] * 5 + [0.6] * 6
    >>> [(a.severity, a.step) for s, c in enumerate(cf) for a in d.update(MetricEvent("r", s, {"clipfrac": c}))]
    [('low', 20), ('medium', 21), ('high', 24)]
    """

    name = "ppo_clip"
    category = "rlhf"
    section = "rlhf"
    defaults = RLHF_DEFAULTS
    state_fields = ("run_length",)
    metrics = ("clipfrac", "ratio")

    def reset(self) -> None:
        self.run_length = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        clip, ratio = _finite(event, "clipfrac"), _finite(event, "ratio")
        if clip is None and ratio is None:
            return []
        clip_out = clip is not None and clip > self.clipfrac_max
        ratio_out = ratio is not None and not self.ratio_low <= ratio <= self.ratio_high
        extreme = (clip is not None and clip > 1.5 * self.clipfrac_max) or (
            ratio is not None and not 0.5 <= ratio <= 2.0)
        active = clip_out or ratio_out
        self.run_length = self.run_length + 1 if active else 0
        severity = ("high" if extreme and self.run_length >= self.persist
                    else "medium" if self.run_length >= 2 else "low")
        return self._report(
            event, "clipfrac_out_of_band", active, severity=severity,
            value=clip if clip_out or ratio is None else ratio,
            threshold=self.clipfrac_max if clip_out or ratio is None else self.ratio_high,
            message=f"PPO updates too large: clipfrac {clip}, ratio {ratio} for {self.run_length} step(s)",
            metadata={"clipfrac": clip, "ratio": ratio, "consecutive": self.run_length})


@register_detector
class DPOMarginCollapseDetector(Detector):
    """DPO reward margin collapsing after it had grown, or preference accuracy falling to chance.

    The smoothed (EMA, span 10) ``reward_margin`` is compared with its peak: once the peak has passed
    ``margin_floor``, a margin below ``margin_collapse_ratio`` × peak is a collapse; so is a smoothed
    ``reward_accuracy`` back under 0.55 after it passed 0.7. ``medium``, ``high`` after ``persist`` steps.

    >>> from detectors.events import MetricEvent
    >>> d = DPOMarginCollapseDetector()
    >>> margins = [min(3.0, 0.05 * s) for s in range(100)] + [0.1] * 20
    >>> [(a.severity, a.step) for s, m in enumerate(margins) for a in d.update(MetricEvent("r", s, {"reward_margin": m}))]
    [('medium', 108), ('high', 112)]
    """

    name = "dpo_margin_collapse"
    category = "rlhf"
    section = "rlhf"
    defaults = RLHF_DEFAULTS
    state_fields = ("margin", "peak", "accuracy", "peak_accuracy", "run_length")
    metrics = ("reward_margin", "reward_accuracy")

    def reset(self) -> None:
        self.margin: float | None = None
        self.peak = -math.inf
        self.accuracy: float | None = None
        self.peak_accuracy = 0.0
        self.run_length = 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["peak"] = None if self.peak == -math.inf else self.peak  # keep the table strict JSON
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.peak is None:
            self.peak = -math.inf

    def update(self, event: MetricEvent) -> list[Alert]:
        margin, acc = _finite(event, "reward_margin"), _finite(event, "reward_accuracy")
        if margin is None and acc is None:
            return []
        if margin is not None:
            self.margin = ema(self.margin, margin, 2 / 11)
            self.peak = max(self.peak, self.margin)
        if acc is not None:
            self.accuracy = ema(self.accuracy, acc, 2 / 11)
            self.peak_accuracy = max(self.peak_accuracy, self.accuracy)
        margin_gone = (self.margin is not None and self.peak >= self.margin_floor
                       and self.margin < self.margin_collapse_ratio * self.peak)
        acc_gone = self.accuracy is not None and self.peak_accuracy >= 0.7 and self.accuracy < 0.55
        active = margin_gone or acc_gone
        self.run_length = self.run_length + 1 if active else 0
        return self._report(
            event, "dpo_margin_collapse", active, severity="high" if self.run_length >= self.persist else "medium",
            value=self.margin if margin_gone else self.accuracy,
            threshold=self.margin_collapse_ratio * self.peak if margin_gone else 0.55,
            message=(f"DPO preference signal collapsed: margin {self.margin} (peak {self.peak:.3g}), "
                     f"accuracy {self.accuracy}"),
            metadata={"peak_margin": self.peak, "peak_accuracy": self.peak_accuracy,
                      "consecutive": self.run_length})
