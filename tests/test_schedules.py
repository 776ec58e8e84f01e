"""fastgrad.schedules step by step, against optax where installed."""
import json
import math

import numpy as np
import pytest

from fastgrad import schedules as S

CASES = [
    S.constant(0.1),
    S.exponential_decay(0.1, 0.5, 10),
    S.exponential_decay(0.1, 0.5, 10, staircase=True),
    S.step_decay(0.1, 7, gamma=0.5),
    S.cosine_decay(0.1, 20, alpha=0.1),
    S.linear_warmup(0.0, 0.1, 5),
    S.join([S.linear_warmup(0.0, 0.1, 5), S.exponential_decay(0.1, 0.9, 3)], [5]),
    S.warmup_cosine_decay(0.1, 5, 25, end=1e-3),
]


def test_closed_forms():
    assert [S.exponential_decay(1.0, 0.5, 2)(k) for k in range(5)] == \
        [1.0, 0.5 ** 0.5, 0.5, 0.5 ** 1.5, 0.25]
    assert [S.exponential_decay(1.0, 0.5, 2, staircase=True)(k) for k in range(5)] == \
        [1.0, 1.0, 0.5, 0.5, 0.25]
    assert [S.step_decay(1.0, 2, 0.1)(k) for k in range(5)] == \
        pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01], rel=1e-15)
    cos = S.cosine_decay(2.0, 4, alpha=0.5)
    assert [cos(k) for k in (0, 2, 4, 9)] == pytest.approx([2.0, 1.5, 1.0, 1.0])
    warm = S.linear_warmup(0.0, 1.0, 4)
    assert [warm(k) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    j = S.join([S.constant(1.0), S.step_decay(2.0, 1, 0.5), S.constant(3.0)], [2, 4])
    assert [j(k) for k in range(6)] == [1.0, 1.0, 2.0, 1.0, 3.0, 3.0]


@pytest.mark.parametrize("sched", CASES, ids=lambda s: s.kind)
def test_config_roundtrip_is_json(sched):
    cfg = json.loads(json.dumps(sched.to_config()))
    back = S.from_config(cfg)
    assert back == sched
    assert [back(k) for k in range(40)] == [sched(k) for k in range(40)]


def test_matches_optax():
    optax = pytest.importorskip(
        "optax", reason="optax parity test: optax is not installed (pip install 'fastgrad[peers]')")
    pairs = [
        (S.exponential_decay(0.1, 0.5, 10),
         optax.exponential_decay(0.1, transition_steps=10, decay_rate=0.5)),
        (S.exponential_decay(0.1, 0.5, 10, staircase=True),
         optax.exponential_decay(0.1, transition_steps=10, decay_rate=0.5, staircase=True)),
        (S.cosine_decay(0.1, 20, alpha=0.1), optax.cosine_decay_schedule(0.1, 20, alpha=0.1)),
        (S.linear_warmup(0.0, 0.1, 5), optax.linear_schedule(0.0, 0.1, 5)),
        (S.warmup_cosine_decay(0.1, 5, 25, end=1e-3),
         optax.warmup_cosine_decay_schedule(0.0, 0.1, 5, 25, end_value=1e-3)),
        (S.warmup_cosine_decay(0.1, 0, 25, end=1e-3),      # no warmup: optax takes it
         optax.warmup_cosine_decay_schedule(0.0, 0.1, 0, 25, end_value=1e-3)),
        (S.join([S.constant(0.1), S.linear_warmup(0.1, 0.0, 4)], [3]),
         optax.join_schedules([optax.constant_schedule(0.1), optax.linear_schedule(0.1, 0.0, 4)],
                              [3])),
    ]
    for ours, theirs in pairs:
        for k in range(40):
            # optax evaluates in float32
            assert ours(k) == pytest.approx(float(theirs(k)), rel=2e-6, abs=1e-9), (ours, k)


@pytest.mark.parametrize("bad", [
    lambda: S.constant(-0.1),
    lambda: S.exponential_decay(0.1, 0.0, 10),
    lambda: S.exponential_decay(0.1, 0.5, 0),
    lambda: S.cosine_decay(0.1, 2.5),
    lambda: S.join([S.constant(0.1)], [3]),
    lambda: S.join([S.constant(0.1), S.constant(0.2), S.constant(0.3)], [5, 5]),
    lambda: S.from_config({"kind": "os.system", "value": 1}),
    lambda: S.as_schedule(math.inf),
], ids=range(8))
def test_invalid(bad):
    with pytest.raises(ValueError):
        bad()


def test_counts_take_numpy_integers():
    # warmup_steps=np.int64(5) was refused while other schedules took it
    a = S.warmup_cosine_decay(0.1, np.int64(5), np.int32(25))
    b = S.warmup_cosine_decay(0.1, 5, 25)
    assert [a(k) for k in range(30)] == [b(k) for k in range(30)]
    with pytest.raises(ValueError, match="warmup_steps"):
        S.warmup_cosine_decay(0.1, 2.5, 25)
