"""Gradient detectors: explosion, vanishing and high variance of the gradient norm.

All three read ``grad_norm``. Managed jobs (Bedrock, some CloudWatch sources) report no gradient norm;
there the norm is *estimated* from the loss decrease and the learning rate — for a gradient step
``Δloss ≈ -lr·‖g‖²``, so ``‖g‖ ≈ sqrt(|Δ smoothed loss| / lr)`` — and alerts carry
``metadata.estimated = True``. An estimate is weak evidence, so its alerts stay at ``medium`` at most.
"""

from __future__ import annotations

import math

from .alerts import Alert
from .base import Detector, all_finite, column, has_any, register_detector
from .events import MetricEvent
from .loss import POLICY_GRADIENT_METRICS, is_policy_gradient
from .stats import compact, ema, ema_var

__all__ = ["GradientExplosionDetector", "GradientVanishingDetector", "GradientVarianceDetector",
           "GRADIENT_DEFAULTS"]

#: the ``[gradient]`` section, shared by the three detectors (first three keys are users' existing keys)
GRADIENT_DEFAULTS = {
    "explosion_threshold": 10.0,
    "vanishing_threshold": 1e-6,
    "window_size": 100,
    "zscore_threshold": 6.0,
    "ema_decay": 0.97,
    "warmup": 25,
    "variance_threshold": 1.0,
    "resolve_after": 20,
}


class _GradientNormReader(Detector):
    """The gradient norm of an event: measured, or estimated from loss and learning rate."""

    section = "gradient"
    category = "gradient"
    defaults = GRADIENT_DEFAULTS
    state_fields = ("loss_ema", "prev_loss_ema")
    metrics = ("grad_norm", "loss")

    def reset(self) -> None:
        self.loss_ema: float | None = None
        self.prev_loss_ema: float | None = None

    def grad_norm(self, event: MetricEvent) -> tuple[float | None, bool]:
        """``(norm, estimated)``; ``norm`` is None when neither measured nor estimable at this step."""
        g = event.metrics.get("grad_norm")
        if g is not None:
            return (g if math.isfinite(g) else None), False
        loss, lr = event.metrics.get("loss"), event.metrics.get("lr")
        if loss is None or not math.isfinite(loss):
            return None, True
        # smoothing first: a raw minibatch loss difference is mostly batch noise, not the update
        self.prev_loss_ema, self.loss_ema = self.loss_ema, ema(self.loss_ema, loss, 0.3)
        if self.prev_loss_ema is None or lr is None or not math.isfinite(lr) or lr <= 0:
            return None, True
        return compact(math.sqrt(abs(self.loss_ema - self.prev_loss_ema) / lr)), True

    def measured_norms(self, events: list[MetricEvent], alert_type: str) -> list[float] | None:
        """The batch's norms when every step measured a finite one and no episode is open (the batch
        paths' precondition: no estimate, so the loss EMA does not move), else None."""
        norms = column(events, "grad_norm")
        if alert_type in self.episodes or not all_finite(norms):
            return None
        return norms


@register_detector
class GradientExplosionDetector(_GradientNormReader):
    """Gradient norm above an absolute ceiling, or far above its own recent behaviour.

    Two tests: ``grad_norm > explosion_threshold`` while 1.5× above its moving mean (real models train
    with norms of 10–1e5 for their whole run: a ceiling alone says nothing about them) and a z-score against an exponential moving mean and
    variance of the norm (ZClip, Kumar et al. 2025, arXiv:2504.02507): ``z = (g - μ) / σ`` with outliers
    entering the average only clipped to ``μ + zscore_threshold·σ``, so a burst cannot hide itself. A
    single step is at most ``medium`` (one hard batch must not page anyone, as for loss spikes); two steps
    in a row over both tests, or at 10× the mean, are ``high``; three steps, or two at 100×, ``critical``.
    An episode clears only when the norm is back under twice the mean it had when the episode began: the
    moving mean creeps up towards a norm that stays high, and that is not the run getting better. A norm of
    exactly 0 is no update at all (a step the loss scaler skipped, a GRPO batch with no advantage) and does
    not enter the mean: on a GRPO run half the norms can be 0, and the rest would all look 10× above it.

    >>> from detectors.events import MetricEvent
    >>> d = GradientExplosionDetector()
    >>> norms = [2.0, 1.6, 1.4, 1.3, 1.25, 1.2, 1.3, 1.1, 1.2, 1.15] * 4
    >>> [a for s, g in enumerate(norms) for a in d.update(MetricEvent("r", s, {"grad_norm": g}))]
    []
    >>> [(a.alert_type, a.severity) for s in (40, 41, 42) for a in d.update(MetricEvent("r", s, {"grad_norm": 180.0}))]
    [('gradient_explosion', 'medium'), ('gradient_explosion', 'critical')]
    """

    name = "gradient_explosion"
    state_fields = _GradientNormReader.state_fields + ("mean", "var", "seen", "run_length", "baseline", "both")

    def reset(self) -> None:
        super().reset()
        self.mean: float | None = None
        self.var = 0.0
        self.seen = 0
        self.run_length = 0
        #: steps in a row over both tests (the z-score and the ceiling)
        self.both = 0
        #: the moving mean when the open episode began
        self.baseline: float | None = None

    def update(self, event: MetricEvent) -> list[Alert]:
        g, estimated = self.grad_norm(event)
        if g is None or g == 0:  # 0: no update was made (a skipped step, a batch with no advantage), no scale
            return []
        if self._advance([g], screened=False):
            return self._calm(event, g, estimated)
        alpha = 1.0 - self.ema_decay
        sigma = math.sqrt(self.var)
        z = (g - self.mean) / sigma if sigma > 0 else 0.0
        ratio = g / self.mean if self.mean > 0 else math.inf
        warm = self.seen >= self.warmup
        z_hit = warm and z > self.zscore_threshold and ratio > 2.0
        abs_hit = g > self.explosion_threshold and ratio > 1.5
        if self.episodes.get("gradient_explosion") is None:
            self.baseline = self.mean
        self.run_length += 1
        # over the ceiling at 1.5x the mean is routine for a noisy norm that lives above the ceiling: "two
        # steps over both tests" means both steps, not a z-score after one step over the ceiling alone
        self.both = self.both + 1 if z_hit and abs_hit else 0
        clipped = self.mean + self.zscore_threshold * sigma if warm else g
        self.mean, self.var = ema_var(self.mean, self.var, min(g, clipped), alpha)
        self.seen += 1
        # critical needs a second step: one extreme batch is not yet a diverged run
        if self.run_length >= 2 and ((ratio >= 100 and warm) or g > 100 * self.explosion_threshold) or (
                self.run_length >= 3 and z_hit and abs_hit):
            severity = "critical"
        elif self.both >= 2 or (self.run_length >= 2 and warm and ratio >= 10) or (self.run_length >= 3 and z_hit):
            severity = "high"
        elif (self.run_length >= 2 and ratio >= 3) or (warm and ratio >= 10):
            severity = "medium"
        else:
            severity = "low"  # one step over a ceiling or a z-score (one hard batch), or a mild excursion
        if estimated:
            severity = "low"  # an estimate from loss and LR is a hint, not a measurement
        return self._report(
            event, "gradient_explosion", True, severity=severity, value=g,
            threshold=self.explosion_threshold if abs_hit else clipped,
            message=(f"{'estimated ' if estimated else ''}grad norm {g:.4g} is {ratio:.1f}x its moving mean "
                     f"{self.mean:.4g} (z={z:.1f}) for {self.run_length} step(s)"),
            metadata={"z": z, "ratio": ratio, "ema_mean": self.mean, "consecutive": self.run_length,
                      "estimated": estimated})

    def _calm(self, event: MetricEvent, g: float, estimated: bool) -> list[Alert]:
        """A norm :meth:`_advance` took (no test hit, or the run's first norm)."""
        episode = self.episodes.get("gradient_explosion")
        if self.seen == 1:
            return []
        self.run_length = self.both = 0
        if episode is not None and g > 2.0 * self.baseline:
            return self._report(  # the mean caught up with the norm; the norm did not come back down
                event, "gradient_explosion", True, severity=episode["severity"], value=g,
                threshold=2.0 * self.baseline,
                message=f"grad norm {g:.4g} is still {g / self.baseline:.1f}x the mean {self.baseline:.4g} it "
                        f"had before the episode", metadata={"baseline": self.baseline, "estimated": estimated})
        return self._report(event, "gradient_explosion", False)

    def _advance(self, norms: list[float], screened: bool) -> int:
        """The detector's arithmetic, for ``update`` and ``update_batch`` alike: fold ``norms`` into the
        moving mean and variance until one hits a test (``screened``: the caller proved none can); returns
        how many were taken. A norm that hits is left to ``update``, which clips it into the average."""
        alpha, mean, var, seen = 1.0 - self.ema_decay, self.mean, self.var, self.seen
        keep, zscore, ceiling, warmup, sqrt = 1 - alpha, self.zscore_threshold, self.explosion_threshold, \
            self.warmup, math.sqrt
        taken = len(norms)
        for i, g in enumerate(norms):
            if mean is None:
                mean, seen = compact(g), 1
                continue
            if not screened:
                sigma = sqrt(var)
                ratio = g / mean if mean > 0 else math.inf
                warm = seen >= warmup
                # a z-score only counts with a material jump: a very steady norm has a tiny σ
                if (warm and sigma > 0 and (g - mean) / sigma > zscore and ratio > 2.0) or (
                        g > ceiling and ratio > 1.5):
                    taken = i
                    break
            diff = g - mean  # stats.ema_var, inline: a call per step costs as much as its arithmetic
            incr = alpha * diff
            mean, var = mean + incr, keep * (var + diff * incr)
            seen += 1
        self.mean, self.var, self.seen = mean, var, seen
        return taken

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # _advance over the batch; from the first norm that hits a test on, step by step
        norms = self.measured_norms(events, "gradient_explosion")
        if norms is None or min(norms) == 0:
            return super().update_batch(events)
        # the mean never falls below min(mean, smallest norm) (an average of values above that): when no
        # norm reaches twice that nor the ceiling, neither test can fire and only the average moves
        mean, top = self.mean, max(norms)
        screened = (mean is not None and mean > 0 and 0 <= 1.0 - self.ema_decay <= 1
                    and top <= self.explosion_threshold and top <= 2.0 * min(mean, min(norms)) * (1 - 1e-12))
        seen = self.seen
        taken = self._advance(norms, screened)
        if self.seen > max(seen, 1):
            self.run_length = self.both = 0
        if taken == len(norms):
            return []
        return [(taken + i, a) for i, a in super().update_batch(events[taken:])]


@register_detector
class GradientVanishingDetector(_GradientNormReader):
    """Gradient norm at or below ``vanishing_threshold``: the model has stopped receiving signal.

    A measured norm under the threshold for one step is ``medium`` (an fp16 skipped step can report 0);
    for 5 steps in a row ``high`` — or 2 logged points of exactly 0 (nothing is trained) — for
    ``window_size`` steps ``critical``. On a policy-gradient run (reward, KL, ... logged) a norm of exactly 0 is
    a batch whose every group of completions got one reward — no advantage to follow, routine once a policy
    solves most prompts (healthy GRPO runs log 0 for eight points in a row) — and stays ``low``: a reward
    that does not move is ``reward_flat``'s to page. Estimated norms are not used: a flat loss says
    "plateau", not "no gradient".

    >>> from detectors.events import MetricEvent
    >>> d = GradientVanishingDetector()
    >>> sev = [a.severity for s in range(6) for a in d.update(MetricEvent("r", s, {"grad_norm": 3e-9}))]
    >>> sev
    ['medium', 'high']
    """

    name = "gradient_vanishing"
    state_fields = _GradientNormReader.state_fields + ("run_length", "rl")

    def reset(self) -> None:
        super().reset()
        self.run_length = 0
        #: whether the run logs policy-gradient metrics (``POLICY_GRADIENT_METRICS``)
        self.rl = False

    def update(self, event: MetricEvent) -> list[Alert]:
        self.rl = self.rl or is_policy_gradient(event)
        g, estimated = self.grad_norm(event)
        if g is None or estimated:
            return []
        if g > self.vanishing_threshold:
            self.run_length = 0
            return self._report(event, "gradient_vanishing", False)
        self.run_length += 1
        severity = ("low" if self.rl and g == 0 else
                    "critical" if self.run_length >= self.window_size else
                    "high" if self.run_length >= 5 or (self.run_length >= 2 and g == 0) else "medium")
        return self._report(event, "gradient_vanishing", True, severity=severity, value=g,
                            threshold=self.vanishing_threshold,
                            message=f"grad norm {g:.3g} ≤ {self.vanishing_threshold:g} for {self.run_length} step(s)",
                            metadata={"consecutive": self.run_length, "estimated": False})

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        norms = self.measured_norms(events, "gradient_vanishing")
        if norms is None or min(norms) <= self.vanishing_threshold:
            return super().update_batch(events)
        self.run_length = 0
        self.rl = self.rl or has_any(events, POLICY_GRADIENT_METRICS)
        return []


@register_detector
class GradientVarianceDetector(_GradientNormReader):
    """Spread of the grad norm over ~``window_size`` steps, measured in log space (a diagnostic).

    An exponentially weighted mean and variance (span ``window_size``) of ``log ‖g‖`` give a spread σ
    that a few heavy-tailed batches cannot dominate, reported as the coefficient of variation a
    log-normal with that σ has, ``sqrt(exp(σ²) - 1)``; healthy SGD sits near 0.1–0.6, a run that lurches
    between tiny and huge updates goes above ``variance_threshold``. Spread alone is weak evidence
    (small batches near convergence are noisy by nature), so the alert stays ``low``.

    >>> import random
    >>> from detectors.events import MetricEvent
    >>> rng = random.Random(1)
    >>> d = GradientVarianceDetector(window_size=20)
    >>> [a for s in range(200) for a in d.update(MetricEvent("r", s, {"grad_norm": rng.uniform(0.8, 1.2)}))]
    []
    >>> out = [a for s in range(200, 260) for a in d.update(MetricEvent("r", s, {"grad_norm": rng.choice([0.05] * 4 + [30.0])}))]
    >>> [a.severity for a in out]
    ['low']
    """

    name = "gradient_variance"
    state_fields = _GradientNormReader.state_fields + ("mean", "var", "seen")

    def reset(self) -> None:
        super().reset()
        self.mean: float | None = None
        self.var = 0.0
        self.seen = 0

    def update(self, event: MetricEvent) -> list[Alert]:
        g, estimated = self.grad_norm(event)
        if g is None or g <= 0:
            return []
        self._advance([g], math.inf)
        if self.seen < self.window_size:
            return []
        cv = math.sqrt(math.expm1(min(self.var, 50.0)))
        return self._report(event, "gradient_variance", cv > self.variance_threshold, severity="low",
                            value=cv, threshold=self.variance_threshold,
                            message=f"grad norm spread (log-normal σ/μ) = {cv:.2f} over ~{self.window_size} "
                                    f"steps (threshold {self.variance_threshold:g})",
                            metadata={"log_sigma": math.sqrt(self.var), "estimated": estimated})

    def _advance(self, norms: list[float], bound: float) -> int:
        """The detector's arithmetic, for ``update`` and ``update_batch`` alike: fold the logs of ``norms``
        (all > 0) into the moving mean and variance, up to (not including) the first that would leave the
        variance over ``bound`` past the warm-up; returns how many were taken."""
        alpha, mean, var, seen = 2.0 / (self.window_size + 1), self.mean, self.var, self.seen
        keep, log, window = 1 - alpha, math.log, self.window_size
        taken = len(norms)
        for i, g in enumerate(norms):
            x = log(g)
            if mean is None:
                n_mean, n_var = compact(x), var
            else:
                diff = x - mean  # stats.ema_var, inline: a call per step costs as much as its arithmetic
                incr = alpha * diff
                n_mean, n_var = mean + incr, keep * (var + diff * incr)
            if seen + 1 >= window and n_var > bound:
                taken = i
                break
            mean, var, seen = n_mean, n_var, seen + 1
        self.mean, self.var, self.seen = mean, var, seen
        return taken

    def update_batch(self, events: list[MetricEvent]) -> list[tuple[int, Alert]]:
        # _advance over the batch while the spread stays clearly under the threshold; from the step that
        # would take it near or past it on, step by step
        norms = self.measured_norms(events, "gradient_variance")
        if norms is None or min(norms) <= 0:
            return super().update_batch(events)
        # sqrt(expm1(var)) > threshold exactly when var > log1p(threshold²); a var within a hair of that
        # (or past it) leaves the decision to update's own arithmetic
        bound = min(math.log1p(self.variance_threshold ** 2), 50.0) * (1 - 1e-9) if self.variance_threshold >= 0 \
            else -math.inf
        taken = self._advance(norms, bound)
        if taken == len(norms):
            return []
        return [(taken + i, a) for i, a in super().update_batch(events[taken:])]
