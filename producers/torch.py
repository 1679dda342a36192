"""The one-liner for plain PyTorch: ``reporter = producers.watch(run_id, model=model, optimizer=opt)``.

Then ``reporter.log(step, loss=loss)`` once per step. The reporter adds, with no more user code:

* ``grad_norm`` — total L2 norm of the gradients, in one fused ``torch._foreach_norm`` pass (no
  per-parameter Python loop) from an optimizer step pre-hook, so it works wherever ``log()`` sits in
  the loop. That hook runs after any clipping, so a loop that clips should let the reporter clip —
  ``reporter.clip_grad_norm_(max_norm)`` clips like ``torch.nn.utils.clip_grad_norm_`` and reports the
  norm *before* clipping — or pass ``grad_norm=torch.nn.utils.clip_grad_norm_(...)`` to ``log()``.
* ``lr`` (first param group; ``lr/group{i}`` for the others), ``batch_size`` when given, ``step_time``
  (seconds per step between two logs), ``rss`` (process memory) and, on CUDA, ``mem_allocated`` /
  ``mem_reserved``.
* with ``rewards=`` / ``predictions=`` (RLHF, reward models): summaries instead of the arrays —
  ``reward_mean``, ``reward_std``, ``reward_min/max``, ``reward_p05 … reward_p95``; the same for
  ``prediction_*``, plus ``calibration_bin0..9`` (share of predictions per tenth of [0, 1]) and, with
  ``labels=``, ``ece`` (expected calibration error) and ``brier``.

Tensors (loss, grad norm, reward arrays) are handed over as tensors and read on the background sender
thread, so on CUDA ``log()`` adds no host sync. Nothing here raises into the training loop — except
:class:`TrainingStopped`, and only when asked for with ``raise_on_stop=True``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping
from itertools import chain
from operator import itemgetter
from typing import Any

from detectors.aliases import canonical_metrics
from detectors.events import ControlEvent

from .control import ControlListener
from .emitter import Emitter, topic_name
from .sender_child import encode_steps, pack_steps

__all__ = ["Reporter", "TrainingStopped", "watch"]

log = logging.getLogger("lossguard.producer")

try:  # torch is optional for producers
    import torch
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None

_AT_FORK = hasattr(os, "register_at_fork")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class TrainingStopped(RuntimeError):
    """Raised by ``Reporter.log()`` after a stop request when the reporter has ``raise_on_stop=True``."""

    def __init__(self, run_id: str, reason: str):
        super().__init__(f"run {run_id} was asked to stop: {reason or 'no reason given'}")
        self.run_id = run_id
        self.reason = reason


_rss_cache = [0.0, None]  # [read at (monotonic s), bytes]


def _rss_bytes() -> float | None:
    """Process RSS, read from /proc at most twice a second (the read costs more than the rest of an event)."""
    now = time.monotonic()
    if now - _rss_cache[0] < 0.5:
        return _rss_cache[1]
    try:
        with open("/proc/self/statm", "rb") as f:
            rss = float(int(f.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        rss = None
    _rss_cache[:] = [now, rss]
    return rss


class _Summary:
    """An array reported as its summary statistics, computed on the sender thread."""

    __slots__ = ("prefix", "values", "labels")

    def __init__(self, prefix: str, values: Any, labels: Any = None):
        self.prefix = prefix
        self.values = _snapshot(values)
        self.labels = None if labels is None else _snapshot(labels)

    def metrics(self) -> dict[str, float]:
        from detectors.summaries import distribution, prediction_metrics

        x = _as_numpy(self.values)
        if self.prefix == "prediction":
            return prediction_metrics(x, None if self.labels is None else _as_numpy(self.labels))
        return distribution(self.prefix, x)


def _snapshot(values: Any) -> Any:
    """A copy the training loop can no longer change (tensors: an async device-side clone)."""
    if torch is not None and isinstance(values, torch.Tensor):
        return values.detach().clone()
    import numpy as np

    return np.array(values, dtype=float, copy=True)


def _as_numpy(values: Any):
    if torch is not None and isinstance(values, torch.Tensor):
        return values.detach().double().cpu().numpy()
    return values


class _NormParts(tuple):
    """Per-parameter-group gradient norms (tensors) whose total the sender thread computes."""

    def total(self) -> float:
        device = self[0].device
        if device.type == "cpu" and len(self) <= 64:
            return math.hypot(*[n.item() for n in self])  # a few scalar reads beat two more tensor ops
        parts = self if all(n.device == device for n in self) else [n.to(device) for n in self]
        return torch.linalg.vector_norm(torch.stack(parts), 2.0).item()  # one host sync, on this thread


def _to_float(value: Any) -> float:
    if isinstance(value, _NormParts):
        value = value.total()
    if torch is not None and isinstance(value, torch.Tensor):
        return float(value.item())  # runs on the sender thread: the host sync (if any) happens here
    return float(value)


_Item = tuple[str, int, float, str, dict[str, Any], dict[str, str]]  # run_id, step, ts, source, metrics, tags
_STEP, _METRICS = itemgetter(1), itemgetter(4)
_INT = frozenset((int,))
_PLAIN = frozenset((float, int, str))  # what the sender process makes floats of (or leaves out)
_Tensor = torch.Tensor if torch is not None else None


def _step_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Runs on the sender thread for steps that hold tensors or summaries: reads the deferred tensors and
    expands the summaries. Plain numbers are left to the sender process."""
    values: dict[str, Any] = {}
    for name, value in metrics.items():
        kind = type(value)
        try:
            if kind is float or kind is int:
                values[name] = value
            elif kind is _Tensor:
                values[name] = float(value.item())
            elif kind is _Summary:
                values.update(value.metrics())
            else:
                values[name] = _to_float(value)
        except (TypeError, ValueError, RuntimeError):
            continue  # a value that is not a number is skipped, not fatal
    return values


def _pack_batch(items: list[_Item]) -> bytes:
    """Several steps of one run, packed for the sender subprocess, which encodes them as one record
    (``sender_child.encode_steps``). Steps of plain numbers (every CPU run's) are packed as they are, at C
    speed: this runs on the sender thread, which holds the GIL the training thread wants meanwhile."""
    rss = _rss_bytes()
    # the types of every step number and value, found at C speed (marshal would write a numpy scalar, which
    # has the buffer protocol, as bytes)
    if (set(map(type, map(_STEP, items))) <= _INT
            and set(map(type, chain.from_iterable(map(dict.values, map(_METRICS, items))))) <= _PLAIN):
        return pack_steps(items, rss)
    # tensors (CUDA values read lazily), summaries, numpy scalars: read them here first
    return pack_steps([(run_id, int(step), ts, source, _step_metrics(metrics), tags)
                       for run_id, step, ts, source, metrics, tags in items], rss)


def _encode_batch(items: list[_Item]) -> bytes:
    """The same record, encoded in this process (transport ``"thread"``)."""
    return encode_steps(_pack_batch(items))


def _urgent(values: dict[str, Any]) -> bool:
    """A non-finite loss or grad norm among the values already read (plain floats: a CPU run's): the step
    is sent at once rather than at the next send interval. A tensor is not read here (on CUDA that is a
    host sync on the training thread); the sender thread reads it at its next round."""
    loss, norm = values.get("loss"), values.get("grad_norm")
    return ((type(loss) is float and not math.isfinite(loss))
            or (type(norm) is float and not math.isfinite(norm)))


def _default_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _default_attempt() -> int | None:
    # torchrun counts its own restarts; LOSSGUARD_ATTEMPT lets any launcher say which attempt this is.
    for var in ("LOSSGUARD_ATTEMPT", "TORCHELASTIC_RESTART_COUNT"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


class Reporter:
    """Reports one run's steps and hears its stop requests. Build it with :func:`watch`.

    ``should_stop`` turns true when a stop request for this run arrives on the control topic (from the
    stream app's auto-stop sink or ``lossguard stop RUN``); ``stop_reason`` says why.
    """

    def __init__(self, run_id: str, *, model: Any = None, optimizer: Any = None, every: int = 1,
                 emitter: Emitter | None = None, tags: Mapping[str, str] | None = None, source: str = "torch",
                 grad_norm_hook: bool = True, raise_on_stop: bool = False):
        self.run_id = run_id
        self.every = max(1, int(every))
        self.tags = dict(tags or {})
        self.source = source
        self.emitter = emitter
        self.raise_on_stop = raise_on_stop
        self.should_stop = False
        self.stop_reason = ""
        self.control: ControlListener | None = None
        self._key = run_id.encode()
        self._pid = os.getpid()
        self._stop_raised = False
        self._optimizer = optimizer
        self._params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        self._cuda = torch is not None and bool(self._params) and self._params[0].is_cuda
        self._cpu = torch is not None and bool(self._params) and all(p.is_cpu for p in self._params)
        self._grad_norm: Any = None
        self._hook = None
        self._hook_calls = 0
        self._last_time: float | None = None
        self._last_step: int | None = None
        if (grad_norm_hook and optimizer is not None and self._params
                and hasattr(optimizer, "register_step_pre_hook")):
            self._hook = optimizer.register_step_pre_hook(self._on_optimizer_step)

    @property
    def enabled(self) -> bool:
        """Whether this process sends (false on ranks that do not report and in forked children)."""
        return self.emitter is not None and os.getpid() == self._pid

    # -- grad norm ----------------------------------------------------------------------------------------
    def _on_optimizer_step(self, *_args: Any) -> None:
        calls, self._hook_calls = self._hook_calls, self._hook_calls + 1
        # skip the norm on steps that will not be reported, and keep a pre-clip norm from clip_grad_norm_
        if calls % self.every == 0 and self._grad_norm is None and self.enabled:
            self.capture_grad_norm()

    def capture_grad_norm(self) -> None:
        """Take the total gradient norm now, for the next ``log()``; integrations call it before clipping."""
        try:
            self._grad_norm = self._grad_norm_now()
        except Exception:  # noqa: BLE001 — reporting never breaks training
            self._grad_norm = None

    def _grad_norm_now(self) -> Any:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return None
        # one fused kernel per device/dtype group, and nothing more on the training thread
        norms = torch._foreach_norm(grads, 2.0)
        if not self._cpu or len(norms) > 64:
            # the norms are new tensors (later steps cannot change them): the sender thread adds them up,
            # so there is no host sync here
            return _NormParts(norms)
        # on CPU the values are ready: reading them now (~0.1 µs each) frees the tensors on the thread that
        # made them and leaves the sender thread less to do while it holds the GIL
        return math.hypot(*[n.item() for n in norms])

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, **kwargs: Any) -> Any:
        """Clip the watched parameters' gradients like ``torch.nn.utils.clip_grad_norm_`` and report
        the total norm from *before* clipping at the next ``log()``. Returns that norm (a tensor)."""
        total = torch.nn.utils.clip_grad_norm_(self._params, max_norm, norm_type, **kwargs)
        self._grad_norm = total.detach()
        return total

    # -- reporting ----------------------------------------------------------------------------------------
    def log(self, step: int, loss: Any = None, *, batch_size: int | None = None, rewards: Any = None,
            predictions: Any = None, labels: Any = None, **metrics: Any) -> None:
        """Report one step. Values may be numbers or tensors; names may be any framework's.

        Args:
            step: the global step (optimizer updates so far).
            loss: the step's loss; a tensor is read later on the sender thread.
            batch_size: samples in the step, when known.
            rewards: per-sample rewards (RLHF); summarized as ``reward_*``, never sent whole.
            predictions: per-sample predicted probabilities; summarized as ``prediction_*`` and
                ``calibration_bin*``; with ``labels`` (0/1) also ``ece`` and ``brier``.
            **metrics: anything else (``val_loss=...``, ``kl=...``, HF/TRL names are mapped).

        Raises:
            TrainingStopped: only with ``raise_on_stop=True``, once, at the first call after a stop request.
        """
        if self.should_stop and self.raise_on_stop and not self._stop_raised and os.getpid() == self._pid:
            self._stop_raised = True
            raise TrainingStopped(self.run_id, self.stop_reason)
        emitter = self.emitter
        # after a fork the emitter is marked inert (os.register_at_fork): no getpid() syscall per step
        if emitter is None or step % self.every or (emitter._forked if _AT_FORK else os.getpid() != self._pid):
            return
        try:
            self._log(step, loss, batch_size, rewards, predictions, labels, metrics)
        except Exception:  # noqa: BLE001 — reporting never breaks training
            log.debug("lossguard: log() failed", exc_info=True)

    def _log(self, step: int, loss: Any, batch_size: int | None, rewards: Any, predictions: Any, labels: Any,
             metrics: dict[str, Any]) -> None:
        # The training thread's share of a step: collect references and plain numbers, nothing more. Tensors
        # are read, names and non-finite values encoded later, on the sender thread and in the sender process.
        now = time.perf_counter()
        values: dict[str, Any] = canonical_metrics(metrics) if metrics else {}
        if loss is not None:
            if type(loss) is _Tensor and loss.is_cpu and loss.numel() == 1:
                loss = loss.item()  # no device to wait for: cheaper than keeping a detached tensor
            values["loss"] = loss.detach() if hasattr(loss, "detach") else loss
        grad_norm, self._grad_norm = self._grad_norm, None
        if "grad_norm" not in values:
            if grad_norm is None and self._params and self._hook is None:
                grad_norm = self._grad_norm_now()  # without a hook the grads of this step are read here
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
        if self._optimizer is not None:
            groups = self._optimizer.param_groups
            if "lr" not in values:
                values["lr"] = groups[0]["lr"]
            for i in range(1, len(groups)):
                values.setdefault(f"lr/group{i}", groups[i]["lr"])
        if batch_size is not None:
            values["batch_size"] = batch_size
        last_step = self._last_step
        if last_step is not None and step > last_step and "step_time" not in values:
            values["step_time"] = (now - self._last_time) / (step - last_step)
        self._last_time, self._last_step = now, step
        if self._cuda:  # allocator counters: no sync, a few hundred ns
            values["mem_allocated"] = torch.cuda.memory_allocated()
            values["mem_reserved"] = torch.cuda.memory_reserved()
        if rewards is not None:
            values["__rewards"] = _Summary("reward", rewards)
        if predictions is not None:
            values["__predictions"] = _Summary("prediction", predictions, labels)
        self.emitter.emit(self._key, (self.run_id, step, time.time(), self.source, values, self.tags),
                          _urgent(values))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Report only ``metrics`` at ``step`` (no grad norm, lr, timing): validation results, framework logs."""
        if not self.enabled or not metrics:
            return
        try:
            values = canonical_metrics({k: v.detach() if hasattr(v, "detach") else v for k, v in metrics.items()})
            self.emitter.emit(self._key, (self.run_id, step, time.time(), self.source, values, self.tags),
                              _urgent(values))
        except Exception:  # noqa: BLE001 — reporting never breaks training
            log.debug("lossguard: log_metrics() failed", exc_info=True)

    # -- control --------------------------------------------------------------------------------------------
    def listen(self, *, bootstrap: str | None = None, topic: str | None = None) -> None:
        """Start hearing stop requests for this run on the control topic: in the sender subprocess when this
        process sends through one, else on a background thread."""
        if self.control is None:
            self.control = ControlListener(self.run_id, self._on_control, bootstrap=bootstrap, topic=topic,
                                           emitter=self.emitter if self.enabled else None)

    def _on_control(self, event: ControlEvent) -> None:
        if event.action == "stop":
            self.stop_reason = event.reason or f"stop requested (alert {event.alert_id or 'none'})"
            self.should_stop = True
            log.warning("lossguard: run %s was asked to stop: %s", self.run_id, self.stop_reason)
        elif event.action == "resume":
            self.should_stop = False
            self.stop_reason = ""
            self._stop_raised = False

    # -- lifecycle ------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return self.emitter.stats.as_dict() if self.emitter else {}

    @property
    def dropped(self) -> int:
        return self.emitter.stats.dropped if self.emitter else 0

    def flush(self, timeout: float = 5.0) -> bool:
        return self.emitter.flush(timeout) if self.enabled else True

    def close(self, timeout: float = 5.0) -> None:
        """Remove the hook, stop listening, and flush queued events for at most ``timeout`` seconds."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.control is not None:
            self.control.close(timeout=min(timeout, 2.0))
            self.control = None
        if self.enabled:
            if self._last_step is not None and not self.emitter.inert:
                # the run's last word: tells the stalled-run detector this run ended on purpose
                self.emitter.emit(self._key, (self.run_id, self._last_step, time.time(), self.source, {},
                                                {**self.tags, "status": "finished"}))
            self.emitter.close(timeout)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def watch(run_id: str | None = None, model: Any = None, optimizer: Any = None, *, every: int = 1,
          bootstrap: str | None = None, topic: str | None = None, tags: Mapping[str, str] | None = None,
          attempt: int | None = None, rank: int | None = None, report_rank: int | None = 0,
          listen: bool = True, raise_on_stop: bool = False, max_queue: int = 10_000, source: str = "torch",
          grad_norm_hook: bool = True, transport: str = "process",
          send_interval: float | None = None) -> Reporter:
    """Start reporting a training run; returns a :class:`Reporter`.

    Args:
        run_id: the run's id (the Kafka key); default ``LOSSGUARD_RUN_ID`` or a fresh one. A resumed run
            keeps its id.
        model: its trainable parameters are watched for the gradient norm (default ``None``: no norm).
        optimizer: its param groups give ``lr``; its step pre-hook takes the norm (default ``None``).
        every: report one step in ``every`` (default 1).
        bootstrap: Kafka address (default ``LOSSGUARD_BOOTSTRAP`` or 127.0.0.1:9092).
        topic: metrics topic (default ``<LOSSGUARD_TOPIC_PREFIX>.metrics``); the control topic is its
            sibling ``<prefix>.control``.
        tags: free-form labels (model, dataset ...); ``host``, ``rank`` and ``attempt`` are added.
        attempt: which attempt of the run this is (default ``LOSSGUARD_ATTEMPT`` or
            ``TORCHELASTIC_RESTART_COUNT``; untagged when neither is set).
        rank: this process's distributed rank (default from ``RANK``/``SLURM_PROCID``/``LOCAL_RANK`` or
            ``torch.distributed``).
        report_rank: only this rank sends (default 0); ``None``: every rank sends, tagged with its rank.
        listen: hear stop requests on the control topic (default ``True``; every rank listens, so all
            ranks can stop together).
        raise_on_stop: raise :class:`TrainingStopped` from the next ``log()`` after a stop request
            (default ``False``: only ``reporter.should_stop`` turns true).
        max_queue: events held while the broker is slow or away before the oldest are dropped (10,000).
        source: the event's ``source`` field (default ``"torch"``).
        grad_norm_hook: take the grad norm in an optimizer step pre-hook (default ``True``); integrations
            that see gradients before clipping turn it off and call ``capture_grad_norm()`` themselves.
        transport: ``"process"`` (default) sends from a sender subprocess, which also encodes the events
            and hears stop requests, so neither kafka-python's Python network code nor JSON encoding
            competes with training for the GIL; ``"thread"`` sends and listens in-process.
        send_interval: seconds between two sends of the queued steps (default ``LOSSGUARD_SEND_INTERVAL``
            or 0.1): longer means fewer requests and less CPU taken from training, shorter means alerts
            sooner (an alert can come no sooner than its step is sent).
    """
    if send_interval is None:
        send_interval = float(os.environ.get("LOSSGUARD_SEND_INTERVAL", "0.1"))
    run_id = run_id or os.environ.get("LOSSGUARD_RUN_ID") or f"run-{uuid.uuid4().hex[:8]}"
    rank = _default_rank() if rank is None else rank
    attempt = _default_attempt() if attempt is None else attempt
    all_tags = {"host": socket.gethostname(), "rank": str(rank), **{k: str(v) for k, v in (tags or {}).items()}}
    if attempt is not None:
        all_tags["attempt"] = str(attempt)
    metrics_topic = topic or topic_name("metrics")
    emitter = None
    if report_rank is None or rank == report_rank:
        # A produce request costs kafka-python ~1 ms of CPU: fewer, gzip-shrunk requests (one round per
        # send_interval) keep that off the cores the training job uses.
        emitter = Emitter(metrics_topic, bootstrap=bootstrap, max_queue=max_queue, encode_batch=_encode_batch,
                          pack_batch=_pack_batch, transport=transport, linger=send_interval,
                          producer_config={"compression_type": "gzip"})
    reporter = Reporter(run_id, model=model, optimizer=optimizer, every=every, emitter=emitter, tags=all_tags,
                        source=source, grad_norm_hook=grad_norm_hook, raise_on_stop=raise_on_stop)
    if listen:
        prefix = metrics_topic.rsplit(".", 1)[0] if "." in metrics_topic else None
        reporter.listen(bootstrap=bootstrap, topic=topic_name("control", prefix))
    return reporter
