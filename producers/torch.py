"""The one-liner for plain PyTorch: ``reporter = producers.watch(run_id, model=model, optimizer=opt)``.

Then ``reporter.log(step, loss=loss)`` once per step. The reporter adds, with no more user code:

* ``grad_norm`` — total L2 norm of the gradients, computed in one fused ``torch._foreach_norm`` pass
  from an optimizer step pre-hook (so it works wherever ``log()`` sits in the loop). With gradient
  clipping, pass the value ``clip_grad_norm_`` returns as ``grad_norm=`` to report the pre-clip norm.
* ``lr`` (first param group; ``lr/group{i}`` for the others), ``batch_size`` when given, ``step_time``
  (seconds per step between two logs), ``rss`` (process memory) and, on CUDA, ``mem_allocated`` /
  ``mem_reserved``.

Tensors (the loss, the grad norm) are handed over as tensors and read on the background sender thread,
so on CUDA ``log()`` adds no host sync. Nothing here raises into the training loop.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

from detectors.aliases import canonical_metrics
from detectors.events import MetricEvent

from .emitter import Emitter, topic_name

__all__ = ["Reporter", "watch"]

log = logging.getLogger("lossguard.producer")

try:  # torch is optional for producers
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> float | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return float(int(f.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        return None


def _to_float(value: Any) -> float:
    if torch is not None and isinstance(value, torch.Tensor):
        return float(value.detach().float().item())  # runs on the sender thread
    return float(value)


def _encode(item: tuple[str, int, float, str, dict[str, Any], dict[str, str]]) -> bytes:
    run_id, step, ts, source, metrics, tags = item
    values = {}
    for name, value in metrics.items():
        try:
            values[name] = _to_float(value)
        except (TypeError, ValueError):
            continue  # a value that is not a number is skipped, not fatal
    rss = _rss_bytes()
    if rss is not None:
        values.setdefault("rss", rss)
    return MetricEvent(run_id=run_id, step=step, metrics=values, ts=ts, source=source, tags=tags).to_json()


def _default_rank() -> int:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class Reporter:
    """Reports one run's steps. Build it with :func:`watch`."""

    def __init__(self, run_id: str, *, model: Any = None, optimizer: Any = None, every: int = 1,
                 emitter: Emitter | None = None, tags: Mapping[str, str] | None = None, source: str = "torch"):
        self.run_id = run_id
        self.every = max(1, int(every))
        self.tags = dict(tags or {})
        self.source = source
        self.emitter = emitter
        self.should_stop = False
        self.stop_reason = ""
        self._optimizer = optimizer
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self._grad_norm: Any = None
        self._hook = None
        self._last_time: float | None = None
        self._last_step: int | None = None
        if optimizer is not None and self._params and hasattr(optimizer, "register_step_pre_hook"):
            self._hook = optimizer.register_step_pre_hook(self._capture_grad_norm)

    @property
    def enabled(self) -> bool:
        return self.emitter is not None

    def _capture_grad_norm(self, *_args: Any) -> None:
        try:
            self._grad_norm = self._grad_norm_now()
        except Exception:  # noqa: BLE001
            self._grad_norm = None

    def _grad_norm_now(self) -> Any:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm(grads, 2.0)
        return torch.linalg.vector_norm(torch.stack(norms), 2.0)

    def log(self, step: int, loss: Any = None, *, batch_size: int | None = None, **metrics: Any) -> None:
        """Report one step. Values may be numbers or tensors; names may be any framework's."""
        if self.emitter is None:
            return
        try:
            self._log(step, loss, batch_size, metrics)
        except Exception:  # noqa: BLE001 — reporting never breaks training
            log.debug("lossguard: log() failed", exc_info=True)

    def _log(self, step: int, loss: Any, batch_size: int | None, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        if step % self.every:
            return
        values: dict[str, Any] = canonical_metrics(metrics) if metrics else {}
        if loss is not None:
            values["loss"] = loss.detach() if hasattr(loss, "detach") else loss
        if "grad_norm" not in values:
            grad_norm = self._grad_norm if self._grad_norm is not None else (
                self._grad_norm_now() if self._params and self._hook is None else None)
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
        self._grad_norm = None
        if self._optimizer is not None:
            for i, group in enumerate(self._optimizer.param_groups):
                values["lr" if i == 0 else f"lr/group{i}"] = group["lr"]
        if batch_size is not None:
            values["batch_size"] = batch_size
        if self._last_time is not None and self._last_step is not None and step > self._last_step:
            values.setdefault("step_time", (now - self._last_time) / (step - self._last_step))
        self._last_time, self._last_step = now, step
        if torch is not None and self._params and self._params[0].is_cuda:
            values["mem_allocated"] = torch.cuda.memory_allocated()
            values["mem_reserved"] = torch.cuda.memory_reserved()
        self.emitter.emit(self.run_id, (self.run_id, step, time.time(), self.source, values, self.tags))

    @property
    def dropped(self) -> int:
        return self.emitter.stats.dropped if self.emitter else 0

    def flush(self, timeout: float = 5.0) -> bool:
        return self.emitter.flush(timeout) if self.emitter else True

    def close(self, timeout: float = 5.0) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.emitter is not None:
            self.emitter.close(timeout)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def watch(run_id: str | None = None, model: Any = None, optimizer: Any = None, *, every: int = 1,
          bootstrap: str | None = None, topic: str | None = None, tags: Mapping[str, str] | None = None,
          attempt: int | None = None, rank: int | None = None, report_rank: int | None = 0,
          max_queue: int = 10_000, source: str = "torch") -> Reporter:
    """Start reporting a training run; returns a :class:`Reporter`.

    Args:
        run_id: the run's id (the Kafka key); default ``LOSSGUARD_RUN_ID`` or a fresh one.
        model / optimizer: watched for grad norm and learning rates.
        every: report one step in ``every``.
        bootstrap / topic: Kafka address and metrics topic (default ``LOSSGUARD_BOOTSTRAP``,
            ``<LOSSGUARD_TOPIC_PREFIX>.metrics``).
        tags: free-form labels (model, dataset ...); host, rank and attempt are added.
        attempt: a resumed run keeps its run id and gets a new attempt number.
        report_rank: only this distributed rank reports (``None``: every rank reports, tagged).
    """
    run_id = run_id or os.environ.get("LOSSGUARD_RUN_ID") or f"run-{uuid.uuid4().hex[:8]}"
    rank = _default_rank() if rank is None else rank
    all_tags = {"host": socket.gethostname(), "rank": str(rank), **{k: str(v) for k, v in (tags or {}).items()}}
    if attempt is not None:
        all_tags["attempt"] = str(attempt)
    emitter = None
    if report_rank is None or rank == report_rank:
        emitter = Emitter(topic or topic_name("metrics"), bootstrap=bootstrap, max_queue=max_queue,
                          encode=_encode)
    return Reporter(run_id, model=model, optimizer=optimizer, every=every, emitter=emitter, tags=all_tags,
                    source=source)
