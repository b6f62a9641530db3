"""KL estimators k1/k2/k3 and the KL loss term: hand values, exact expectations, float64 reference."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import kl_loss, kl_penalty

LN2 = math.log(2)


def test_k1_k2_k3_hand_example_both_directions():
    # token 0: pi = 0.5, pi_ref = 0.25 -> d = log(pi/pi_ref) = ln 2 = 0.693147
    #   k1 = 0.693147, k2 = 0.693147^2 / 2 = 0.240227, k3 = e^-d - 1 + d = 0.5 - 1 + 0.693147 = 0.193147
    # token 1: pi = 0.25, pi_ref = 0.5 -> d = -ln 2
    #   k1 = -0.693147, k2 = 0.240227, k3 = 2 - 1 - 0.693147 = 0.306853
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 7.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    expected = {
        "k1": [0.693147, -0.693147, 0.0],
        "k2": [0.240227, 0.240227, 0.0],
        "k3": [0.193147, 0.306853, 0.0],
    }
    for kind, want in expected.items():
        np.testing.assert_allclose(kl_penalty(logp, ref, mask, kind)[0].numpy(), want, atol=1e-6)


def test_k1_and_k3_expectations_under_pi_equal_the_exact_kl():
    # E_{x~p}[k] summed exactly over a small vocabulary (no sampling): k1 and k3 are unbiased.
    rng = np.random.default_rng(0)
    for _ in range(5):
        p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
        exact = float(np.sum(p * np.log(p / q)))
        logp = torch.from_numpy(np.log(p))[None]  # [1, V]: each "token" is one vocabulary entry
        ref = torch.from_numpy(np.log(q))[None]
        mask = torch.ones_like(logp, dtype=torch.bool)
        for kind in ("k1", "k3"):
            expectation = float((torch.from_numpy(p) * kl_penalty(logp, ref, mask, kind)[0]).sum())
            assert expectation == pytest.approx(exact, rel=1e-10)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_penalty_matches_float64_loop_reference_and_k3_is_nonnegative(kind):
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(5, 8, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(5, 8, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(5, 8, generator=g) < 0.7
    got = kl_penalty(logp, ref, mask, kind).numpy()
    want = np.zeros((5, 8))
    for i in range(5):
        for j in range(8):
            if mask[i, j]:
                log_r = float(ref[i, j] - logp[i, j])  # log(pi_ref / pi)
                want[i, j] = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": math.exp(log_r) - 1 - log_r}[kind]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    if kind == "k3":
        assert (got >= 0).all()


def test_kl_penalty_is_exactly_zero_for_equal_logprobs():
    logp = torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for kind in ("k1", "k2", "k3"):
        assert (kl_penalty(logp, logp.clone(), mask, kind) == 0).all()


def test_kl_loss_coefficient_aggregation_and_gradient():
    logp = torch.tensor([[math.log(0.5), math.log(0.25), 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.5), float("inf")]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    # k3 token-mean = (0.193147 + 0.306853) / 2 = 0.25; times coef 0.1 = 0.025
    loss = kl_loss(logp, ref, mask, 0.1, kind="k3")
    assert loss.item() == pytest.approx(0.025, abs=1e-7)
    loss.backward()
    # d k3 / d logp = 1 - e^-d: token 0: 1 - 0.5 = 0.5, token 1: 1 - 2 = -1; times 0.1 / 2 tokens
    np.testing.assert_allclose(logp.grad[0].numpy(), [0.025, -0.05, 0.0], rtol=1e-12)


def test_kl_loss_with_zero_coef_needs_no_reference_and_nonzero_coef_does():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    out = kl_loss(logp, None, mask, 0.0)
    assert out.item() == 0.0 and out.dim() == 0
    with pytest.raises(ValueError, match="ref_logp"):
        kl_loss(logp, None, mask, 0.01)
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(logp, logp, mask, "k4")
