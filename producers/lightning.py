"""Lightning: one callback. ``Trainer(callbacks=[LossguardCallback("exp-1")])``.

Each optimizer step sends one event: the step's loss — the mean of what ``training_step`` returned for
its micro-batches, undoing Lightning's division by ``accumulate_grad_batches`` (a tensor, read later on
the sender thread) — the total gradient norm taken in ``on_before_optimizer_step`` (before Lightning's
gradient clipping), ``lr`` per param group, ``batch_size`` (samples of all its micro-batches),
``step_time`` and memory. The ``val*``/``eval*`` metrics of a validation run (not the sanity check) are
merged into the event of the step they were computed at: the event leaves when the next batch starts,
when a validation run ends, or when training ends.

A stop request for the run sets ``trainer.should_stop``. In a distributed run the decision is reduced
across ranks (``strategy.reduce_boolean_decision``: stop when any rank has heard it), so every rank
stops at the same step, as Lightning's own EarlyStopping does; the reported loss is the mean over
ranks (``strategy.reduce``, on the device: no host sync), so a NaN on any rank reaches the report.
The callback's ``state_dict`` goes into checkpoints, so a run resumed with ``ckpt_path=`` keeps its run
id and counts a new attempt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback

from .callback import CallbackReporting

__all__ = ["LossguardCallback"]


class LossguardCallback(CallbackReporting, Callback):
    """Reports a Lightning run to lossguard and stops it on request.

    Args:
        run_id: the run's id (default ``LOSSGUARD_RUN_ID`` or a fresh one); restored from a checkpoint.
        bootstrap: Kafka address (default ``LOSSGUARD_BOOTSTRAP`` or 127.0.0.1:9092).
        topic: metrics topic (default ``<LOSSGUARD_TOPIC_PREFIX>.metrics``).
        tags: extra labels; ``model`` (the module's class name), ``host``, ``rank``, ``attempt`` are added.
        every: send one optimizer step in ``every`` (default 1).
        report_rank: only this global rank sends (default 0); ``None``: every rank, tagged.
        stop_on_request: turn a stop request into ``trainer.should_stop`` (default ``True``).
        attempt: which attempt of the run this is (default 0, or one more than the checkpoint's).
    """

    def __init__(self, run_id: str | None = None, *, bootstrap: str | None = None, topic: str | None = None,
                 tags: Mapping[str, str] | None = None, every: int = 1, report_rank: int | None = 0,
                 stop_on_request: bool = True, attempt: int | None = None):
        super().__init__(run_id, bootstrap=bootstrap, topic=topic, tags=tags, every=every,
                         report_rank=report_rank, stop_on_request=stop_on_request, attempt=attempt)
        self.last_step = -1
        self._step_at_batch_start = -1
        self._loss_sum: Any = None  # the micro-batch losses of the current optimizer step, summed
        self._micro_batches = 0
        self._samples = 0
        self._pending: tuple[int, dict[str, Any]] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        tags = {"model": type(pl_module).__name__, **self.tags}
        if self.last_step >= 0:
            tags["resumed_at_step"] = str(self.last_step)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._start_reporter(pl_module, optimizer, tags, rank=trainer.global_rank, source="lightning")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.reporter is not None and self.reporter.enabled and trainer.global_step % self.every == 0:
            self.reporter.capture_grad_norm()  # Lightning clips right after this hook

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._flush()
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        reporter = self.reporter
        if reporter is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if loss is not None:
            if pl_module.automatic_optimization and hasattr(loss, "detach"):
                # Lightning divided the loss by accumulate_grad_batches for backward: the value training_step returned
                loss = loss.detach() * trainer.accumulate_grad_batches
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._micro_batches += 1
        self._samples += _batch_size(batch) or 0
        if trainer.global_step == self._step_at_batch_start:
            return  # accumulating: the optimizer has not stepped yet
        step = trainer.global_step
        metrics: dict[str, Any] = {}
        if self._loss_sum is not None:
            step_loss = self._loss_sum / self._micro_batches if self._micro_batches > 1 else self._loss_sum
            if trainer.world_size > 1 and hasattr(step_loss, "detach"):
                step_loss = trainer.strategy.reduce(step_loss, reduce_op="mean")  # NaN on any rank → NaN here
            metrics["loss"] = step_loss
        if self._samples:
            metrics["batch_size"] = self._samples
        self._loss_sum, self._micro_batches, self._samples = None, 0, 0
        self._pending = (step, metrics)
        self.last_step = step
        should_stop = reporter.should_stop
        if trainer.world_size > 1:
            should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if self.stop_on_request and should_stop:
            trainer.should_stop = True

    def _flush(self, extra: Mapping[str, Any] | None = None) -> None:
        pending, self._pending = self._pending, None
        if self.reporter is None:
            return
        if pending is None:
            if extra:
                self.reporter.log_metrics(self.last_step, extra)
            return
        step, metrics = pending
        self.reporter.log(step, **metrics, **(extra or {}))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.reporter is None or trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith(("val", "eval"))}
        if self._pending is not None and self._pending[0] != trainer.global_step:
            self._flush()
        if self._pending is None and trainer.global_step != self.last_step:
            self.reporter.log_metrics(trainer.global_step, metrics)  # no step event for this step
            return
        self._flush(metrics)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush()
        if self.reporter is not None:
            self.reporter.close(timeout=5.0)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._flush()
        if self.reporter is not None:  # flush what was queued: the last steps before a crash matter most
            self.reporter.close(timeout=5.0)

    # -- resume --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "attempt": self.attempt or 0, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the same run, a new attempt; an id given to the constructor wins over the checkpoint's
        self.run_id = self.run_id or state_dict.get("run_id")
        self.attempt = int(state_dict.get("attempt", 0)) + 1
        self.last_step = int(state_dict.get("last_step", -1))


def _batch_size(batch: Any) -> int | None:
    """Leading dimension of the first tensor in the batch (tensor, tuple/list or dict), if any."""
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, Mapping) and first:
        first = next(iter(first.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else None
