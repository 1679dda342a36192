"""Producers: lightweight, non-blocking metric reporters that run inside training jobs.

``reporter = producers.watch(run_id="exp-1", model=model, optimizer=optimizer)`` then
``reporter.log(step, loss=loss)``; ``reporter.should_stop`` turns true when the run is asked to stop.
Hugging Face: :class:`producers.hf.LossguardCallback`; Lightning: :class:`producers.lightning.LossguardCallback`.
Needs kafka-python and ``detectors`` (for the shared event types); torch is optional and Faust is never
imported here.
"""

from .control import ControlListener
from .emitter import Emitter, default_bootstrap, topic_name
from .timing import Every, every
from .torch import Reporter, TrainingStopped, watch

__all__ = ["ControlListener", "Emitter", "Every", "Reporter", "TrainingStopped", "watch", "every",
           "default_bootstrap", "topic_name"]
