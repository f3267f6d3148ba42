"""KL penalty estimators (Schulman's k1, k2, k3): hand values, gradients, expectations."""

from __future__ import annotations

import math

import pytest
import torch

from turnwise.algo import kl_penalty

D = torch.float64
LOGP = torch.tensor([[-1.0, -2.0]], dtype=D)
REF = torch.tensor([[-1.5, -1.0]], dtype=D)  # log rho = ref - logp = (-0.5, 1)


@pytest.mark.parametrize("estimator, value, grad", [
    ("k1", [0.5, -1.0], [1.0, 1.0]),  # -log rho; d/dlogp = 1
    ("k2", [0.125, 0.5], [0.5, -1.0]),  # (log rho)^2 / 2; d/dlogp = -log rho
    ("k3", [math.exp(-0.5) - 0.5, math.e - 2.0], [1 - math.exp(-0.5), 1 - math.e]),  # rho - 1 - log rho; 1 - rho
])
def test_estimators_by_hand(estimator, value, grad):
    logp = LOGP.clone().requires_grad_(True)
    kl = kl_penalty(logp, REF, estimator)
    kl.sum().backward()
    torch.testing.assert_close(kl.detach(), torch.tensor([value], dtype=D))
    torch.testing.assert_close(logp.grad, torch.tensor([grad], dtype=D))


def test_k1_and_k3_are_unbiased_and_k3_is_never_negative():
    gen = torch.Generator().manual_seed(1)
    log_q = torch.log_softmax(torch.randn(4, 10, generator=gen, dtype=D), dim=-1)  # policy
    log_p = torch.log_softmax(torch.randn(4, 10, generator=gen, dtype=D), dim=-1)  # reference
    exact = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q || p), expectation over the vocabulary
    for est in ["k1", "k3"]:
        expected = (log_q.exp() * kl_penalty(log_q, log_p, est)).sum(-1)
        torch.testing.assert_close(expected, exact)
    assert (kl_penalty(log_q, log_p, "k3") >= 0).all()
    assert (kl_penalty(log_q, log_p, "k2") >= 0).all()


def test_reference_gets_no_gradient_and_extremes_stay_finite():
    ref = torch.tensor([[-1.0, -200.0]], dtype=D, requires_grad=True)
    logp = torch.tensor([[-200.0, -1.0]], dtype=D, requires_grad=True)
    kl = kl_penalty(logp, ref, "k3")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and ref.grad is None


def test_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match="valid names: k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")
    with pytest.raises(ValueError, match="same shape"):
        kl_penalty(LOGP, REF[:, :1], "k1")
