"""Wall-clock triggers: validate every N seconds instead of every N steps.

Step intervals make validation frequency depend on step speed, which changes with batch size, sequence
length and hardware; a time interval keeps the val curve dense enough for the detectors whatever the
speed. The resulting val metrics are reported like any other (``reporter.log(step, val_loss=...)``).

>>> clock = iter([0.0, 10.0, 29.0, 31.0, 45.0, 62.0]).__next__
>>> due = Every(30, clock=clock)
>>> [due() for _ in range(5)]
[False, False, True, False, True]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["Every", "every"]


class Every:
    """``due()`` is true once each time ``seconds`` of wall-clock time have passed since the last true.

    Args:
        seconds: the interval (> 0).
        first: whether the very first call is already due (default ``False``: wait one interval).
        clock: monotonic time source in seconds (default :func:`time.monotonic`).
    """

    def __init__(self, seconds: float, *, first: bool = False, clock: Callable[[], float] = time.monotonic):
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self._clock = clock
        self._last = None if first else clock()

    def __call__(self) -> bool:
        now = self._clock()
        if self._last is None or now - self._last >= self.seconds:
            self._last = now
            return True
        return False

    def reset(self) -> None:
        """Start a new interval now (e.g. after an evaluation that was triggered some other way)."""
        self._last = self._clock()

    def state_dict(self) -> dict[str, Any]:
        """Seconds already elapsed in the current interval, so a resumed run keeps its rhythm."""
        return {"seconds": self.seconds,
                "elapsed": None if self._last is None else self._clock() - self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds = float(state["seconds"])
        elapsed = state.get("elapsed")
        self._last = None if elapsed is None else self._clock() - float(elapsed)


def every(seconds: float, *, first: bool = False) -> Every:
    """A trigger that is due once per ``seconds`` of wall-clock time: ``if val_due(): validate()``."""
    return Every(seconds, first=first)
