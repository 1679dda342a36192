"""Hugging Face ``Trainer`` (and TRL trainers, which log through it): one callback.

    trainer = Trainer(..., callbacks=[LossguardCallback("exp-1")])

Each optimizer step sends one event: the *real* step loss — what ``trainer.training_step`` returned for
the step's micro-batches, read as a tensor, not HF's logged loss, where ``logging_nan_inf_filter`` (on by
default) replaces a NaN/Inf loss by the running average so a diverging run looks healthy — the pre-clip
gradient norm HF computes at every step (the accelerator's ``clip_grad_norm_`` return value; no extra
work, no host sync), ``lr``, ``step_time`` and memory. HF's own logs of that step (``on_log``: eval
metrics, TRL's ``objective/kl``, ``rewards/margins`` …) are mapped onto canonical names and merged into
the same event, minus what it already carries: at a step where HF logs or evaluates, the event leaves
after the log / evaluation, so one optimizer step is one event.

The callback finds its ``Trainer`` when training begins (the caller of ``on_train_begin``) and observes
``training_step`` and ``clip_grad_norm_`` there; ``LossguardCallback("exp-1").attach(trainer)`` does the
same explicitly. Without a trainer to observe (a custom loop driving the callbacks), the loss is read
from the model's output and the norm is taken only when HF does not clip.

A stop request for the run (auto-stop sink, ``lossguard stop RUN``) sets
``control.should_training_stop``: HF ends the epoch loop after the current step and runs its normal
end-of-training (final save, ``on_train_end``). In a distributed run one all-reduce per step carries
the step's loss and the stop flag of every rank: the decision is reduced across ranks (stop when any rank
has heard it), so all ranks stop at the same step, and the loss sent is the step's loss — the mean over
the ranks, what HF itself logs — not the reporting rank's own. The training thread waits for that
all-reduce only to read the stop flag (the one sync point the decision needs; with
``stop_on_request=False`` it never waits): the loss is read on the reporter's sender thread. A NaN on one
rank makes the mean NaN, and reaches the report through HF's grad norm too (taken after DDP has averaged
the gradients).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from detectors.aliases import canonical_name

from .callback import CallbackReporting
from .timing import Every

__all__ = ["LossguardCallback"]

# keys of HF logs that are bookkeeping, not signals
_SKIP_LOG_KEYS = frozenset({"step", "epoch", "total_flos", "train_runtime", "train_steps_per_second",
                            "train_samples_per_second", "train_loss"})


class LossguardCallback(CallbackReporting, TrainerCallback, ExportableState):
    """Reports a ``Trainer`` run to lossguard and stops it on request.

    Args:
        run_id: the run's id (default ``LOSSGUARD_RUN_ID``, else ``args.run_name``, else a fresh one).
            Kept across ``resume_from_checkpoint`` (saved with the trainer state), which counts a new attempt.
        bootstrap: Kafka address (default ``LOSSGUARD_BOOTSTRAP`` or 127.0.0.1:9092).
        topic: metrics topic (default ``<LOSSGUARD_TOPIC_PREFIX>.metrics``).
        tags: extra labels; ``model`` (the config's model type), ``host``, ``rank``, ``attempt`` are added.
        every: send one optimizer step in ``every`` (default 1).
        report_rank: only this process index sends (default 0); ``None``: every process, tagged.
        stop_on_request: turn a stop request into ``control.should_training_stop`` (default ``True``).
        eval_every_seconds: also evaluate every this many seconds of wall-clock time (default ``None``:
            only HF's step/epoch schedule); needs an ``eval_dataset``.
        attempt: which attempt of the run this is (default: 0, or one more than the checkpoint's).
    """

    def __init__(self, run_id: str | None = None, *, bootstrap: str | None = None, topic: str | None = None,
                 tags: Mapping[str, str] | None = None, every: int = 1, report_rank: int | None = 0,
                 stop_on_request: bool = True, eval_every_seconds: float | None = None,
                 attempt: int | None = None):
        super().__init__(run_id, bootstrap=bootstrap, topic=topic, tags=tags, every=every,
                         report_rank=report_rank, stop_on_request=stop_on_request, attempt=attempt)
        self.eval_every_seconds = eval_every_seconds
        self._eval_due: Every | None = None
        self._attached = False
        self._trainer_id: int | None = None  # the trainer whose training_step / clipping are observed
        self._losses: list[Any] = []
        self._grad_norm: Any = None
        self._lr: float | None = None
        self._sent_keys: tuple[int, frozenset[str]] = (-1, frozenset())
        self._hook: Any = None
        #: the step event held back while HF logs or evaluates that step: (step, metrics, flush on)
        self._pending: tuple[int, dict[str, Any], str] | None = None

    # -- optional: observe the trainer itself -------------------------------------------------------------
    def attach(self, trainer: Any) -> LossguardCallback:
        """Add this callback to ``trainer`` and observe its per-micro-batch loss and pre-clip grad norm."""
        trainer.add_callback(self)
        self._observe(trainer)
        return self

    def _observe(self, trainer: Any) -> None:
        if self._attached and self._trainer_id == id(trainer):
            return
        self._trainer_id = id(trainer)
        step_fn = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            loss = step_fn(*args, **kwargs)
            try:
                self._losses.append(loss.detach())  # already scaled so that the micro-batches sum to the step
            except Exception:  # noqa: BLE001 — never break training
                pass
            return loss

        trainer.training_step = training_step
        accelerator = getattr(trainer, "accelerator", None)
        if accelerator is not None and hasattr(accelerator, "clip_grad_norm_"):
            clip_fn = accelerator.clip_grad_norm_

            def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
                norm = clip_fn(*args, **kwargs)  # the norm before clipping
                self._grad_norm = norm.detach() if hasattr(norm, "detach") else norm
                return norm

            accelerator.clip_grad_norm_ = clip_grad_norm_
        self._attached = True

    # -- Trainer events --------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self._restore(state)
        tags = dict(self.tags)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type:
            tags.setdefault("model", str(model_type))
        if state.global_step:
            tags["resumed_at_step"] = str(state.global_step)
        self.run_id = self.run_id or os.environ.get("LOSSGUARD_RUN_ID") or getattr(args, "run_name", None) or None
        self._start_reporter(model, optimizer, tags, rank=args.process_index, source="hf")
        self._eval_due = Every(self.eval_every_seconds) if self.eval_every_seconds else None
        self._losses.clear()
        self._pending = None
        trainer = _calling_trainer(self)
        if trainer is not None and (self.reporter.enabled or self._rank_mean_loss(args)):
            self._observe(trainer)  # every rank's loss goes into the mean the reporting rank sends
        if trainer is None and not self._attached and model is not None and (
                self.reporter.enabled or self._rank_mean_loss(args)):
            # Trainer's default compute_loss takes the loss from the model's output: see it there.
            self._hook = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: Any, _inputs: Any, output: Any) -> None:
        if not module.training:  # evaluation passes are not training steps
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if loss is not None and hasattr(loss, "detach") and loss.dim() == 0:
            self._losses.append(loss.detach())

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if self.reporter is None or not self.reporter.enabled:
            return
        if self._grad_norm is None and not args.max_grad_norm:
            self.reporter.capture_grad_norm()  # no clipping: the grads HF will apply are the raw ones
        if optimizer is not None:
            self._lr = optimizer.param_groups[0]["lr"]  # the lr this update uses (the scheduler steps next)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reporter = self.reporter
        if reporter is None:
            return
        self._flush()
        if self._eval_due is not None and self._eval_due():
            control.should_evaluate = True
        due = state.global_step % self.every == 0
        loss = self._step_loss() if self._losses else None
        should_stop = reporter.should_stop if self.stop_on_request else False
        mean_loss = due and self._rank_mean_loss(args)
        if getattr(args, "world_size", 1) > 1 and (self.stop_on_request or mean_loss):
            # the same decision on every rank, so every rank joins this all-reduce at every step it is made
            reduced, should_stop = _over_ranks(loss if mean_loss else None, should_stop, args.device,
                                               decide=self.stop_on_request)
            if mean_loss:
                loss = reduced  # else each rank reports its own loss (report_rank=None), tagged with its rank
        if reporter.enabled and due:
            metrics: dict[str, Any] = {}
            if loss is not None:
                metrics["loss"] = loss
            if self._grad_norm is not None:
                metrics["grad_norm"] = self._grad_norm
            if self._lr is not None:
                metrics["lr"] = self._lr
            # HF's flow callback (run before this one) has decided whether it logs / evaluates this step:
            # then its logs are merged into this step's event, sent once they are in
            wait = "evaluate" if control.should_evaluate else "log" if control.should_log else ""
            self._pending = (state.global_step, metrics, wait)
            if not wait:
                self._flush()
        self._losses.clear()
        self._grad_norm = None
        if should_stop:
            control.should_training_stop = True  # on every rank at the same step

    def _rank_mean_loss(self, args: Any) -> bool:
        """Whether the loss sent is the mean over ranks: a distributed run that one rank reports for."""
        return getattr(args, "world_size", 1) > 1 and self.report_rank is not None

    def _flush(self) -> None:
        """Send the held step event (one optimizer step, with what HF logged for it)."""
        pending, self._pending = self._pending, None
        if pending is None or self.reporter is None:
            return
        step, metrics, _ = pending
        sent = {canonical_name(k) for k in metrics} | {"lr"}  # the reporter adds lr from the optimizer
        if self.reporter._grad_norm is not None:
            sent.add("grad_norm")
        self.reporter.log(step, **metrics)
        # these went out with the step event: a later log of the step must not send HF's copies
        self._sent_keys = (step, frozenset(sent))

    def _step_loss(self) -> Any:
        if len(self._losses) == 1:
            return self._losses[0]
        import torch

        stacked = torch.stack(self._losses)
        # training_step returns micro-batch losses that sum to the step loss; model outputs are per batch
        return stacked.sum() if self._attached else stacked.mean()

    def on_log(self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.reporter is None or not logs:
            return
        pending = self._pending if self._pending is not None and self._pending[0] == state.global_step else None
        step, sent = self._sent_keys
        if pending is not None:
            taken = {canonical_name(k) for k in pending[1]} | {"lr"}
            if self.reporter._grad_norm is not None:
                taken.add("grad_norm")
        else:
            taken = sent if step == state.global_step else frozenset()
        metrics = {}
        for name, value in logs.items():
            if name in _SKIP_LOG_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if canonical_name(name) in taken:
                continue  # the step event carries the real value (HF's loss here may be NaN-filtered)
            metrics[name] = value
        if pending is not None:
            pending[1].update(metrics)
            if pending[2] == "log":
                self._flush()
        elif metrics:  # a log of a step already sent (e.g. a user's own trainer.log): the same step again
            self.reporter.log_metrics(state.global_step, metrics)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pending is not None and self._pending[2] == "evaluate":
            self._flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.reporter is not None:
            self.reporter.close(timeout=5.0)

    # -- run identity across resume ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Saved by HF with each checkpoint: a resumed run keeps its id and counts its attempts."""
        return {"args": {"run_id": self.run_id}, "attributes": {"attempt": self.attempt or 0}}

    def _restore(self, state: Any) -> None:
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0]
        if not isinstance(saved, dict) or not state.global_step:
            return
        self.run_id = self.run_id or saved.get("args", {}).get("run_id")
        if self.attempt is None:
            self.attempt = int(saved.get("attributes", {}).get("attempt", 0)) + 1



def _calling_trainer(callback: Any) -> Any:
    """The ``Trainer`` whose callback handler is calling ``callback`` (a few frames up), or None."""
    frame = sys._getframe(1)
    for _ in range(12):
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        handler = getattr(owner, "callback_handler", None)
        if handler is not None and callback in getattr(handler, "callbacks", ()):
            return owner
    return None


def _over_ranks(loss: Any, stop: bool, device: Any, *, decide: bool) -> tuple[Any, bool]:
    """One sum all-reduce, over the ranks of the default process group, of the step's ``loss`` (None: none
    to send) and a ``stop`` flag. Returns the mean loss over the ranks as a :class:`_RankMean` (read when
    the reporter sends the step) and, with ``decide``, whether any rank asked to stop — the only wait."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return loss, stop
    values = torch.zeros(2, device=device)  # filled on the device: no host-to-device copy to wait for
    if stop:
        values[1] = 1.0
    if loss is not None:
        values[0] = loss.detach().reshape(()) if hasattr(loss, "detach") else float(loss)  # on the device, no wait
    work = dist.all_reduce(values, op=dist.ReduceOp.SUM, async_op=True)
    mean = _RankMean(work, values, dist.get_world_size()) if loss is not None else None
    if decide:
        work.wait()
        stop = bool(values[1].item())
    return mean, stop


class _RankMean:
    """A step's loss averaged over the ranks by an all-reduce that may still be in flight: ``float()``
    (the reporter's sender thread) waits for it, the training thread never does."""

    __slots__ = ("_work", "_values", "_ranks")

    def __init__(self, work: Any, values: Any, ranks: int):
        self._work, self._values, self._ranks = work, values, ranks

    def __float__(self) -> float:
        self._work.wait()
        return float(self._values[0].item()) / self._ranks
