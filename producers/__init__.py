"""Producers: lightweight, non-blocking metric reporters that run inside training jobs.

``reporter = producers.watch(run_id="exp-1", model=model, optimizer=optimizer)`` then
``reporter.log(step, loss=loss)``; ``reporter.should_stop`` turns true when the run is asked to stop.
Hugging Face: :class:`producers.hf.LossguardCallback`; Lightning: :class:`producers.lightning.LossguardCallback`.
Needs kafka-python and ``detectors`` (for the shared event types); torch is optional and Faust is never
imported here.
"""

from typing import Any

from .control import ControlListener
from .emitter import Emitter, default_bootstrap, topic_name
from .timing import Every, every

__all__ = ["ControlListener", "Emitter", "Every", "Reporter", "TrainingStopped", "watch", "every",
           "default_bootstrap", "topic_name"]

#: names from ``producers.torch``, imported on first use: that module imports torch (1.5 s, ~200k objects),
#: and the stream worker, which only needs ``producers.kafka_security``, must not pay for it
_FROM_TORCH = ("Reporter", "TrainingStopped", "watch")


def __getattr__(name: str) -> Any:
    if name in _FROM_TORCH:
        from . import torch as _torch

        return getattr(_torch, name)
    raise AttributeError(f"module 'producers' has no attribute {name!r}")
