"""Chosen-token log-probs and entropy from logits: hand values, float64 numpy reference, chunking,
temperature, bf16 upcast, -inf logits, and the entropy bonus."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import entropy_bonus, entropy_from_logits, logprobs_and_entropy, token_logprobs


def _reference(logits: np.ndarray, tokens: np.ndarray, temperature: float):
    """log-probs and entropy per position with explicit max-shifted exp/log, float64."""
    logp_out = np.zeros(tokens.shape)
    ent_out = np.zeros(tokens.shape)
    for idx in np.ndindex(tokens.shape):
        z = logits[idx].astype(np.float64) / temperature
        shifted = z - z.max()
        log_z = math.log(sum(math.exp(v) for v in shifted))
        logq = shifted - log_z
        logp_out[idx] = logq[tokens[idx]]
        ent_out[idx] = -sum(math.exp(v) * v for v in logq)
    return logp_out, ent_out


def test_hand_example_logprob_and_entropy_with_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # [1, 1, 2]
    tokens = torch.tensor([[1]])
    # T = 1: p = [1/4, 3/4]; log p(1) = ln 0.75 = -0.287682
    #   H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    assert token_logprobs(logits, tokens).item() == pytest.approx(-0.287682, abs=1e-6)
    assert entropy_from_logits(logits).item() == pytest.approx(0.562335, abs=1e-6)
    # T = 0.5: logits / T = [0, ln 9] -> p = [0.1, 0.9]; log p(1) = ln 0.9 = -0.105361
    #   H = 0.1 ln 10 + 0.9 ln(10/9) = 0.230259 + 0.094824 = 0.325083
    assert token_logprobs(logits, tokens, 0.5).item() == pytest.approx(-0.105361, abs=1e-6)
    assert entropy_from_logits(logits, 0.5).item() == pytest.approx(0.325083, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logprobs_and_entropy_match_float64_reference_on_random_logits(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 4
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    want_logp, want_ent = _reference(logits.numpy(), tokens.numpy(), temperature)
    logp, ent = logprobs_and_entropy(logits, tokens, temperature)
    np.testing.assert_allclose(logp.numpy(), want_logp, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ent.numpy(), want_ent, rtol=1e-12, atol=1e-12)
    # float32 logits: the same within float32 precision
    logp32 = token_logprobs(logits.float(), tokens, temperature)
    assert logp32.dtype == torch.float32
    np.testing.assert_allclose(logp32.double().numpy(), want_logp, rtol=1e-5, atol=1e-5)


def test_chunked_results_are_bitwise_equal_to_unchunked_and_fused_equals_separate():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 50, generator=g)
    tokens = torch.randint(0, 50, (4, 7), generator=g)
    full_logp, full_ent = logprobs_and_entropy(logits, tokens, 0.8)
    for chunk in (1, 5, 28, 1000):
        assert torch.equal(token_logprobs(logits, tokens, 0.8, chunk_size=chunk), full_logp)
        assert torch.equal(entropy_from_logits(logits, 0.8, chunk_size=chunk), full_ent)
        chunked = logprobs_and_entropy(logits, tokens, 0.8, chunk_size=chunk)
        assert torch.equal(chunked[0], full_logp) and torch.equal(chunked[1], full_ent)
    assert torch.equal(token_logprobs(logits, tokens, 0.8), full_logp)
    assert torch.equal(entropy_from_logits(logits, 0.8), full_ent)


def test_recipe_is_float32_upcast_then_divide_by_temperature_then_log_softmax_gather():
    # This is the recipe the rollout engine records with; the trainer must reproduce it bit for bit.
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 6, 33, generator=g) * 3).bfloat16()
    tokens = torch.randint(0, 33, (2, 6), generator=g)
    recipe = torch.log_softmax(logits.float() / 0.6, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    got = token_logprobs(logits, tokens, 0.6)
    assert got.dtype == torch.float32
    assert torch.equal(got, recipe)


def test_entropy_is_stable_for_masked_vocab_and_huge_logits_with_finite_gradients():
    logits = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")], [1e4, -1e4, 1e4, 0.0]]], requires_grad=True)
    ent = entropy_from_logits(logits)
    # row 0: two equal live entries -> ln 2; row 1: two equal dominant entries -> ln 2
    np.testing.assert_allclose(ent.detach().numpy(), [[math.log(2), math.log(2)]], rtol=1e-6)
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    logp = token_logprobs(logits, torch.tensor([[1, 2]]))
    assert logp.detach()[0].tolist() == pytest.approx([-math.log(2), -math.log(2)])


def test_entropy_gradient_matches_finite_differences():
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, 0.9), (logits,))
    tokens = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, 0.9, chunk_size=4), (logits,))


def test_entropy_bonus_is_negative_coef_times_mean_entropy():
    ent = torch.tensor([[1.0, 3.0, float("nan")], [2.0, float("nan"), float("nan")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # token-mean entropy (1 + 3 + 2) / 3 = 2 -> bonus term -0.01 * 2 = -0.02
    assert entropy_bonus(ent, mask, 0.01).item() == pytest.approx(-0.02)
    # seq-mean-token-mean: (2 + 2) / 2 = 2 as well; coef 0 -> exactly 0
    assert entropy_bonus(ent, mask, 0.01, mode="seq-mean-token-mean").item() == pytest.approx(-0.02)
    assert entropy_bonus(ent, mask, 0.0).item() == 0.0


def test_empty_batch_gives_empty_outputs():
    logits = torch.zeros(0, 4, 9)
    tokens = torch.zeros(0, 4, dtype=torch.long)
    logp, ent = logprobs_and_entropy(logits, tokens, chunk_size=3)
    assert logp.shape == (0, 4) and ent.shape == (0, 4)
