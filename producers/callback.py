"""What the framework callbacks (Hugging Face, Lightning) share: their settings and how they start reporting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .torch import Reporter, _default_attempt, watch

__all__ = ["CallbackReporting"]


class CallbackReporting:
    """Mixin holding a callback's reporting settings and its :class:`~producers.torch.Reporter`.

    The framework callback, not this mixin, reads the gradient norm (before the framework clips), so the
    reporter is started without its own optimizer hook.
    """

    def __init__(self, run_id: str | None = None, *, bootstrap: str | None = None, topic: str | None = None,
                 tags: Mapping[str, str] | None = None, every: int = 1, report_rank: int | None = 0,
                 stop_on_request: bool = True, attempt: int | None = None):
        self.run_id = run_id
        self.bootstrap = bootstrap
        self.topic = topic
        self.tags = dict(tags or {})
        self.every = every
        self.report_rank = report_rank
        self.stop_on_request = stop_on_request
        self.attempt = attempt
        self.reporter: Reporter | None = None

    def _start_reporter(self, model: Any, optimizer: Any, tags: Mapping[str, str], rank: int,
                        source: str) -> Reporter:
        if self.attempt is None:
            self.attempt = _default_attempt() or 0
        self.reporter = watch(self.run_id, model=model, optimizer=optimizer, every=self.every,
                              bootstrap=self.bootstrap, topic=self.topic, tags=tags, attempt=self.attempt,
                              rank=rank, report_rank=self.report_rank, source=source, grad_norm_hook=False)
        self.run_id = self.reporter.run_id
        return self.reporter
