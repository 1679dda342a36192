"""Producers: lightweight, non-blocking metric reporters that run inside training jobs.

``reporter = producers.watch(run_id="exp-1", model=model, optimizer=optimizer)`` then
``reporter.log(step, loss=loss)``. Needs kafka-python and ``detectors`` (for the shared event types);
torch is optional and Faust is never imported here.
"""

from .emitter import Emitter, default_bootstrap, topic_name
from .torch import Reporter, watch

__all__ = ["Emitter", "Reporter", "watch", "default_bootstrap", "topic_name"]
