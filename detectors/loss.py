"""Loss detectors.

``LossSpikeDetector`` compares each loss with the median of the last ``window`` healthy losses, scaled
by their median absolute deviation (MAD, a robust σ: 1.4826·MAD estimates σ for Gaussian noise, and a
few outliers cannot inflate it the way they inflate a standard deviation). A positive loss is compared
in log space: minibatch losses are skewed, their logs much less so. A step is a spike when it is more
than ``threshold`` robust σ *and* ``min_rel_increase`` (relative) above the median. Spikes do not
enter the window, so a burst cannot raise its own baseline. Severity grows with persistence and size: a
lone step is ``low`` (a hard batch: noisy pretraining has many), ``medium`` at 2× the median, ``high`` at
``jump_ratio``× (an average over many steps, or a short fragment, that jumps 5× is no hard batch); two
steps in a row are ``medium``, ``high`` at ``material_ratio``×; ``critical`` after ``persist_critical``
material steps or a second step at ``ratio_critical``×. In the first ``warmup`` steps, before there is a window to compare with, a loss
above ``early_ratio``× the run's first loss counts as a spike (a learning rate so high the very first
updates blow the model up). A negative loss (an RL surrogate objective), or a run that logs
policy-gradient metrics (``reward_mean``, ``kl``, ``clipfrac`` ...), switches it off for the run: a
policy-gradient loss hovers around 0 by design and its ratios mean nothing (rlhf.py watches RL runs).

The convergence detectors below share the ``[convergence]`` section and smooth the loss with an EMA of
span ``span`` first: a minibatch loss is a noisy sample, its trend is what converges or diverges.

>>> import random
>>> from detectors.events import MetricEvent
>>> rng = random.Random(0)
>>> d = LossSpikeDetector()
>>> alerts = [a for s in range(200) for a in d.update(MetricEvent("r", s, {"loss": 2.0 - s / 200 + rng.gauss(0, 0.02)}))]
>>> alerts
[]
>>> [(a.severity, a.step) for s, x in enumerate([2.6, 1.0], 200) for a in d.update(MetricEvent("r", s, {"loss": x}))]
[('medium', 200)]
>>> [(a.severity, a.step) for s in range(202, 206) for a in d.update(MetricEvent("r", s, {"loss": 9.0}))]
[('high', 202), ('critical', 204)]
>>> d = LossSpikeDetector()
>>> [(a.severity, a.step) for s, x in enumerate([2.29, 25.8, 27.3, 15.4, 22.1]) for a in d.update(MetricEvent("r", s, {"loss": x}))]
[('high', 1), ('critical', 2)]
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from itertools import pairwise
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .alerts import Alert
from .base import Detector, all_finite, cadence, column, compacted, has_any, is_sparse, register_detector
from .events import MetricEvent
from .stats import compact, ema, lower_median_bound, median, push, sorted_median, upper_median_bound

__all__ = ["LossSpikeDetector", "LossDivergenceDetector", "LossPlateauDetector", "LossOscillationDetector",
           "CONVERGENCE_DEFAULTS", "POLICY_GRADIENT_METRICS"]

#: metrics only a policy-gradient run logs (PPO, GRPO, REINFORCE): its ``loss`` is a surrogate objective
#: centred near 0, not a curve that converges, so the loss detectors stand down (DPO's loss is a
#: proper loss and its metrics, ``reward_margin`` ..., are not in this list)
POLICY_GRADIENT_METRICS = ("reward_mean", "kl", "approx_kl", "clipfrac", "value_loss", "ratio")


def is_policy_gradient(event: MetricEvent) -> bool:
    """Whether the event is a policy-gradient run's (it logs one of ``POLICY_GRADIENT_METRICS``)."""
    return any(name in event.metrics for name in POLICY_GRADIENT_METRICS)


def _not_a_convergence_curve(event: MetricEvent, x: float) -> bool:
    """A negative loss, or an event of a policy-gradient run: the loss detectors stand down for the run."""
    return x < 0 or is_policy_gradient(event)


def _plain_losses(events: list[MetricEvent], metric: str) -> list[float] | None:
    """The batch's losses when every one is present, finite, non-negative and from a run that is not RL,
    else None (a batch the loss detectors' screens leave to the step-by-step path)."""
    xs = column(events, metric)
    if not all_finite(xs) or min(xs) < 0 or has_any(events, POLICY_GRADIENT_METRICS):
        return None
    return xs


#: the part of what a run learned (its first loss − its level now) that a spike must undo
MATERIAL_UNDO = 0.05


@register_detector
class LossSpikeDetector(Detector):
    name = "loss_spike"
    category = "loss"
    section = "loss_spike"
    defaults = {
        "metric": "loss",
        "window": 50,
        "warmup": 20,
        "threshold": 6.0,
        "min_rel_increase": 0.25,
        "ratio_critical": 10.0,
        "early_ratio": 3.0,
        "persist_high": 2,
        "persist_critical": 3,
        "material_ratio": 1.5,
        "jump_ratio": 5.0,
        "resolve_after": 20,
    }
    state_fields = ("history", "run_length", "off", "initial", "last_val")

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    def reset(self) -> None:
        self.history: list[float] = []
        #: ``history`` sorted, kept in step with it (not state: rebuilt from ``history`` when None)
        self._ordered: list[float] | None = None
        self.run_length = 0
        self.off = False
        self.initial: float | None = None
        #: the validation loss logged beside the last loss that came with one
        self.last_val: float | None = None

    def update(self, event: MetricEvent) -> list[Alert]:
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x) or self.off:
            return []
        if is_policy_gradient(event):
            # a policy-gradient surrogate hovers around 0 by design; a negative loss is no reason to stop
            # watching (a flow's or a VAE's likelihood loss lives below 0, and its blow-up is a spike too)
            self.off = True
            return self._report(event, "loss_spike", False)
        if self.initial is None:
            self.initial = compact(x)
        confirmed = self._confirmed(event)
        if len(self.history) < self.warmup:
            return self._early(event, x, confirmed)
        ordered = self._ordered
        if ordered is None:
            ordered = self._ordered = sorted(self.history)
        center = sorted_median(ordered)
        floor = center + abs(center) * self.min_rel_increase
        if x > 0 and ordered[0] > 0:
            # a positive loss is tested in log space: minibatch losses are skewed (a few hard batches
            # of several times the median are normal late in small-batch training), their logs are not
            logs = [math.log(v) for v in ordered]  # sorted too: log is increasing
            log_median = sorted_median(logs)
            log_sigma = 1.4826 * median([abs(v - log_median) for v in logs])
            limit = max(math.exp(log_median + self.threshold * log_sigma), floor)
            sigma = log_sigma
            z = (math.log(x) - log_median) / log_sigma if log_sigma > 0 else math.inf
        else:
            sigma = 1.4826 * median([abs(v - center) for v in self.history])
            limit = max(center + self.threshold * sigma, floor)
            z = (x - center) / sigma if sigma > 0 else math.inf
        # and by a part of what the run learned (as convergence_divergence asks): at a floor near 0, printed to
        # 4 decimals, 0.0004 → 0.0032 is 8x and undoes nothing of a descent from 8
        if x <= limit or x - center <= MATERIAL_UNDO * (self.initial - center):
            self.run_length = 0
            self._remember(x)
            return self._report(event, "loss_spike", False)
        return self._spike(event, x, center, limit, f"its recent median {center:.4g} ({z:.1f} robust sigma)",
                           {"robust_sigma": sigma}, confirmed)

    def _confirmed(self, event: MetricEvent) -> str | None:
        """How the validation loss logged beside this loss jumped with it (None: it did not, or there is
        none): up ``material_ratio``× from the one logged beside the previous loss that came with one. An
        epoch log's held-out loss repeating a training-loss jump makes it no hard batch."""
        val = event.metrics.get("val_loss")
        if val is None or not math.isfinite(val):
            return None
        last, self.last_val = self.last_val, compact(val)
        if last is not None and last > 0 and val >= self.material_ratio * last:
            return f"{last:.4g} → {val:.4g}"
        return None

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # every limit is at least the window's median raised by min_rel_increase: a batch below that for
        # the lowest median it can meet has no spike, and every loss joins the window
        xs = None if self.off or len(self.history) < self.warmup or "loss_spike" in self.episodes \
            else _plain_losses(events, self.metric)
        if xs is None:
            return super().update_batch(events)
        low = lower_median_bound(self.history, compacted(events, self.metric), self.window)
        if max(xs) > low + abs(low) * self.min_rel_increase and not self._below_every_limit(
                xs, compacted(events, self.metric)):
            return super().update_batch(events)
        self.run_length = 0
        for event in reversed(events):  # no spike: only the last validation loss matters to the next
            val = event.metrics.get("val_loss")
            if val is not None and math.isfinite(val):
                self.last_val = compact(val)
                break
        self.history = [*self.history, *compacted(events, self.metric)][-self.window:]
        self._ordered = None
        return []

    def _below_every_limit(self, xs: list[float], compact_xs: list[float]) -> bool:
        """Whether each loss is under the limit ``update`` would compute for it, supposing all the earlier
        ones joined the window — then they all do. Every window of the batch at once (numpy over a sliding
        view), for a full window of positive losses (the log-space test); the same order statistics as
        ``update``, whose ``math.exp`` numpy's may miss by an ulp, hence the margin."""
        n = self.window
        values = [*self.history, *compact_xs]
        if len(self.history) != n or min(values) <= 0 or min(xs) <= 0:
            return False
        half = n // 2
        windows = sliding_window_view(np.array(values[:-1]), n)  # row i: the window loss i is judged by
        logs = sliding_window_view(np.array([math.log(v) for v in values[:-1]]), n)

        def medians(rows: np.ndarray) -> np.ndarray:
            rows = np.sort(rows, axis=1)
            return rows[:, half] if n % 2 else (rows[:, half - 1] + rows[:, half]) / 2

        center = medians(windows)
        log_median = medians(logs)
        log_sigma = 1.4826 * medians(np.abs(logs - log_median[:, None]))
        limit = np.maximum(np.exp(log_median + self.threshold * log_sigma),
                           center + np.abs(center) * self.min_rel_increase)
        return bool(np.all(np.array(xs) <= limit * (1 - 1e-12)))

    def _early(self, event: MetricEvent, x: float, confirmed: str | None) -> list[Alert]:
        """Warm-up: no window yet, but a loss far above where the run started — or, from three losses on,
        above their median when that is lower (the run had learned something) — is already a blow-up; so
        is one twice as high when the validation loss jumped with it (``_confirmed``)."""
        reference, how = self.initial, f"the run's first loss {self.initial:.4g} (warm-up)"
        if len(self.history) >= 3:
            center = median(self.history)
            if center < reference:
                reference, how = center, f"the median {center:.4g} of its first {len(self.history)} losses"
        # "k times the reference", for a reference of either sign: k - 1 of its size above it
        limit = reference + ((2.0 if confirmed else self.early_ratio) - 1) * abs(reference)
        if reference == 0 or x <= limit:
            self.run_length = 0
            self._remember(x)
            return self._report(event, "loss_spike", False)
        return self._spike(event, x, reference, limit, how, {}, confirmed)

    def _spike(self, event: MetricEvent, x: float, median: float, limit: float, how: str,
               metadata: dict, confirmed: str | None = None) -> list[Alert]:
        self.run_length += 1
        ratio = 1 + (x - median) / abs(median) if median != 0 else math.inf  # x / median, for either sign
        material = ratio >= self.material_ratio
        if (self.run_length >= self.persist_critical and material) or (
                ratio >= self.ratio_critical and self.run_length > 1):
            severity = "critical"
        elif (self.run_length >= self.persist_high and material) or ratio >= self.jump_ratio or (
                confirmed and ratio >= 2.0):
            # a lone point pages only when the loss jumped jump_ratio×: an average over hundreds of steps
            # (or a short fragment) that does that is no hard batch
            severity = "high"
        elif ratio >= 2.0 or self.run_length >= self.persist_high:
            severity = "medium"
        else:
            severity = "low"  # one hard batch: noisy pretraining has many, none of them a failure
        return self._report(
            event, "loss_spike", True, severity=severity, value=x, threshold=limit,
            message=(f"{self.metric} {x:.4g} is {ratio:.2f}x {how}" if median > 0 else
                     f"{self.metric} {x:.4g} is {x - median:.4g} above {how}") + f" for {self.run_length} step(s)"
                    + (f", and the validation loss jumped with it ({confirmed})" if confirmed else ""),
            metadata=dict(metadata, median=median, ratio=ratio, consecutive=self.run_length,
                          **({"val_loss_jump": confirmed} if confirmed else {})),
        )

    def _remember(self, x: float) -> None:
        x = compact(x)
        history, ordered = self.history, self._ordered
        history.append(x)
        if ordered is not None:
            insort(ordered, x)
        while len(history) > self.window:
            dropped = history.pop(0)
            if ordered is not None:
                ordered.remove(dropped)


#: the ``[convergence]`` section (the first two keys are users' existing keys)
CONVERGENCE_DEFAULTS = {
    "plateau_threshold": 0.001,
    "plateau_window": 50,
    "metric": "loss",
    "span": 10,
    "warmup": 20,
    "divergence_threshold": 0.5,
    "divergence_steps": 10,
    "stagnation_improvement": 0.02,
    "oscillation_window": 20,
    "oscillation_amplitude": 0.3,
    "resolve_after": 20,
    "plateau_resolve_steps": 100,
}


class _SmoothedLoss(Detector):
    """An EMA of the loss and an EMA of its absolute deviation from it (a noise scale ≈ 0.8 σ).

    Only for losses that are never negative (cross-entropy, MSE, DPO): the first negative value, or the
    first event with policy-gradient metrics, turns the convergence detectors off for the run. On a
    sparse run (a point every ``SPARSE_INTERVAL`` steps or more) the warm-up is a quarter as long and the
    smoothing span a third (at least 5 and 3 points).
    """

    category = "convergence"
    section = "convergence"
    defaults = CONVERGENCE_DEFAULTS
    state_fields = ("smooth", "absdev", "seen", "off", "evaluated")

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    def reset(self) -> None:
        self.smooth: float | None = None
        self.absdev = 0.0
        self.seen = 0
        self.off = False
        #: of the run's first two losses, how many came with a validation loss: both, and the log is an epoch
        #: log (a Keras CSVLogger file, a table of epochs), whose every point is a whole pass over the data
        self.evaluated = 0

    def _loss(self, event: MetricEvent) -> float | None:
        """The loss, or None when absent, non-finite, or the run's loss is not a convergence curve."""
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x) or self.off:
            return None
        if _not_a_convergence_curve(event, x):
            # a policy-gradient surrogate is not bounded below by 0 and hovers around it; "above its
            # best" and "no improvement" mean nothing for it: off for the rest of the run
            self.off = True
            return None
        if self.seen < 2 and "val_loss" in event.metrics:
            self.evaluated += 1
        return x

    def _cadence(self, interval: int | None, persist: int, window: int) -> tuple[int, int, int, int]:
        """(warm-up, smoothing span, ``persist``, ``window``) in points for a run logged every ``interval``
        steps: on a sparse run a quarter of the warm-up, a third of the span and of ``persist``, a fifth of
        ``window`` (at least 5, 3, 3 and 10 points)."""
        if is_sparse(interval) or self.evaluated >= 2:
            return max(5, self.warmup // 4), max(3, self.span // 3), max(3, persist // 3), max(10, window // 5)
        return self.warmup, self.span, persist, window

    def _observe(self, event: MetricEvent) -> float | None:
        """:meth:`_loss`, folded into the smoothed loss and its noise."""
        x = self._loss(event)
        if x is None:
            return None
        alpha = 2.0 / (self.span + 1)
        if self.smooth is not None:
            self.absdev = ema(self.absdev, abs(x - self.smooth), alpha)
        self.smooth = ema(self.smooth, x, alpha)
        self.seen += 1
        return x


@register_detector
class LossDivergenceDetector(_SmoothedLoss):
    """Sustained divergence: the smoothed loss climbs well above the best it reached, and stays there.

    Active when the smoothed loss is more than ``divergence_threshold`` (relative) above its running
    minimum, that rise is over 2× the loss noise (so a noisy late-training loss near zero does not trip a
    relative test) *and* it undoes at least 5 % of what the run learned (start − best): at a converged
    run's floor a tiny best can double without anything going wrong. In its first two warm-ups (all a
    fragment has), a loss that rose two points in a row to 1.5× the lowest it showed and twice the median
    before it, and above the first, with the point before already 1.2× up, is ``low``, three points ``high`` (two, when the loss then stays within
    80 % of where it got, above the first loss, for two more points). ``low`` for one step (an epoch boundary's
    sawtooth), ``medium`` for two, ``high`` after ``divergence_steps`` steps in a row,
    ``critical`` when it also exceeds the loss at the start of the run — everything learned is undone.

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(0)
    >>> d = LossDivergenceDetector()
    >>> healthy = [2.3 * math.exp(-s / 60) + 0.3 + rng.gauss(0, 0.05) for s in range(300)]
    >>> [a for s, x in enumerate(healthy) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    []
    >>> diverging = [0.35 * 1.03 ** s + rng.gauss(0, 0.05) for s in range(120)]
    >>> [(a.severity, a.step) for s, x in enumerate(diverging, 300) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    [('low', 314), ('medium', 315), ('high', 323), ('critical', 373)]
    """

    name = "loss_divergence"
    state_fields = _SmoothedLoss.state_fields + ("best", "start", "run_length", "first_step", "interval",
                                                 "low", "last", "climb", "early", "peak", "held")

    def reset(self) -> None:
        super().reset()
        #: whether the last _advance stopped at a climb, and at a coarse log's steep one (not state: read right
        #: after the call)
        self._climbing = self._steep = False
        self.best: float | None = None
        self.start: float | None = None
        self.run_length = 0
        self.first_step: int | None = None
        self.interval: int | None = None
        #: during the warm-up: the lowest loss, the last one, and how many rises in a row led to it
        self.low: float | None = None
        self.last: float | None = None
        self.climb = 0
        #: the losses of the first two warm-ups (what a fragment's climb is judged against)
        self.early: list[float] = []
        #: the loss a fragment's climb reached, and the points since that stayed near it, above the start
        self.peak: float | None = None
        self.held = 0

    def _sizes(self, interval: int | None) -> tuple[int, int, int]:
        """(warm-up, smoothing span, steps to high), in points, for a run logged every ``interval`` steps."""
        return self._cadence(interval, self.divergence_steps, 0)[:3]

    def update(self, event: MetricEvent) -> list[Alert]:
        x = self._loss(event)
        if x is None:
            return []
        active = self._advance([x], [event.step], commit=True) == 0
        warmup, _, persist = self._sizes(self.interval)
        if active and self._climbing:
            self.run_length += 1
            message = (f"{self.metric} {x:.4g} has stayed near the {self.peak:.4g} it climbed to ({self.peak / self.low:.1f}x "
                       f"its lowest {self.low:.4g}) for {self.held} points" if self.held else
                       f"{self.metric} {x:.4g} rose {self.climb} points in a row to {x / self.low:.1f}x its lowest "
                       f"{self.low:.4g}")
            return self._report(
                event, "convergence_divergence", True, severity="high" if self.climb >= 3 or self.held >= 2 else "low",
                value=x, threshold=1.5 * self.low, message=message,
                metadata={"low": self.low, "climb": self.climb, "held": self.held, "early": True})
        if self.seen < warmup:
            return self._report(event, "convergence_divergence", False) if self.episodes else []
        self.run_length = self.run_length + 1 if active else 0
        if not active:
            return self._report(event, "convergence_divergence", False)
        rise = self.smooth - self.best
        if self.run_length >= persist and self.smooth > self.start:
            severity = "critical"
        elif self.run_length >= persist or self._steep:
            severity = "high"
        else:  # one point above the best is an epoch boundary's sawtooth as often as a trend
            severity = "medium" if self.run_length >= 2 else "low"
        return self._report(
            event, "convergence_divergence", True, severity=severity, value=self.smooth,
            threshold=self.best * (1 + self.divergence_threshold),
            message=(f"smoothed {self.metric} {self.smooth:.4g} is {rise / abs(self.best or 1):.0%} above its "
                     f"best {self.best:.4g} for {self.run_length} step(s)"),
            metadata={"best": self.best, "start": self.start, "consecutive": self.run_length})

    def _advance(self, xs: list[float], steps: list[int], commit: bool) -> int:
        """The detector's arithmetic, for ``update`` and ``update_batch`` alike: fold the losses ``xs`` (at
        ``steps``) into the cadence, the smoothed loss, its noise and its best, and return the index of the
        first at which the rise is a divergence (``len(xs)``: none). The state is written back when
        ``commit`` or when none was."""
        threshold = self.divergence_threshold
        smooth, absdev, seen, start, best = self.smooth, self.absdev, self.seen, self.start, self.best
        first_step, interval, low, last, climb = self.first_step, self.interval, self.low, self.last, self.climb
        early, peak, held = self.early, self.peak, self.held
        warmup, span, _ = self._sizes(interval)
        alpha = 2.0 / (span + 1)
        epochs = self.evaluated >= 2
        found, self._climbing, self._steep = len(xs), False, False
        for i, x in enumerate(xs):
            if interval is None:
                first_step, interval = cadence(first_step, interval, steps[i])
                if interval is not None:
                    warmup, span, _ = self._sizes(interval)
                    alpha = 2.0 / (span + 1)
            if smooth is None:
                smooth = float(x)
            else:
                absdev = absdev + alpha * (abs(x - smooth) - absdev)
                smooth = smooth + alpha * (x - smooth)
            seen += 1
            if seen == 1:
                start = smooth
            if seen < 2 * warmup:
                # a fragment has little history to smooth: a loss rising point after point to 1.5x the
                # lowest it has shown, and above where it started (early training bounces below that), is
                # already a divergence
                climb = climb + 1 if last is not None and x > last else 0
                low = x if low is None or x < low else low
                if peak is not None:  # after a climb: a loss that stays up there did not bounce back
                    peak, held = (peak, held + 1) if x >= 0.8 * peak and x > start else (None, 0)
                    if held >= 2:
                        found, self._climbing = i, True
                        last, early = x, [*early, compact(x)]
                        break
                # the point before already up too: one loss far above the rest is the spike detector's;
                # and twice the median of the losses before it, not only 1.5x the lowest: a noisy log's
                # lowest point is an outlier, and three rises in a row from it happen by chance (a per-step
                # loss wandering 0.24-0.64 climbs to 1.5x its median now and then)
                if climb >= 2 and low > 0 and x >= 1.5 * low and x > start and last >= 1.2 * low and (
                        x >= 2.0 * median(early)):
                    found, self._climbing = i, True
                    peak, held = max(peak or x, x), 0
                    last, early = x, [*early, compact(x)]
                    break
                last, early = x, [*early, compact(x)]
            else:
                if early or peak is not None:
                    early, peak, held = [], None, 0  # past the fragment rule: not state any longer
                if epochs:  # the rises in a row the epoch-log climb rule counts
                    climb, last = climb + 1 if last is not None and x > last else 0, x
            if seen < warmup:
                continue
            if best is None or smooth < best:
                best = smooth
            rise = smooth - best
            # in an epoch log (each point a whole pass over the data), three rises in a row to 3x the best, the
            # smoothed loss at twice it, are a climb, however much the descent before it inflated the noise
            # estimate (the absolute deviation from a lagging average)
            steep = epochs and best > 0 and climb >= 3 and x >= 3 * best and smooth >= 2 * best
            # above the best by a relative margin, by more than the noise, and by a part of what the run
            # learned: a healthy run's loss floor wanders by 100% of a tiny best and means nothing
            if steep or (rise > threshold * abs(best) and rise > 2 * (1.25 * absdev) and rise > 0.05 * (start - best)):
                found, self._steep = i, steep
                break
        if commit or found == len(xs):
            self.smooth, self.absdev, self.seen, self.start, self.best = smooth, absdev, seen, start, best
            self.first_step, self.interval, self.low, self.last, self.climb = first_step, interval, low, last, climb
            self.early, self.peak, self.held = early, peak, held
        return found

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # _advance over the batch; the first step that would be active sends the whole batch (state
        # untouched) to the step-by-step path
        xs = (None if self.off or self.seen < 2 or "convergence_divergence" in self.episodes
              else _plain_losses(events, self.metric))
        if xs is None or self._advance(xs, [e.step for e in events], commit=False) < len(xs):
            return super().update_batch(events)
        if self.seen >= self._sizes(self.interval)[0]:
            self.run_length = 0
        return []


#: losses in a row that repeat, value for value, the ones some points before them: a model that does not
#: change (see ``LossPlateauDetector``); 4 equal to the 4 just before them is 5 identical values
REPEAT_POINTS = 4


#: a classifier that predicts the uniform distribution over K classes has a cross-entropy of exactly ln K: the
#: loss of a model that learned nothing ("stuck at 2.302" on CIFAR-10, 6.9 on ImageNet, 0.693 for a binary
#: task). The class counts looked for: 2-10, 100, 1000 (further ln K crowd together and mean nothing)
CHANCE_CLASSES = (*range(2, 11), 100, 1000)
_CHANCE = tuple((k, math.log(k)) for k in CHANCE_CLASSES)
_CHANCE_LOGS = [c for _, c in _CHANCE]
#: logged points in a row within CHANCE_TOLERANCE (relative) of one ln K
CHANCE_POINTS = 5
CHANCE_TOLERANCE = 0.002
#: metrics of preference tuning (DPO and kin), whose loss starts at ln 2 by construction
PREFERENCE_METRICS = ("reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy")


def _chance_classes(values: list[float], x: float) -> int:
    """K when ``x`` and the ``CHANCE_POINTS - 1`` values before it all sit within ``CHANCE_TOLERANCE`` of
    ln K, else 0."""
    if not 0.68 < x < 6.92:  # between ln 2 and ln 1000: one comparison for most losses
        return 0
    i = bisect_left(_CHANCE_LOGS, x)  # the nearest ln K is one of the two around x
    for k, c in _CHANCE[max(0, i - 1):i + 1]:
        if abs(x - c) <= CHANCE_TOLERANCE * c:
            last = values[len(values) - CHANCE_POINTS + 1:]
            ok = len(last) == CHANCE_POINTS - 1 and all(abs(v - c) <= CHANCE_TOLERANCE * c for v in last)
            return k if ok else 0
    return 0


def _from_start(first_step: int, interval: int | None, warmup: int) -> bool:
    """Whether a run whose loss was first logged at ``first_step`` was watched from its start, not picked up
    mid-way (resumed, monitoring started late, a pasted fragment): that step is within its first warm-up."""
    return first_step <= warmup * (interval or 1)


def _repeat_lag(values: list[float], x: float, window: int) -> int:
    """The smallest lag p (1 ≤ p ≤ ``window``) such that ``x`` and the ``REPEAT_POINTS - 1`` values before it
    equal the values p places earlier, ``x`` coming after ``values``; 0 when there is none."""
    n = len(values)
    lo = max(0, n - window)
    if n < REPEAT_POINTS or x not in values[lo:]:  # a loss seen for the first time: the usual case, in C
        return 0
    for j in range(n - 1, lo - 1, -1):
        lag = n - j
        if values[j] == x and n - lag - (REPEAT_POINTS - 1) >= 0 and all(
                values[n - k] == values[n - k - lag] for k in range(1, REPEAT_POINTS)):
            return lag
    return 0


@register_detector
class LossPlateauDetector(_SmoothedLoss):
    """Plateau: no relative improvement above ``plateau_threshold`` in ``plateau_window`` observations.

    A plateau at the end of a run is what convergence looks like, so a plateau is ``low``, however long it
    lasts. Not learning at all is different: the median of the last ``plateau_window`` losses is not
    ``stagnation_improvement`` below the median of the first ``warmup`` ones — the loss sits where it
    started (vanishing gradients, dead or frozen weights, an LR of zero, an LR too high to descend) — and
    that is ``high`` (``metadata.stagnation``). Medians, so a few hard batches do not move either side. On
    a sparse run the warm-up and window are 5 and 10 points and the improvement asked for is halved: its
    points are averages over many steps, and a fine-tune near its floor improves slowly but surely.
    It is judged only on a run watched from its start, and not while the LR still climbs (a warm-up).
    A plateau ends after ``plateau_resolve_steps`` observations in a row without one (instead of
    ``resolve_after``): the run must keep improving for two windows, because on a converged run's noisy
    floor a single lucky new best would end the plateau only for it to open again a window later.
    Losses that repeat, value for value (to the 7th digit, above 0.01), the ``REPEAT_POINTS`` logged some
    points before them — five identical values in a row, or an epoch of a fixed data order that gives the
    very losses of the epoch before — are ``high`` at once, warm-up or not: the model does not change (no
    optimizer step, frozen or unattached weights, dead units, a constant prediction: 0.6931 = ln 2 for a
    binary classifier), nothing a healthy loss's noise ever does. Only at steps past every earlier one: a
    deterministic run restored from a checkpoint logs its losses again, and that is no failure. A loss that
    sits at chance, within 0.2 % of ln K (K = 2-10, 100, 1000 classes: a uniform prediction) for
    ``CHANCE_POINTS`` logged points in a row is ``high`` too — past the run's first 10 points when it was
    watched from its start (an untrained model starts there), at once in a fragment picked up mid-run; not
    in preference tuning, whose loss starts at ln 2 by construction.

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(0)
    >>> d = LossPlateauDetector()
    >>> out = [a for s in range(300) for a in d.update(MetricEvent("r", s, {"loss": 2.302 + rng.gauss(0, 0.03)}))]
    >>> [(a.severity, a.step, a.metadata["stagnation"]) for a in out if a.status == "firing"]
    [('high', 69, True)]
    >>> d = LossPlateauDetector()   # a binary classifier stuck at chance, from a pasted training loop
    >>> stuck = [0.6773, 2.4587, 5.3353, 1.0234, 10.6901, 1.9899, 3.5713, 0.6869] + [0.6931] * 6
    >>> [(a.severity, a.step) for s, x in enumerate(stuck) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    [('high', 12)]
    >>> d = LossPlateauDetector()   # a LoRA that was never attached: epoch 2's batches give epoch 1's losses
    >>> epoch = [0.9741, 1.3742, 1.2390, 0.9670, 1.0386, 1.1681, 1.2240, 0.9610]
    >>> [(a.severity, a.step) for s, x in enumerate(epoch * 2) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    [('high', 11)]
    >>> d = LossPlateauDetector()
    >>> learning = [2.3 * math.exp(-s / 80) + 0.2 + rng.gauss(0, 0.03) for s in range(300)]
    >>> [a for s, x in enumerate(learning) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    []
    """

    name = "loss_plateau"
    state_fields = _SmoothedLoss.state_fields + ("best", "since_best", "early", "recent", "first_step",
                                                 "interval", "prev_lr", "lr_rose_at", "top_step", "preference")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.resolve_after = int(self.plateau_resolve_steps)

    def reset(self) -> None:
        super().reset()
        self.best: float | None = None
        self.since_best = 0
        self.early: list[float] = []
        self.recent: list[float] = []
        self.first_step: int | None = None
        self.interval: int | None = None
        self.prev_lr: float | None = None
        self.lr_rose_at = 0
        #: the highest step seen (a loss repeated at a lower one is a checkpoint restore's)
        self.top_step: int | None = None
        #: the lag at which the last loss taken repeats the ones before, and the K whose ln K it and the ones
        #: before sit at (not state: read right after _advance)
        self._lag = 0
        self._chance = 0
        #: whether the run logs preference-tuning metrics (``PREFERENCE_METRICS``)
        self.preference = False

    def _sizes(self, interval: int | None) -> tuple[int, int, int]:
        """(warm-up, plateau window, smoothing span), in points, for a run logged every ``interval`` steps."""
        warmup, span, _, window = self._cadence(interval, 0, self.plateau_window)
        return warmup, window, span

    def update(self, event: MetricEvent) -> list[Alert]:
        x = self._loss(event)
        if x is None:
            return []
        self.preference = self.preference or has_any([event], PREFERENCE_METRICS)
        self._advance([x], [event.step], [event.metrics.get("lr")], 0, watch=False)
        warmup, window, _ = self._sizes(self.interval)
        if self._chance and not self._lag:
            k = self._chance
            return self._report(
                event, "convergence_plateau", True, severity="high", value=x, threshold=None,
                message=(f"{self.metric} has sat at {x:.5g} for {CHANCE_POINTS} points: ln {k} = {math.log(k):.5g}, the "
                         f"loss of a uniform guess over {k} classes — the model predicts nothing (dead or frozen "
                         f"weights, labels not reaching the loss, an LR that does not move it)"),
                metadata={"best": self.best, "since_best": self.since_best, "stagnation": True, "chance_classes": k})
        if self._lag:
            how = (f"has been exactly {x:.7g} for {REPEAT_POINTS + 1} points" if self._lag == 1 else
                   f"repeats, value for value, its last {REPEAT_POINTS} losses of {self._lag} points before")
            return self._report(
                event, "convergence_plateau", True, severity="high", value=x, threshold=None,
                message=(f"{self.metric} {how}: the model does not change (no optimizer step, frozen or "
                         f"unattached weights, dead units, a constant prediction)"),
                metadata={"best": self.best, "since_best": self.since_best, "stagnation": True,
                          "repeat_lag": self._lag})
        if self.seen < warmup:
            return []
        stagnant, start, now = self._stagnation()
        if stagnant:
            return self._report(
                event, "convergence_plateau", True, severity="high", value=now,
                threshold=start * (1 - self._improvement()),
                message=(f"{self.metric} is not learning: median {now:.4g} over the last {len(self.recent)} "
                         f"steps vs {start:.4g} over the first {len(self.early)} "
                         f"({(start - now) / start:+.1%})"),
                metadata={"best": self.best, "since_best": self.since_best, "stagnation": True,
                          "start_median": start, "recent_median": now})
        # a converged run's floor is a plateau, and no news: low however long it lasts
        return self._report(
            event, "convergence_plateau", self.since_best >= window, severity="low", value=self.smooth,
            threshold=self.plateau_threshold,
            message=(f"smoothed {self.metric} {self.smooth:.4g} has not improved by {self.plateau_threshold:.2%} "
                     f"in {self.since_best} steps"),
            metadata={"best": self.best, "since_best": self.since_best, "stagnation": False})

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # _advance takes steps until one that may change the alert stream (a plateau opens, escalates or
        # resolves): that step goes through update, and _advance takes the rest. When a recent median may
        # sit where the run started (stagnation), the rest goes step by step.
        xs = None if self.off or self.seen < 2 else _plain_losses(events, self.metric)
        if xs is None:
            return super().update_batch(events)
        self.preference = self.preference or has_any(events, PREFERENCE_METRICS)
        steps, lrs = [e.step for e in events], column(events, "lr")
        raised: list[tuple[int, Alert]] = []
        begin = 0
        while begin < len(events):
            stop = self._advance(xs, steps, lrs, begin, watch=True)
            if stop is None:  # stagnation cannot be ruled out
                return raised + [(begin + i, a) for i, a in super().update_batch(events[begin:])]
            if stop < len(events):
                raised += [(stop, alert) for alert in self.update(events[stop])]
            begin = stop + 1
        return raised

    def _advance(self, xs: list[float], steps: list[int], lrs: list[float | None], begin: int,
                 watch: bool) -> int | None:
        """The detector's arithmetic, for ``update`` and ``update_batch`` alike: fold ``xs[begin:]`` (with
        their steps and learning rates) into the smoothed loss, the run's cadence, the LR's last rise, the
        early and recent windows, and the best level and the count since it.

        ``watch=False`` (``update``): take them all. ``watch=True`` (``update_batch``): stop before the first
        step whose plateau test changes the alert stream (returning its index; ``len(xs)``: none did) — or
        take nothing and return None when a recent median might show stagnation: then ``update`` must
        judge each step. The state is written back only for the steps taken."""
        threshold = self.plateau_threshold
        smooth, absdev, seen, best, since_best = self.smooth, self.absdev, self.seen, self.best, self.since_best
        first_step, interval, prev_lr, lr_rose_at = self.first_step, self.interval, self.prev_lr, self.lr_rose_at
        warmup, window, span = self._sizes(interval)
        alpha = 2.0 / (span + 1)
        episode = self.episodes.get("convergence_plateau") if watch else None
        clear = episode["clear"] if episode else 0
        early, recent = list(self.early), list(self.recent)
        later = lrs[begin:]
        lr_still = later.count(prev_lr) == len(later) or later.count(None) == len(later)  # compact already
        checked = 0  # steps taken that the stagnation test would look at
        stop = len(xs)
        top, self._lag, self._chance = self.top_step, 0, 0
        cxs = [compact(x) for x in xs[begin:]]
        # a repeat needs a loss equal to one before it in the window: when the window's losses and these
        # are all different (one set, in C), no step repeats and none needs the per-step search (a batch
        # of 100 steady steps: ~1 µs a step); one step alone takes the search, cheaper than the set
        repeats = len(cxs) < 8 or len(set(recent).union(cxs)) < len(recent) + len(cxs)
        for i in range(begin, len(xs)):
            x = xs[i]
            if interval is None:  # the cadence is known from the second point on (never a step to stop at)
                first_step, interval = cadence(first_step, interval, steps[i])
                if interval is not None:
                    warmup, window, span = self._sizes(interval)
                    alpha = 2.0 / (span + 1)
            if smooth is None:
                n_smooth, n_absdev = float(x), absdev
            else:
                n_absdev = absdev + alpha * (abs(x - smooth) - absdev)
                n_smooth = smooth + alpha * (x - smooth)
            n_seen, n_rose, n_prev_lr = seen + 1, lr_rose_at, prev_lr
            if not lr_still:
                lr = lrs[i]
                if lr is not None and math.isfinite(lr):
                    if n_prev_lr is not None and lr > n_prev_lr:
                        n_rose = n_seen
                    n_prev_lr = compact(lr)
            n_best, n_since, n_clear = best, since_best, clear
            cx = cxs[i - begin]
            fresh = top is None or steps[i] > top
            lag = _repeat_lag(recent, cx, window) if repeats and fresh and cx > 0.01 else 0
            # at chance: past the first 10 points of a run watched from its start, at once in a fragment
            chance = _chance_classes(recent, cx) if fresh and not self.preference and (
                seen >= 10 or not _from_start(first_step, interval, warmup)) else 0
            if watch and (lag or chance):  # a model that does not change: update judges the step
                stop = i
                break
            if n_seen >= warmup:
                if n_best is None:
                    n_best = n_smooth
                if n_smooth < n_best - threshold * abs(n_best):
                    n_best, n_since = n_smooth, 0
                else:
                    n_since += 1
                if watch:
                    active = n_since >= window
                    if episode is None:
                        if active:
                            stop = i
                            break
                    elif active:
                        if episode["severity"] != "low":  # a stagnation episode: update judges each step
                            stop = i
                            break
                        n_clear = 0
                    else:
                        n_clear += 1
                        if n_clear >= self.resolve_after:
                            stop = i
                            break
                    if n_seen >= warmup + window:
                        checked += 1
            smooth, absdev, seen, prev_lr, lr_rose_at = n_smooth, n_absdev, n_seen, n_prev_lr, n_rose
            best, since_best, clear = n_best, n_since, n_clear
            top, self._lag, self._chance = steps[i] if fresh else top, lag, chance
            if len(early) < warmup:
                early.append(cx)
            recent.append(cx)
        if watch:
            taken = recent[max(0, len(recent) - checked - window + 1):]
            if checked and _from_start(first_step, interval, warmup):
                start = median(early)
                # no window's median can exceed this bound: below the stagnation level, none is stagnant
                if start > 0 and upper_median_bound(taken, window) > start * (1 - self.stagnation_improvement):
                    return None
            if episode is not None:
                episode["clear"] = clear
        self.smooth, self.absdev, self.seen, self.best, self.since_best = smooth, absdev, seen, best, since_best
        self.first_step, self.interval, self.prev_lr, self.lr_rose_at = first_step, interval, prev_lr, lr_rose_at
        self.early, self.recent, self.top_step = early, recent[-window:], top
        return stop

    def _improvement(self) -> float:
        """The relative improvement below which the loss is not learning (halved on a sparse run)."""
        return self.stagnation_improvement / (2 if is_sparse(self.interval) else 1)

    def _stagnation(self) -> tuple[bool, float, float]:
        """``(not learning, early median, recent median)`` — see the class docstring."""
        warmup, window, _ = self._sizes(self.interval)
        if self.seen < warmup + window:
            return False, math.nan, math.nan
        # a run picked up mid-way (resumed, or monitoring started late) did not start at this level
        from_start = _from_start(self.first_step, self.interval, warmup)
        warming_up = self.seen - self.lr_rose_at < window
        start, now = median(self.early), median(self.recent)
        # above where it started by a quarter is a divergence (the divergence detector's), not a plateau
        stagnant = from_start and not warming_up and start > 0 and (
            start * (1 - self._improvement()) < now <= 1.25 * start)
        return stagnant, start, now


@register_detector
class LossOscillationDetector(Detector):
    """Oscillation: the loss goes up, down, up, down with a large amplitude (an LR too high to settle).

    Over the last ``oscillation_window`` steps, the fraction of consecutive differences that change sign
    (2/3 for independent noise, 1 for a pure zig-zag) must reach 0.85, the lag-1 autocorrelation of the
    losses must be below -0.5 (independent noise sits near 0), and the median step size must be at
    least ``oscillation_amplitude`` of the median loss. ``low`` (small-batch regression zig-zags too);
    ``high`` when it lasts a second full window with the autocorrelation below -0.7.

    >>> from detectors.events import MetricEvent
    >>> d = LossOscillationDetector()
    >>> zigzag = [1.0 if s % 2 else 2.5 for s in range(60)]
    >>> [(a.severity, a.step) for s, x in enumerate(zigzag) for a in d.update(MetricEvent("r", s, {"loss": x}))]
    [('low', 20), ('high', 40)]
    """

    name = "loss_oscillation"
    category = "loss"
    section = "convergence"
    defaults = CONVERGENCE_DEFAULTS
    state_fields = ("recent", "run_length", "off")

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    def reset(self) -> None:
        self.recent: list[float] = []
        self.run_length = 0
        self.off = False

    def update(self, event: MetricEvent) -> list[Alert]:
        x = event.metrics.get(self.metric)
        if x is None or not math.isfinite(x) or self.off:
            return []
        if _not_a_convergence_curve(event, x):
            self.off = True  # a policy-gradient surrogate swings around 0 by design
            return self._report(event, "loss_oscillation", False)
        push(self.recent, x, self.oscillation_window + 1)
        if len(self.recent) <= self.oscillation_window:
            return []
        values = self.recent
        diffs = [b - a for a, b in pairwise(values)]
        flips = sum(d * e < 0 for d, e in pairwise(diffs)) / (len(diffs) - 1)
        level = median([abs(v) for v in values])
        amplitude = median([abs(d) for d in diffs]) / level if level > 0 else 0.0
        active = flips >= 0.85 and amplitude >= self.oscillation_amplitude
        if active:
            # lag-1 autocorrelation of the values: ≈0 for independent minibatch noise (whose differences
            # still flip sign 2/3 of the time), ≈-1 for a real zig-zag
            centred = np.asarray(values) - np.mean(values)
            denom = float(np.dot(centred, centred))
            r1 = float(np.dot(centred[1:], centred[:-1])) / denom if denom > 0 else 0.0
            active = r1 <= -0.5
        self.run_length = self.run_length + 1 if active else 0
        if not active:
            return self._report(event, "loss_oscillation", False)
        severity = "high" if self.run_length > self.oscillation_window and r1 <= -0.7 else "low"
        return self._report(
            event, "loss_oscillation", True, severity=severity, value=amplitude,
            threshold=self.oscillation_amplitude,
            message=(f"{self.metric} zig-zags: {flips:.0%} of the last {self.oscillation_window} steps reverse "
                     f"direction, swinging {amplitude:.0%} of its level"),
            metadata={"sign_flip_fraction": flips, "lag1_autocorrelation": r1, "consecutive": self.run_length})

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # the swing must reach oscillation_amplitude of the level: bound the median step from above and
        # the median level from below over every window the batch can make; below that, nothing fires
        xs = None if self.off or len(self.recent) <= self.oscillation_window or "loss_oscillation" in self.episodes \
            else _plain_losses(events, self.metric)
        if xs is None:
            return super().update_batch(events)
        values = [*self.recent, *compacted(events, self.metric)]
        steps = [-abs(b - a) for a, b in pairwise(values)]
        largest_step = -lower_median_bound(steps[:self.oscillation_window], steps[self.oscillation_window:],
                                           self.oscillation_window)
        lowest_level = lower_median_bound(values[:len(self.recent)], values[len(self.recent):], len(self.recent))
        if lowest_level <= 0 or largest_step / lowest_level >= self.oscillation_amplitude:
            return super().update_batch(events)
        self.run_length = 0
        self.recent = values[-len(self.recent):]
        return []
