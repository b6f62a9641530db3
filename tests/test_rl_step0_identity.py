"""Step-0 identity: when the trainer's log-probs equal the rollout's, everything off-policy is exact.

The rollout engine records `token_logprobs(logits, tokens, T)` as float32 in the Parquet file;
at step 0 the trainer recomputes the same quantity on the same weights (here: the same logits,
through the fused and chunked path it trains with). Then the PPO ratio must be exactly 1.0, the
TIS weights exactly 1, MIS must keep every token, and the mismatch metrics and k1/k2/k3 KL to a
reference equal to the policy must be exactly 0 -- not "small": any nonzero value means the two
sides do not compute the same thing.
"""

import numpy as np
import pytest
import torch

from miles_core.rl import (
    aggregate_loss,
    grpo_advantages,
    kl_loss,
    kl_penalty,
    logprobs_and_entropy,
    mis_mask,
    mismatch_metrics,
    policy_metrics,
    ppo_clip_loss,
    tis_weights,
    token_logprobs,
)

TEMPERATURE = 0.7


def _step0_batch():
    """bf16 logits [B, T, V] of a 'model', sampled tokens, right-padded mask, one reward per sample."""
    g = torch.Generator().manual_seed(0)
    b, t, v = 8, 12, 64
    logits = (torch.randn(b, t, v, generator=g) * 3).bfloat16().requires_grad_()
    probs = torch.softmax(logits.detach().float() / TEMPERATURE, -1).reshape(-1, v)
    tokens = torch.multinomial(probs, 1, generator=g).reshape(b, t)  # [B, T] int64
    mask = torch.arange(t)[None] < torch.tensor([12, 3, 7, 12, 1, 9, 5, 10])[:, None]  # [B, T] bool
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])  # 2 groups of 4
    return logits, tokens, mask, rewards


def _engine_record(logits, tokens):
    """What the rollout engine stores: float32 log-probs, through a Parquet list<float32> round trip."""
    with torch.no_grad():
        recorded = token_logprobs(logits, tokens, TEMPERATURE)
    stored = np.asarray(recorded.numpy().tolist(), dtype=np.float32)
    return torch.from_numpy(stored)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_equal_logprobs_give_ratio_exactly_one_and_the_plain_policy_gradient(level):
    logits, tokens, mask, rewards = _step0_batch()
    rollout_logp = _engine_record(logits, tokens)
    train_logp, _ = logprobs_and_entropy(logits, tokens, TEMPERATURE, chunk_size=16)
    assert torch.equal(train_logp.detach(), rollout_logp)
    old_logp = train_logp.detach()  # step 0: pi_old is the current policy
    adv = grpo_advantages(rewards).reshape(-1)  # [B]
    out = ppo_clip_loss(train_logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0, ratio_level=level)
    assert (out.ratio == 1.0).all()
    assert not out.clipped.any() and not out.dual_clipped.any()
    assert torch.equal(out.loss, torch.where(mask, -adv[:, None].expand_as(mask), 0.0))
    aggregate_loss(out.loss, mask).backward()
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.float().abs().sum() > 0


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_equal_logprobs_give_unit_tis_weights_and_mis_keeps_every_token(level):
    logits, tokens, mask, _ = _step0_batch()
    rollout_logp = _engine_record(logits, tokens)
    old_logp = token_logprobs(logits.detach(), tokens, TEMPERATURE, chunk_size=7)
    assert torch.equal(tis_weights(old_logp, rollout_logp, mask, cap=2.0, level=level), mask.float())
    assert torch.equal(mis_mask(old_logp, rollout_logp, mask, low=0.999, high=1.001, level=level), mask)


def test_equal_logprobs_give_exactly_zero_mismatch_and_kl_metrics():
    logits, tokens, mask, _ = _step0_batch()
    rollout_logp = _engine_record(logits, tokens)
    train_logp, entropy = logprobs_and_entropy(logits.detach(), tokens, TEMPERATURE, chunk_size=5)
    mismatch = mismatch_metrics(train_logp, rollout_logp, mask)
    assert mismatch == {
        "mismatch/abs_diff_mean": 0.0,
        "mismatch/abs_diff_max": 0.0,
        "mismatch/k3_kl": 0.0,
        "mismatch/ratio_outside_frac": 0.0,
    }
    out = ppo_clip_loss(train_logp, train_logp, torch.ones(8), mask)
    policy = policy_metrics(train_logp, rollout_logp, mask, clipped=out.clipped, entropy=entropy)
    assert policy["policy/approx_kl"] == 0.0 and policy["policy/clip_frac"] == 0.0
    assert policy["policy/entropy"] > 0.0
    # reference model == policy at step 0: every estimator is exactly 0, and so is the KL loss
    for kind in ("k1", "k2", "k3"):
        assert (kl_penalty(train_logp, rollout_logp, mask, kind) == 0).all()
        assert kl_loss(train_logp, rollout_logp, mask, 0.05, kind=kind).item() == 0.0
