"""The chart history's bucketing gives the points it gave before it was rewritten for speed.

:mod:`tests._history_reference` is ``stream_app.history.History`` as it was (34eb593). Hypothesis drives
both with the same random calls — single steps (``add``, the one-event path, replayed steps included) and
ascending columns (``add_column``, the batch path) with ties, signed zeros, NaN, infinities and values whose
sums overflow, into a small ``max_points`` so that strides double often — and after every call the state
the dashboard and ``lossguard runs`` read (``to_dict``: stride, points, non-finite steps) must be the same,
down to the type and sign of every number. The JSON a save writes (``to_json``, which encodes a series'
settled points once and reuses them) must be ``orjson.dumps(to_dict())`` byte for byte after every call.
"""

from __future__ import annotations

import math

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream_app.history import History
from tests._history_reference import ReferenceHistory

METRICS = ("loss", "grad_norm", "val_loss", "step_time")  # step_time: not charted, ``add`` skips it
value = st.one_of(
    # ties: which step's point is kept (equal values as distinct objects, as decoded records hold them)
    st.builds(float, st.sampled_from(["0.0", "-0.0", "1.0", "2.0", "-1.0", "0.5"])),
    st.just(1),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 1.7e308]),  # non-finite, overflowing sums
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 10),
)


@st.composite
def calls(draw) -> list[tuple]:
    """A run's calls: each starts near the last step (before it: a resumed run's replayed steps)."""
    out: list[tuple] = []
    step = draw(st.integers(0, 5))
    for _ in range(draw(st.integers(1, 40))):
        step = max(0, step + draw(st.integers(-6, 12)))
        if draw(st.booleans()):
            out.append(("add", step, draw(st.dictionaries(st.sampled_from(METRICS), value, min_size=1))))
        else:
            gaps = draw(st.lists(st.integers(1, 9), min_size=0, max_size=30))
            steps = [step]
            for gap in gaps:
                steps.append(steps[-1] + gap)
            values = draw(st.lists(value, min_size=len(steps), max_size=len(steps)))
            as_tuple = draw(st.booleans())  # the batch path hands columns as tuples or lists
            out.append(("column", draw(st.sampled_from(METRICS)), tuple(steps) if as_tuple else steps,
                        tuple(values) if as_tuple else values))
            step = steps[-1]
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_points=st.integers(2, 12), run=calls())
# (after a first column that makes the stride 4) a column whose sum is finite while one bucket's overflows:
# that bucket is taken as non-finite; and a bucket of equal values that are distinct objects
@example(max_points=2, run=[("column", "loss", [0, 1, 2], [1.0, 2.0, 3.0]),
                            ("column", "loss", [4, 8, 9], [-1e308, 1e308, 1e308])]).via("overflow")
@example(max_points=2, run=[("column", "loss", [0, 1, 2], [1.0, 2.0, 3.0]),
                            ("column", "loss", [4, 5], [float("0.5"), float("0.5")])]).via("ties")
def test_the_same_points_as_the_reference_after_every_call(max_points, run):
    new, old = History(max_points=max_points), ReferenceHistory(max_points=max_points)
    for call in run:
        for history in (new, old):
            if call[0] == "add":
                history.add(call[1], call[2])
            else:
                history.add_column(call[1], call[2], call[3])
        assert repr(new.to_dict()) == repr(old.to_dict()), call
        assert new.to_json() == orjson.dumps(new.to_dict()), call


def test_long_steady_runs_match_the_reference_in_batches_of_every_size():
    """Thousands of steps, strides far past the hypothesis runs': a decaying noisy loss, a constant LR."""
    for batch in (1, 7, 100, 1000):
        new, old = History(), ReferenceHistory()
        for start in range(0, 20_000, batch):
            steps = list(range(start, start + batch))
            loss = [2.0 * math.exp(-s / 5000) + 0.01 * ((s * 7919) % 97) / 97 for s in steps]
            for history in (new, old):
                history.add_column("loss", steps, loss)
                history.add_column("lr", steps, [1e-3] * batch)
            if start % 700 < batch:  # a save now and then: the cached settled points across coarsenings
                assert new.to_json() == orjson.dumps(new.to_dict()), start
        assert new.to_json() == orjson.dumps(new.to_dict())
        assert new.stride > 64 and repr(new.to_dict()) == repr(old.to_dict()), batch
