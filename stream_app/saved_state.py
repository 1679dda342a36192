"""The ``run_summary`` table's values and their codec: the same JSON as Faust's ``json`` codec, encoded cheaper.

A run's value (its summary with the detectors' state under ``"suite"``, ~14 KB of JSON) goes to the
changelog at every save, a few records apart for a run that sends single events. Most of it is the chart
history, whose points barely change between two saves. The worker saves a :class:`SavedState` — the dict
every reader sees, holding the run's :class:`~stream_app.history.History` as well — and :class:`StateCodec`
takes the history's JSON from :meth:`History.to_json`, which encodes only the points that moved since the
last save. Any other value is encoded as Faust's ``json`` codec does. The bytes are JSON of the same
value, so ``lossguard runs``, the dashboard and a worker of either version read what the other wrote
(loading is plain JSON).

>>> from stream_app.aggregates import RunSummary
>>> summary = RunSummary("r")
>>> summary.history.add(1, {"loss": 2.5})
>>> value = SavedState(summary.to_dict(), summary.history)
>>> STATE_CODEC.loads(STATE_CODEC.dumps(value)) == STATE_CODEC.loads(STATE_CODEC.dumps(dict(value)))
True
"""

from __future__ import annotations

from typing import Any

import orjson
from faust.serializers import codecs
from faust.utils import json as faust_json

from .history import History

__all__ = ["HISTORY_KEY", "STATE_CODEC", "SavedState", "StateCodec"]

#: the key of the chart history in a run's value (``RunSummary.to_dict``)
HISTORY_KEY = "history"
#: what Faust's ``json`` codec passes to orjson (faust.utils.json.dumps)
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z


class SavedState(dict):
    """A run's ``run_summary`` value as the worker saves it: the plain dict, and the history it holds under
    ``"history"`` as the live :class:`History` (whose cache makes the encoding cheap). Encode it at once
    (the table does, when it is set): the history keeps changing after. The first encoding lets go of the
    History; a later one encodes the dict as it is."""

    __slots__ = ("history",)

    def __init__(self, value: dict[str, Any], history: History):
        super().__init__(value)
        self.history = history


class StateCodec(codecs.Codec):
    """Faust codec of ``run_summary`` values: JSON, the history of a :class:`SavedState` from its cache."""

    def __init__(self) -> None:
        super().__init__()
        #: the last SavedState encoded, and its bytes: a table set encodes a value twice (the changelog
        #: message, then a RocksDB store)
        self._last: tuple[Any, bytes] = (None, b"")

    def _dumps(self, value: Any) -> bytes:
        if type(value) is SavedState and value.history is not None and HISTORY_KEY in value:
            rest = {key: item for key, item in value.items() if key != HISTORY_KEY}
            head = orjson.dumps(rest, default=faust_json.on_default, option=_OPTIONS)
            history = value.history.to_json()
            encoded = (head[:-1] + b',"history":' if len(head) > 2 else b'{"history":') + history + b"}"
            # the table keeps the value: not the live History with it, whose cache would stay in memory for
            # every run the worker has let go of (measured: +6 KB a run, 10,000 runs)
            value.history = None
            self._last = (value, encoded)
            return encoded
        if value is self._last[0]:
            return self._last[1]
        return orjson.dumps(value, default=faust_json.on_default, option=_OPTIONS)

    def _loads(self, data: bytes) -> Any:
        return orjson.loads(data)


STATE_CODEC = StateCodec()
