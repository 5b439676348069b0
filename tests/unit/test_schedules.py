import math

import pytest

from sslscale.schedules import cosine, lr_at, weight_decay_at


def test_lr_warmup_then_cosine():
    kw = dict(lr=1.0, max_steps=110, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)  # held after the end
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_lr_is_a_pure_function_of_step():
    kw = dict(lr=3e-4, max_steps=1000, warmup_steps=100)
    assert [lr_at(s, **kw) for s in range(0, 1000, 37)] == [lr_at(s, **kw) for s in range(0, 1000, 37)]


def test_weight_decay_constant_or_cosine():
    assert weight_decay_at(123, weight_decay=0.05, max_steps=1000) == 0.05
    assert weight_decay_at(0, weight_decay=0.04, max_steps=100, weight_decay_end=0.4) == pytest.approx(0.04)
    assert weight_decay_at(100, weight_decay=0.04, max_steps=100, weight_decay_end=0.4) == pytest.approx(0.4)


def test_cosine_midpoint():
    assert cosine(50, 100, 2.0, 0.0) == pytest.approx(1.0)
    assert cosine(25, 100, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
