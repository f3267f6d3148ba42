"""Advantage methods: hand-computed cases, edge cases, invariants, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnwise.algo import ADVANTAGES, compute_advantages
from turnwise.config import default_advantage_options
from turnwise.types import AdvantageOptions, ScoredRollout

ALL_METHODS = ["group_based", "group_based_per_turn", "monte_carlo", "rloo", "reinforce_pp",
               "reinforce_pp_baseline", "opo", "grpo_passk", "gpg"]
GROUP_METHODS = ["group_based", "group_based_per_turn", "rloo", "opo", "grpo_passk", "gpg"]
EXACT = default_advantage_options(eps=0.0)


def ro(group: str, tid: str, rewards: tuple[float, ...], lengths: tuple[int, ...]) -> ScoredRollout:
    return ScoredRollout(group_id=group, trajectory_id=tid, rewards=rewards, completion_lengths=lengths)


def adv(name: str, rollouts: list[ScoredRollout], opts: AdvantageOptions = EXACT) -> list[tuple[float, ...]]:
    return compute_advantages(name, rollouts, opts)[0]


class approx:
    """pytest.approx for a list of per-rollout tuples."""

    def __init__(self, expected):
        self.expected = [tuple(e) for e in expected]

    def __eq__(self, got):
        return len(got) == len(self.expected) and all(
            len(g) == len(e) and list(g) == pytest.approx(list(e), rel=1e-9, abs=1e-12)
            for g, e in zip(got, self.expected, strict=True))

    def __repr__(self):
        return f"approx({self.expected})"


# --- hand-computed cases ----------------------------------------------------------------------


def test_group_based_grpo_by_hand():
    # rewards 2, 0, 1: mean 1, centered (1, -1, 0), sample std sqrt(2/2) = 1
    rs = [ro("g", "a", (2.0,), (2,)), ro("g", "b", (0.0,), (1,)), ro("g", "c", (1.0,), (1, 2))]
    assert adv("group_based", rs) == approx([(1.0, 1.0), (-1.0,), (0.0, 0.0, 0.0)])


def test_group_based_eps_is_added_to_std():
    rs = [ro("g", "a", (2.0,), (1,)), ro("g", "b", (0.0,), (1,))]  # centered ±1, std sqrt(2)
    got = adv("group_based", rs, default_advantage_options(eps=0.1))
    assert got == approx([(1 / (math.sqrt(2) + 0.1),), (-1 / (math.sqrt(2) + 0.1),)])


def test_group_based_without_std_is_dr_grpo():
    # rewards 3, 0, 0: mean 1 -> (2, -1, -1); with std: sqrt((4+1+1)/2) = sqrt(3)
    rs = [ro("g", "a", (3.0,), (1,)), ro("g", "b", (0.0,), (1,)), ro("g", "c", (0.0,), (1,))]
    assert adv("group_based", rs, default_advantage_options(normalize_std=False, eps=0.0)) == approx([(2.0,), (-1.0,), (-1.0,)])
    s3 = math.sqrt(3)
    assert adv("group_based", rs) == approx([(2 / s3,), (-1 / s3,), (-1 / s3,)])


def test_group_based_uses_sum_of_per_turn_rewards():
    # (0.5, 1.5) sums to 2 -> same as the scalar case above
    rs = [ro("g", "a", (0.5, 1.5), (1, 1)), ro("g", "b", (0.0,), (1,)), ro("g", "c", (1.0,), (1,))]
    assert adv("group_based", rs) == approx([(1.0, 1.0), (-1.0,), (0.0,)])


def test_group_based_per_turn_by_hand():
    # gamma 0.5.  a: r=(1, 2) -> G=(1+0.5*2, 2)=(2, 2);  b: r=(0, 0) -> G=(0, 0);  c: one turn, G=(4,)
    # turn 0: values (2, 0, 4), mean 2 -> (0, -2, 2); turn 1: values (2, 0), mean 1 -> (1, -1)
    rs = [ro("g", "a", (1.0, 2.0), (1, 2)), ro("g", "b", (0.0, 0.0), (2, 1)), ro("g", "c", (4.0,), (3,))]
    got = adv("group_based_per_turn", rs, default_advantage_options(normalize_std=False, gamma=0.5, eps=0.0))
    assert got == approx([(0.0, 1.0, 1.0), (-2.0, -2.0, -1.0), (2.0, 2.0, 2.0)])
    # with std: turn 0 std sqrt((0+4+4)/2) = 2 -> (0, -1, 1); turn 1 std sqrt(2) -> (1/sqrt2, -1/sqrt2)
    got = adv("group_based_per_turn", rs, default_advantage_options(gamma=0.5, eps=0.0))
    h = 1 / math.sqrt(2)
    assert got == approx([(0.0, h, h), (-1.0, -1.0, -h), (1.0, 1.0, 1.0)])


def test_group_based_per_turn_scalar_reward_is_last_turn():
    # a: scalar 3 over 2 turns, gamma 0.5 -> G=(1.5, 3);  b: (0, 0) -> G=(0, 0)
    rs = [ro("g", "a", (3.0,), (1, 1)), ro("g", "b", (0.0,), (1, 1))]
    got = adv("group_based_per_turn", rs, default_advantage_options(normalize_std=False, gamma=0.5, eps=0.0))
    assert got == approx([(0.75, 1.5), (-0.75, -1.5)])


def test_monte_carlo_by_hand():
    # r=(1, 0, 2), gamma 0.5: G2=2, G1=0+0.5*2=1, G0=1+0.5*1=1.5; turn lengths (1, 2, 1)
    rs = [ro("g", "a", (1.0, 0.0, 2.0), (1, 2, 1)), ro("h", "b", (4.0,), (1, 1))]
    got = adv("monte_carlo", rs, default_advantage_options(gamma=0.5))
    assert got == approx([(1.5, 1.0, 1.0, 2.0), (2.0, 4.0)])  # b: scalar 4 on the last turn


def test_rloo_by_hand():
    # rewards 3, 0, 0: baselines 0, 1.5, 1.5
    rs = [ro("g", "a", (3.0,), (2,)), ro("g", "b", (0.0,), (1,)), ro("g", "c", (0.0,), (1,))]
    assert adv("rloo", rs) == approx([(3.0, 3.0), (-1.5,), (-1.5,)])


def test_reinforce_pp_by_hand():
    # gamma 0.5. a: one turn of 3 tokens, reward 4 at its end -> returns (1, 2, 4)
    # b: turns of 1 token each, rewards (2, 2) -> (2 + 0.5*2, 2) = (3, 2)
    # batch tokens (1, 2, 4, 3, 2): mean 2.4, sample var (1.96+0.16+2.56+0.36+0.16)/4 = 1.3
    rs = [ro("g", "a", (4.0,), (3,)), ro("h", "b", (2.0, 2.0), (1, 1))]
    got = adv("reinforce_pp", rs, default_advantage_options(gamma=0.5, eps=0.0))
    s = math.sqrt(1.3)
    assert got == approx([(-1.4 / s, -0.4 / s, 1.6 / s), (0.6 / s, -0.4 / s)])


def test_reinforce_pp_discounts_per_token_across_turns():
    # scalar reward 1 on the last token of turn 2; gamma 0.5 over 3 tokens -> (0.25, 0.5, 1)
    rs = [ro("g", "a", (1.0,), (2, 1)), ro("g", "b", (0.0,), (3,))]
    got = adv("reinforce_pp", rs, default_advantage_options(gamma=0.5, eps=0.0))
    x = np.array([0.25, 0.5, 1.0, 0.0, 0.0, 0.0])  # mean 0.291666..., whitened by hand below
    mean = 1.75 / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 5)
    assert got == approx([tuple((x[:3] - mean) / std), tuple((x[3:] - mean) / std)])


def test_reinforce_pp_baseline_by_hand():
    # group g: a R=1 (1 token), b R=3 (3 tokens): mean 2 -> -1, +1; group h: singleton -> 0
    # tokens (-1, 1, 1, 1, 0): mean 0.4, sample var (1.96 + 3*0.36 + 0.16)/4 = 0.8
    rs = [ro("g", "a", (1.0,), (1,)), ro("g", "b", (3.0,), (3,)), ro("h", "c", (5.0,), (1,))]
    got = adv("reinforce_pp_baseline", rs, default_advantage_options(eps=0.0))
    s = math.sqrt(0.8)
    assert got == approx([(-1.4 / s,), (0.6 / s,) * 3, (-0.4 / s,)])


def test_opo_by_hand():
    # a: R=2 with 1 token, b: R=0 with 3 tokens: baseline (1*2 + 3*0) / 4 = 0.5 (the plain mean is 1)
    rs = [ro("g", "a", (2.0,), (1,)), ro("g", "b", (0.0,), (1, 2))]
    assert adv("opo", rs) == approx([(1.5,), (-0.5, -0.5, -0.5)])


def test_grpo_passk_by_hand():
    rs = [ro("g", "a", (1.0,), (1,)), ro("g", "b", (3.0,), (2,)), ro("g", "c", (2.0,), (1,)),
          ro("h", "d", (3.0,), (1,)), ro("h", "e", (1.0,), (1,)), ro("h", "f", (3.0,), (1,))]
    got, metrics = compute_advantages("grpo_passk", rs, default_advantage_options())
    assert got == approx([(0.0,), (1.0, 1.0), (0.0,), (0.0,), (0.0,), (0.0,)])  # 3 - 2; a tie gives 0
    assert metrics["train/zero_adv_groups"] == 1.0


def test_gpg_by_hand():
    # batch of 4 rollouts, 1 non-zero reward -> alpha = 4; group g: mean 0.5 -> ±0.5 * 4
    rs = [ro("g", "a", (1.0,), (1,)), ro("g", "b", (0.0,), (2,)), ro("h", "c", (0.0,), (1,)),
          ro("h", "d", (0.0,), (1,))]
    assert adv("gpg", rs) == approx([(2.0,), (-2.0, -2.0), (0.0,), (0.0,)])


# --- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", GROUP_METHODS + ["reinforce_pp_baseline"])
def test_group_of_one_gets_zero(name):
    got, metrics = compute_advantages(name, [ro("g", "a", (3.0,), (2, 1))], default_advantage_options())
    assert got == [(0.0, 0.0, 0.0)]
    assert metrics["train/zero_adv_groups"] == 1.0
    assert metrics["train/singleton_groups"] == 1.0


@pytest.mark.parametrize("name", GROUP_METHODS)
def test_all_equal_rewards_give_exact_zero_and_are_counted(name):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must still be exact
    rs = [ro("g", t, (0.1,), (2,)) for t in "abc"] + [ro("h", "d", (1.0,), (1,)), ro("h", "e", (0.0,), (1,))]
    got, metrics = compute_advantages(name, rs, default_advantage_options())
    assert got[:3] == [(0.0, 0.0)] * 3
    assert any(a != 0.0 for a in got[3] + got[4])
    assert metrics["train/zero_adv_groups"] == 1.0
    assert metrics["train/num_groups"] == 2.0


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_is_rejected_naming_the_trajectory(name, bad):
    rs = [ro("g", "ok-1", (1.0,), (1,)), ro("g", "traj-bad-42", (0.0, bad), (1, 1))]
    with pytest.raises(ValueError, match="traj-bad-42"):
        compute_advantages(name, rs, default_advantage_options())


def test_reward_count_must_match_turns():
    with pytest.raises(ValueError, match="traj-7.*3 rewards for 2 turns"):
        compute_advantages("monte_carlo", [ro("g", "traj-7", (1.0, 2.0, 3.0), (1, 1))], default_advantage_options())


def test_missing_reward_is_rejected():
    with pytest.raises(ValueError, match="traj-9.*no reward"):
        compute_advantages("group_based", [ro("g", "traj-9", (), (1,))], default_advantage_options())


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="gamma"):
        compute_advantages("monte_carlo", [], default_advantage_options(gamma=1.5))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_empty_batch(name):
    got, metrics = compute_advantages(name, [], default_advantage_options())
    assert got == []
    assert metrics["train/num_groups"] == 0.0 and metrics["train/advantage_std"] == 0.0


def test_failed_rollouts_are_left_out_by_the_caller():
    # A failed rollout is not passed in: the group is compared among the survivors only.
    survivors = [ro("g", "a", (1.0,), (1,)), ro("g", "b", (0.0,), (1,))]
    assert adv("rloo", survivors) == approx([(1.0,), (-1.0,)])
    assert adv("rloo", survivors[:1]) == [(0.0,)]  # one survivor: nothing to compare with


def test_zero_length_turns_and_rollouts():
    rs = [ro("g", "a", (1.0, 2.0), (0, 2)), ro("g", "b", (0.0,), ())]
    for name in ALL_METHODS:
        got, _ = compute_advantages(name, rs, default_advantage_options())
        assert [len(a) for a in got] == [2, 0], name


def test_metrics_describe_the_token_advantages():
    rs = [ro("g", "a", (2.0,), (2,)), ro("g", "b", (0.0,), (1,)), ro("g", "c", (1.0,), (1,))]
    _, m = compute_advantages("group_based", rs, EXACT)
    tokens = np.array([1.0, 1.0, -1.0, 0.0])
    assert m["train/advantage_mean"] == pytest.approx(tokens.mean())
    assert m["train/advantage_std"] == pytest.approx(tokens.std())
    assert m["train/advantage_min"] == -1.0 and m["train/advantage_max"] == 1.0
    assert m["train/advantage_nonzero_frac"] == 0.75
    assert m["train/zero_adv_groups"] == 0.0


# --- invariants -------------------------------------------------------------------------------

_reward = st.one_of(st.integers(-3, 3).map(float),
                    st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32))
_dyadic = st.integers(-40, 40).map(lambda k: k / 4)  # exact in binary: shifts add no rounding


@st.composite
def batches(draw, per_turn: bool = True, min_group: int = 1, reward=_reward):
    """Groups of rollouts; rewards are scalars or (when per_turn) one per turn."""
    rollouts = []
    for g in range(draw(st.integers(1, 4))):
        for i in range(draw(st.integers(min_group, 5))):
            lengths = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
            if per_turn and draw(st.booleans()):
                rewards = tuple(draw(st.lists(reward, min_size=len(lengths), max_size=len(lengths))))
            else:
                rewards = (draw(reward),)
            rollouts.append(ro(f"g{g}", f"t{g}-{i}", rewards, lengths))
    return rollouts


def _scalars(name, rollouts, opts):
    """One advantage per rollout, for methods that broadcast a scalar (checked constant)."""
    out = []
    for a in compute_advantages(name, rollouts, opts)[0]:
        assert len(set(a)) <= 1
        out.append(a[0] if a else None)
    return out


def _one_token(rollouts):
    return [ro(r.group_id, r.trajectory_id, (sum(r.rewards),), (1,)) for r in rollouts]


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(ALL_METHODS), st.floats(0, 1), st.booleans())
def test_shapes_and_finiteness(rollouts, name, gamma, normalize):
    got, metrics = compute_advantages(name, rollouts, default_advantage_options(gamma=gamma, normalize_std=normalize))
    assert [len(a) for a in got] == [sum(r.completion_lengths) for r in rollouts]
    assert all(math.isfinite(x) for a in got for x in a)
    assert all(math.isfinite(v) for v in metrics.values())


@settings(max_examples=60, deadline=None)
@given(batches(per_turn=False, reward=_dyadic), _dyadic.map(lambda x: 10 * x), st.booleans())
def test_grpo_is_unchanged_by_a_reward_shift(rollouts, shift, normalize):
    opts = default_advantage_options(normalize_std=normalize)
    shifted = [ro(r.group_id, r.trajectory_id, (r.rewards[0] + shift,), r.completion_lengths) for r in rollouts]
    a, b = compute_advantages("group_based", rollouts, opts)[0], compute_advantages("group_based", shifted, opts)[0]
    for x, y in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches(per_turn=False, min_group=2))
def test_rloo_equals_scaled_dr_grpo(rollouts):
    rollouts = _one_token(rollouts)
    rloo = _scalars("rloo", rollouts, EXACT)
    dr = _scalars("group_based", rollouts, default_advantage_options(normalize_std=False, eps=0.0))
    sizes = {g: sum(1 for r in rollouts if r.group_id == g) for g in {r.group_id for r in rollouts}}
    for a, b, r in zip(rloo, dr, rollouts, strict=True):
        n = sizes[r.group_id]
        assert a == pytest.approx(n / (n - 1) * b, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(batches(per_turn=False), st.booleans())
def test_per_turn_with_one_turn_is_group_based(rollouts, normalize):
    rollouts = [ro(r.group_id, r.trajectory_id, r.rewards, r.completion_lengths[:1]) for r in rollouts]
    opts = default_advantage_options(normalize_std=normalize, gamma=0.7)
    a = compute_advantages("group_based_per_turn", rollouts, opts)[0]
    b = compute_advantages("group_based", rollouts, opts)[0]
    assert a == b


@settings(max_examples=60, deadline=None)
@given(batches(per_turn=False))
def test_baselines_sum_to_zero_in_each_group(rollouts):
    rollouts = _one_token(rollouts)
    lengths = [sum(r.completion_lengths) for r in rollouts]
    for name, weights in [("group_based", None), ("rloo", None), ("gpg", None), ("opo", lengths)]:
        A = _scalars(name, rollouts, default_advantage_options(normalize_std=False))
        for g in {r.group_id for r in rollouts}:
            idx = [i for i, r in enumerate(rollouts) if r.group_id == g]
            total = sum(A[i] * (weights[i] if weights else 1) for i in idx)
            assert total == pytest.approx(0.0, abs=1e-6 * max(1.0, *(abs(A[i]) for i in idx))), name


@settings(max_examples=60, deadline=None)
@given(batches())
def test_passk_rewards_only_the_best(rollouts):
    A = _scalars("grpo_passk", _one_token(rollouts), default_advantage_options())
    R = [sum(r.rewards) for r in rollouts]
    for g in {r.group_id for r in rollouts}:
        idx = [i for i, r in enumerate(rollouts) if r.group_id == g]
        nonzero = [i for i in idx if A[i] != 0]
        assert len(nonzero) <= 1
        if nonzero:
            best, rest = nonzero[0], sorted((R[i] for i in idx if i != nonzero[0]), reverse=True)
            assert R[best] == max(R[i] for i in idx)
            assert A[best] == pytest.approx(R[best] - rest[0])


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from(["reinforce_pp", "reinforce_pp_baseline"]), st.floats(0, 1))
def test_batch_whitening_gives_zero_mean_unit_std(rollouts, name, gamma):
    flat = np.concatenate([np.asarray(a) for a in compute_advantages(
        name, rollouts, default_advantage_options(gamma=gamma, eps=0.0))[0]] + [np.zeros(0)])
    if flat.size >= 2 and flat.any():
        assert flat.mean() == pytest.approx(0.0, abs=1e-6)
        assert flat.std(ddof=1) == pytest.approx(1.0, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_monte_carlo_with_gamma_one_is_sum_of_remaining_rewards(rollouts):
    got = compute_advantages("monte_carlo", rollouts, default_advantage_options(gamma=1.0))[0]
    for a, r in zip(got, rollouts, strict=True):
        turns = len(r.completion_lengths)
        per_turn = list(r.rewards) if len(r.rewards) == turns else [0.0] * (turns - 1) + [r.rewards[0]]
        expected = [math.fsum(per_turn[k:]) for k in range(turns) for _ in range(r.completion_lengths[k])]
        assert a == pytest.approx(expected, abs=1e-9)


def test_every_method_of_the_issue_is_registered():
    assert set(ALL_METHODS) <= set(ADVANTAGES.names())
