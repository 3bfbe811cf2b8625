"""CostModel: recomputing block i costs a + b*i (attention grows with position); load-or-recompute per prefix."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest

from kvbm_fs import ConfigError
from kvbm_fs.cost import ATTENTION_RATIO, CostModel
from kvbm_fs.replay import saved_seconds
from kvbm_fs.tier import Medium


def test_recompute_cost_grows_linearly_with_position_from_the_attention_ratio() -> None:
    c = CostModel(prefill_tokens_per_s=10_000)
    a, b = c.recompute_ab(512)
    assert a == pytest.approx(512 / 10_000 * (1 + ATTENTION_RATIO * 511 / 2))
    assert b == pytest.approx(512 / 10_000 * ATTENTION_RATIO * 512)
    s = c.recompute_s(0, 100, 512)
    assert np.allclose(np.diff(s), b) and s[0] == pytest.approx(a)
    assert 1.9 < s[60] / s[0] < 2.1  # Llama-3-8B: block 60 (30k tokens in) costs about twice block 0
    assert c.recompute_s(5, 3, 512).tolist() == pytest.approx(s[5:8].tolist())


def test_recompute_overrides_and_no_rate_known() -> None:
    assert CostModel(recompute_a=0.1, recompute_b=0.01).recompute_s(0, 3, 16).tolist() == pytest.approx(
        [0.1, 0.11, 0.12]
    )
    assert CostModel(1e4, attention_ratio=0).recompute_ab(512) == pytest.approx((0.0512, 0.0))
    assert CostModel().recompute_ab(512) == (0.0, 0.0)
    for bad in ({"recompute_a": -1.0}, {"recompute_b": "x"}, {"attention_ratio": -0.1}):
        with pytest.raises(ConfigError):
            CostModel(1e4, **cast(Any, bad))


def test_worth_loads_a_long_prefix_when_later_blocks_cost_more_to_recompute() -> None:
    """A tier whose load costs more than recomputing block 0 but less than block 9: the flat model
    recomputes everything, the positional one loads the prefix once the later blocks pay for it."""
    tier = cast(Any, SimpleNamespace(name="slow", medium=Medium.DISK))
    where = np.zeros(20, np.int64)
    flat = CostModel(recompute_a=1.0, recompute_b=0.0, latency={"slow": 0.0}, bandwidth={"slow": 1.0 / 1.5})
    pos = CostModel(recompute_a=1.0, recompute_b=0.1, latency={"slow": 0.0}, bandwidth={"slow": 1.0 / 1.5})
    assert flat.worth(where, [tier], 1, 16) == 0
    assert pos.worth(where, [tier], 1, 16) == 20  # blocks 5+ save more than 0-4 lose


def test_saved_seconds_counts_later_blocks_as_worth_more() -> None:
    c = CostModel(recompute_a=1.0, recompute_b=0.5)
    one_long, two_short = saved_seconds(np.array([10]), c, 0), saved_seconds(np.array([5, 5]), c, 0)
    assert one_long == pytest.approx(10 + 0.5 * 45 - 10e-6)  # a*k + b*k(k-1)/2 minus one host request latency
    assert one_long > two_short  # same hit blocks, deeper positions
    assert saved_seconds(np.array([0, 0])) == 0.0
