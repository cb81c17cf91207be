"""The traffic split is deterministic per user and close to the declared shares."""

from __future__ import annotations

import pytest

from recloop.serving.split import TrafficSplit, parse_arm, user_unit


def test_same_user_same_policy_across_instances():
    a = TrafficSplit.parse(["slateq=0.5", "random=0.5"])
    b = TrafficSplit.parse(["slateq=0.5", "random=0.5"])
    users = [f"user-{i}" for i in range(500)]
    assert [a.arm(u) for u in users] == [b.arm(u) for u in users]
    assert [a.arm(u) for u in users] == [a.arm(u) for u in users]


@pytest.mark.parametrize("arms", [["slateq=0.5", "random=0.5"], ["a=1", "b=2", "c=1"]])
def test_shares_are_close_to_declared(arms):
    split = TrafficSplit.parse(arms)
    n = 40_000
    counts = dict.fromkeys(split.names, 0)
    for i in range(n):
        counts[split.arm(f"u{i}")] += 1
    for name, fraction in split.fractions().items():
        # Four binomial standard errors at n = 40k is about 0.01.
        assert abs(counts[name] / n - fraction) < 4 * (fraction * (1 - fraction) / n) ** 0.5


def test_user_unit_is_in_unit_interval_and_spread():
    values = [user_unit(f"x{i}") for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == len(values)
    # Uniform: each tenth of [0, 1) holds 200 ± 4 binomial standard errors (4·13.4) of them.
    counts = [0] * 10
    for v in values:
        counts[int(v * 10)] += 1
    assert all(abs(c - 200) < 4 * (2000 * 0.1 * 0.9) ** 0.5 for c in counts), counts


def test_parse_arm_and_errors():
    assert parse_arm("slateq") == ("slateq", 1.0)
    assert parse_arm("slateq=0.25") == ("slateq", 0.25)
    for bad in ("", "=0.5", "a=-1", "a b=1", "a=x"):
        with pytest.raises(ValueError):
            parse_arm(bad)
    with pytest.raises(ValueError, match="distinct"):
        TrafficSplit.parse(["a=1", "a=2"])
    with pytest.raises(ValueError, match="not all 0"):
        TrafficSplit.parse(["a=0", "b=0"])


@pytest.mark.parametrize("arms", [["a=1", "b=0"], ["a=0", "b=1"], ["a=0.0", "b=1.0", "c=0"]])
def test_a_zero_share_gets_no_users(arms):
    split = TrafficSplit.parse(arms)
    (live,) = [name for name, share in split.arms if share > 0]
    assert {split.arm(f"u{i}") for i in range(2000)} == {live}
