"""Policy losses: hand-computed cases, gradcheck in float64, invariants, properties."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turnwise.algo import LOSSES, aggregate, compute_loss, entropy_from_logits
from turnwise.config import default_loss_options

D = torch.float64
OPTS = default_loss_options()
L2, L3 = math.log(2.0), math.log(1.5)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D)


# The hand case. Two sequences of 3 tokens; the last token of row 1 is padding (mask 0).
#   token:   (r,   A)     ppo per token                       clip
#   r0 t0:   (0.5,  1)    max(-0.5, -0.8) = -0.5               -
#   r0 t1:   (0.5, -1)    max( 0.5,  0.8) =  0.8               low  (r < 0.8, A < 0)
#   r0 t2:   (1.5,  2)    max(-3.0, -2.4) = -2.4               high (r > 1.2, A > 0)
#   r1 t0:   (1.5, -2)    max( 3.0,  2.4) =  3.0               -
#   r1 t1:   (1.0,  3)    -3.0                                 -
RATIO = t([[0.5, 0.5, 1.5], [1.5, 1.0, 1.0]])
ADV = t([[1.0, -1.0, 2.0], [-2.0, 3.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
LOGP = t([[-1.0, -2.0, -0.5], [-1.0, -0.25, -3.0]])
SAMPLER = LOGP - RATIO.log()


def assert_rows(tensor: torch.Tensor, rows) -> None:
    torch.testing.assert_close(tensor, t(rows), rtol=1e-9, atol=1e-12)


def run(name, opts=OPTS, logp=None, sampler=SAMPLER, adv=ADV, mask=MASK, **kw):
    logp = (LOGP if logp is None else logp).clone().requires_grad_(True)
    loss, metrics = compute_loss(name, logp, sampler, adv, mask, opts, **kw)
    loss.backward()
    return loss.item(), metrics, logp.grad


def test_ppo_by_hand():
    loss, m, grad = run("ppo")
    assert loss == pytest.approx((-0.5 + 0.8 - 2.4 + 3.0 - 3.0) / 5)  # token-mean = -0.42
    assert m["loss/clip_frac_low"] == pytest.approx(0.2)
    assert m["loss/clip_frac_high"] == pytest.approx(0.2)
    assert m["loss/clip_frac"] == pytest.approx(0.4)
    assert m["loss/ratio_mean"] == pytest.approx(1.0)  # (0.5+0.5+1.5+1.5+1)/5
    assert m["loss/ratio_max"] == pytest.approx(1.5)
    k3 = {0.5: -0.5 + L2, 1.5: 0.5 - L3, 1.0: 0.0}  # r - 1 - log r
    assert m["loss/approx_kl"] == pytest.approx((2 * k3[0.5] + 2 * k3[1.5]) / 5)
    # d/dlogp of -r*A is -r*A where unclipped, 0 where a clip is active; masked token 0
    assert_rows(grad, [[-0.5 / 5, 0.0, 0.0], [3.0 / 5, -3.0 / 5, 0.0]])


@pytest.mark.parametrize("mode, norm, expected", [
    ("token-mean", None, -2.1 / 5),
    ("seq-mean-token-mean", None, (-2.1 / 3 + 0.0 / 2) / 2),
    ("seq-mean-token-sum", None, (-2.1 + 0.0) / 2),
    ("seq-mean-token-sum-norm", 10.0, (-2.1 + 0.0) / 2 / 10),
    ("seq-mean-token-sum-norm", None, (-2.1 + 0.0) / 2 / 3),  # None: T = 3
])
def test_ppo_aggregation_modes_by_hand(mode, norm, expected):
    loss, _, _ = run("ppo", default_loss_options(loss_agg_mode=mode, loss_agg_norm=norm))
    assert loss == pytest.approx(expected)


@pytest.mark.parametrize("mode, norm, expected", [
    ("token-mean", None, (1 + 2 + 3) / 3),
    ("seq-mean-token-mean", None, ((1 + 2) / 2 + 3 / 1) / 2),  # the empty row is not a sequence
    ("seq-mean-token-sum", None, ((1 + 2) + 3) / 2),
    ("seq-mean-token-sum-norm", 4.0, ((1 + 2) + 3) / 2 / 4),
    ("seq-mean-token-sum-norm", None, ((1 + 2) + 3) / 2 / 2),
])
def test_aggregate_by_hand_with_an_empty_row(mode, norm, expected):
    loss_B_T = t([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    assert aggregate(loss_B_T, mask, mode, norm).item() == pytest.approx(expected)
    assert aggregate(loss_B_T, torch.zeros_like(mask), mode, norm).item() == 0.0


def test_ppo_dual_clip_by_hand():
    # (r=4, A=-1): max(4, 1.2) = 4, capped at -3*A = 3;  (r=4, A=1): max(-4, -1.2) = -1.2
    logp = t([[-1.0, -1.0]])
    sampler, adv, mask = logp - math.log(4.0), t([[-1.0, 1.0]]), torch.ones(1, 2)
    loss, m, grad = run("ppo", default_loss_options(clip_ratio_c=3.0), logp=logp, sampler=sampler, adv=adv, mask=mask)
    assert loss == pytest.approx((3.0 - 1.2) / 2)
    assert m["loss/clip_frac_dual"] == 0.5 and m["loss/clip_frac_high"] == 0.5
    assert grad.tolist() == [[0.0, 0.0]]
    loss, _, _ = run("ppo", logp=logp, sampler=sampler, adv=adv, mask=mask)
    assert loss == pytest.approx((4.0 - 1.2) / 2)


def test_importance_sampling_by_hand():
    loss, m, grad = run("importance_sampling")
    assert loss == pytest.approx((-0.5 + 0.5 - 3.0 + 3.0 - 3.0) / 5)
    assert m["loss/clip_frac"] == 0.0
    assert_rows(grad, [[-0.1, 0.1, -0.6], [0.6, -0.6, 0.0]])  # -r*A/5


def test_cispo_by_hand():
    # -clip(r)*A*logp: clip(0.5)=0.8, clip(1.5)=1.2
    per_token = [-0.8 * 1 * -1.0, -0.8 * -1 * -2.0, -1.2 * 2 * -0.5, -1.2 * -2 * -1.0, -1.0 * 3 * -0.25]
    loss, m, grad = run("cispo")
    assert loss == pytest.approx(sum(per_token) / 5)  # = -0.25
    assert m["loss/clip_frac_low"] == pytest.approx(0.4) and m["loss/clip_frac_high"] == pytest.approx(0.4)
    # the gradient never vanishes: -clip(r)*A/5
    assert_rows(grad, [[-0.16, 0.16, -0.48], [0.48, -0.6, 0.0]])


def test_cross_entropy_by_hand():
    loss, m, grad = run("cross_entropy", sampler=None)
    assert loss == pytest.approx((1 + 2 + 0.5 + 1 + 0.25) / 5)
    assert m["loss/nll"] == pytest.approx(0.95)
    assert "loss/ratio_mean" not in m
    assert_rows(grad, [[-0.2] * 3, [-0.2, -0.2, 0.0]])


def test_sequence_level_ratio_by_hand():
    # GSPO: s_0 = (0.5*0.5*1.5)^(1/3) = 0.375^(1/3), s_1 = (1.5*1.0)^(1/2)
    s0, s1 = 0.375 ** (1 / 3), 1.5 ** 0.5
    loss, m, grad = run("importance_sampling", default_loss_options(ratio_level="sequence"))
    assert loss == pytest.approx((-s0 * (1 - 1 + 2) - s1 * (-2 + 3)) / 5)
    assert m["loss/ratio_mean"] == pytest.approx((3 * s0 + 2 * s1) / 5)
    assert m["loss/ratio_max"] == pytest.approx(s1)
    # GSPO-token: d/dlogp_t = s_i * (-A_t) / 5
    assert_rows(grad, [[-s0 / 5, s0 / 5, -2 * s0 / 5], [2 * s1 / 5, -3 * s1 / 5, 0.0]])
    # ppo: row 0 s0 = 0.721 < 0.8 clips A<0; row 1 s1 = 1.2247 > 1.2 clips A>0
    loss, m, _ = run("ppo", default_loss_options(ratio_level="sequence"))
    assert loss == pytest.approx((-s0 * 1 + 0.8 * 1 - s0 * 2 + s1 * 2 - 1.2 * 3) / 5)
    assert m["loss/clip_frac_low"] == pytest.approx(0.2) and m["loss/clip_frac_high"] == pytest.approx(0.2)


def test_truncated_importance_sampling_by_hand():
    # old == current policy (ratio 1); sampler/old mismatch exp(old - sampler) = (2, 0.5, 4), capped at 3
    logp = t([[-1.0, -1.0, -1.0]])
    sampler = logp - t([[2.0, 0.5, 4.0]]).log()
    adv, mask = torch.ones(1, 3, dtype=D), torch.ones(1, 3)
    opts = default_loss_options(tis_cap=3.0)
    loss, m, grad = run("importance_sampling", opts, logp=logp, sampler=sampler, adv=adv, mask=mask,
                        old_logprobs_B_T=logp)
    assert loss == pytest.approx(-(2 + 0.5 + 3) / 3)
    assert m["loss/tis_weight_mean"] == pytest.approx(5.5 / 3)
    assert m["loss/tis_capped_frac"] == pytest.approx(1 / 3)
    assert m["loss/ratio_mean"] == pytest.approx(1.0)  # the ratio to old
    assert m["loss/approx_kl"] == pytest.approx(((1 - L2) + (-0.5 + L2) + (3 - 2 * L2)) / 3)  # to the sampler
    assert_rows(grad, [[-2 / 3, -0.5 / 3, -1.0]])
    with pytest.raises(ValueError, match="old_logprobs"):
        compute_loss("ppo", logp, sampler, adv, mask, opts)


def test_old_logprobs_are_the_ratio_anchor():
    # with old given (and no tis_cap) r = exp(logp - old); the sampler only feeds approx_kl
    old = LOGP - RATIO.log()
    a = run("ppo", sampler=LOGP - 7.0, old_logprobs_B_T=old)
    b = run("ppo", sampler=old)
    assert a[0] == pytest.approx(b[0]) and torch.allclose(a[2], b[2])
    assert a[1]["loss/approx_kl"] != pytest.approx(b[1]["loss/approx_kl"])


def test_kl_penalty_is_added_with_the_same_aggregation():
    ref = t([[-1.5, -1.0, -0.5], [-1.0, -0.25, 9.0]])  # log rho = ref - logp = (-0.5, 1, 0), (0, 0, pad)
    k3 = (math.exp(-0.5) - 1 + 0.5) + (math.e - 1 - 1)
    base, _, _ = run("ppo")
    loss, m, _ = run("ppo", default_loss_options(kl_coef=0.1), ref_logprobs_B_T=ref)
    assert m["loss/kl_ref"] == pytest.approx(k3 / 5)
    assert loss == pytest.approx(base + 0.1 * k3 / 5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        run("ppo", default_loss_options(kl_coef=0.1))


def test_entropy_metric_and_entropy_from_logits():
    logits = torch.zeros(2, 3, 4, dtype=D)
    logits[1, 1] = torch.tensor([0.0, 0.0, -1e9, -1e9])  # two equally likely tokens
    ent = entropy_from_logits(logits)
    assert_rows(ent, [[math.log(4)] * 3, [math.log(4), math.log(2), math.log(4)]])
    _, m, _ = run("ppo", entropy_B_T=ent)
    assert m["loss/entropy"] == pytest.approx((4 * math.log(4) + math.log(2)) / 5)


def test_masked_positions_cannot_leak_nan():
    logp = LOGP.clone()
    logp[1, 2] = float("nan")
    sampler, adv = SAMPLER.clone(), ADV.clone()
    sampler[1, 2], adv[1, 2] = float("inf"), float("nan")
    for name in ["ppo", "cispo", "importance_sampling"]:
        for level in ["token", "sequence"]:
            loss, _, grad = run(name, default_loss_options(ratio_level=level), logp=logp, sampler=sampler, adv=adv)
            ref_loss, _, ref_grad = run(name, default_loss_options(ratio_level=level))
            assert loss == pytest.approx(ref_loss) and torch.equal(grad, ref_grad)


def test_no_valid_token_gives_zero_loss():
    loss, m, grad = run("ppo", mask=torch.zeros(2, 3))
    assert loss == 0.0 and m["loss/ratio_mean"] == 0.0 and not grad.any()


@pytest.mark.parametrize("opts, match", [
    (default_loss_options(clip_low_threshold=0.2, clip_high_threshold=0.3), "0 < low <= 1 <= high"),
    (default_loss_options(clip_ratio_c=0.9), "clip_ratio_c"),
    (default_loss_options(ratio_level="turn"), "ratio_level"),
    (default_loss_options(loss_agg_mode="sum"), "token-mean, seq-mean-token-mean"),
    (default_loss_options(kl_estimator="k9"), "k1, k2, k3"),
])
def test_bad_options_fail_clearly(opts, match):
    with pytest.raises(ValueError, match=match):
        run("ppo", opts)


def test_shape_mismatch_fails_clearly():
    with pytest.raises(ValueError, match="advantages_B_T"):
        compute_loss("ppo", LOGP, SAMPLER, ADV[:, :2], MASK, OPTS)


# --- gradcheck (float64) ------------------------------------------------------------------------

B, T = 3, 5
GEN = torch.Generator().manual_seed(0)


def _inputs(log_r_lo=-0.15, log_r_hi=0.15, seq_const_adv=False):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 0] = False
    logp = -torch.rand(B, T, generator=GEN, dtype=D) * 3 - 0.05
    mag = log_r_lo + (log_r_hi - log_r_lo) * torch.rand(B, T, generator=GEN, dtype=D)
    sign = torch.where(torch.rand(B, T, generator=GEN) < 0.5, -1.0, 1.0).to(D)
    log_r = mag * sign if log_r_lo > 0 else mag
    adv = torch.randn(B, T, generator=GEN, dtype=D)
    if seq_const_adv:
        adv = adv[:, :1].expand(B, T).clone()
    return logp, logp - log_r, adv, mask


GRADCHECK_CASES = [
    # (loss, options, extra inputs, inputs)
    ("importance_sampling", {}, {}, {}),
    ("ppo", {}, {}, {"log_r_lo": -0.6, "log_r_hi": 0.6}),  # mix of clipped and unclipped tokens
    ("ppo", {"clip_ratio_c": 1.5}, {}, {"log_r_lo": -1.0, "log_r_hi": 1.0}),
    ("cispo", {}, {}, {"log_r_lo": 0.4, "log_r_hi": 1.0}),  # every weight clipped: locally constant
    ("cross_entropy", {}, {}, {}),
    ("ppo", {"ratio_level": "sequence", "loss_agg_mode": "seq-mean-token-mean"}, {}, {"seq_const_adv": True}),
    ("importance_sampling", {"ratio_level": "sequence"}, {}, {"seq_const_adv": True}),
    ("ppo", {"tis_cap": 1.05}, {"old": True}, {}),
    ("ppo", {"kl_coef": 0.3, "kl_estimator": "k1"}, {"ref": True}, {}),
    ("ppo", {"kl_coef": 0.3, "kl_estimator": "k2"}, {"ref": True}, {}),
    ("cispo", {"kl_coef": 0.3, "kl_estimator": "k3"}, {"ref": True}, {"log_r_lo": 0.4, "log_r_hi": 1.0}),
]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name, opt_kw, extra, input_kw", GRADCHECK_CASES)
def test_gradcheck(name, opt_kw, extra, input_kw, mode):
    logp, sampler, adv, mask = _inputs(**input_kw)
    opts = replace(default_loss_options(loss_agg_mode=mode), **opt_kw)
    kw = {}
    if extra.get("old"):
        kw["old_logprobs_B_T"] = logp + 0.2 * torch.randn(B, T, generator=GEN, dtype=D)
    if extra.get("ref"):
        kw["ref_logprobs_B_T"] = logp + 0.5 * torch.randn(B, T, generator=GEN, dtype=D)

    def f(lp):
        return compute_loss(name, lp, sampler, adv, mask, opts, **kw)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


# --- invariants (hypothesis) --------------------------------------------------------------------


@st.composite
def batches(draw, log_r=st.floats(-1.5, 1.5)):
    b, n = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    cells = st.tuples(st.floats(-4, -0.01), log_r, st.floats(-3, 3), st.booleans())
    rows = [[draw(cells) for _ in range(n)] for _ in range(b)]
    logp = t([[c[0] for c in row] for row in rows])
    sampler = logp - t([[c[1] for c in row] for row in rows])
    adv = t([[c[2] for c in row] for row in rows])
    mask = torch.tensor([[c[3] for c in row] for row in rows])
    return logp, sampler, adv, mask


def _loss_and_grad(name, logp, sampler, adv, mask, opts, **kw):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = compute_loss(name, lp, sampler, adv, mask, opts, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


AGG = st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])


@settings(max_examples=60, deadline=None)
@given(batches(log_r=st.floats(math.log(0.81), math.log(1.19))), AGG)
def test_ppo_equals_importance_sampling_when_nothing_is_clipped(batch, mode):
    opts = default_loss_options(loss_agg_mode=mode)
    ppo = _loss_and_grad("ppo", *batch, opts)
    is_ = _loss_and_grad("importance_sampling", *batch, opts)
    assert torch.allclose(ppo[0], is_[0]) and torch.allclose(ppo[1], is_[1])
    assert ppo[2]["loss/clip_frac"] == 0.0


@settings(max_examples=60, deadline=None)
@given(batches(), AGG, st.sampled_from(["token", "sequence"]))
def test_cispo_gradient_is_clipped_weight_times_policy_gradient(batch, mode, level):
    logp, sampler, adv, mask = batch
    opts = default_loss_options(loss_agg_mode=mode, ratio_level=level)
    _, grad, m = _loss_and_grad("cispo", logp, sampler, adv, mask, opts)
    # plain policy gradient -A*logp under the same aggregation
    lp = logp.clone().requires_grad_(True)
    aggregate(-adv * torch.where(mask, lp, 0.0), mask, mode).backward()
    log_r = (logp - sampler) * mask
    if level == "sequence":
        log_r = (log_r.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(logp)
    weight = log_r.exp().clamp(0.8, 1.2)
    assert torch.allclose(grad, weight * lp.grad.nan_to_num(), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(batches(), AGG, st.sampled_from(["ppo", "cispo", "importance_sampling"]))
def test_loss_is_finite_and_clip_fractions_are_fractions(batch, mode, name):
    loss, grad, m = _loss_and_grad(name, *batch, default_loss_options(loss_agg_mode=mode, clip_ratio_c=3.0))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert 0.0 <= m["loss/clip_frac_low"] <= 1.0 and 0.0 <= m["loss/clip_frac_high"] <= 1.0
    assert m["loss/clip_frac"] <= 1.0 and m["loss/approx_kl"] >= 0.0
    assert not (grad * ~batch[3]).any()  # padding gets no gradient


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(["ppo", "cispo", "importance_sampling"]))
def test_sequence_level_equals_token_level_for_one_token_sequences(batch, name):
    logp, sampler, adv, mask = (x[:, :1] for x in batch)
    a = _loss_and_grad(name, logp, sampler, adv, mask, default_loss_options(ratio_level="token"))
    b = _loss_and_grad(name, logp, sampler, adv, mask, default_loss_options(ratio_level="sequence"))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
       st.sampled_from(["ppo", "cispo", "importance_sampling"]))
def test_padding_columns_change_nothing(batch, mode, name):
    logp, sampler, adv, mask = batch
    pad = [torch.cat([x, torch.full((x.shape[0], 2), v, dtype=x.dtype)], dim=1)
           for x, v in [(logp, -1.0), (sampler, -2.0), (adv, 5.0), (mask, 0)]]
    a = _loss_and_grad(name, logp, sampler, adv, mask, default_loss_options(loss_agg_mode=mode))
    b = _loss_and_grad(name, *pad, default_loss_options(loss_agg_mode=mode))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1][:, :-2])


def test_on_policy_ppo_is_the_policy_gradient():
    # logp == sampler: r = 1, loss -mean(A), gradient -A/N
    loss, m, grad = run("ppo", sampler=LOGP)
    assert loss == pytest.approx(-(1 - 1 + 2 - 2 + 3) / 5)
    assert m["loss/approx_kl"] == 0.0 and m["loss/ratio_max"] == 1.0
    assert torch.allclose(grad, -ADV * MASK / 5)


def test_every_loss_of_the_issue_is_registered():
    assert {"ppo", "importance_sampling", "cispo", "cross_entropy"} <= set(LOSSES.names())


def test_half_precision_logprobs_are_computed_in_float32():
    logp = LOGP.to(torch.bfloat16).requires_grad_(True)
    loss, _ = compute_loss("ppo", logp, SAMPLER.to(torch.bfloat16), ADV, MASK, OPTS)
    loss.backward()
    assert loss.dtype == torch.float32 and logp.grad.dtype == torch.bfloat16
    expected = compute_loss("ppo", LOGP.to(torch.bfloat16).to(D), SAMPLER.to(torch.bfloat16).to(D), ADV, MASK,
                            OPTS)[0]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
