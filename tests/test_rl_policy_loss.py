"""PPO clip loss (clip-higher, dual clip, GSPO ratio): hand examples, float64 loop reference, gradients."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import aggregate_loss, log_ratio, ppo_clip_loss

LN = math.log
NAN, INF = float("nan"), float("inf")


def _hand_tokens():
    """One row of 7 tokens (+1 pad); old_logp = 0 so ratio = exp(logp)."""
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 4.0, 2.0, 1.0]
    adv = [1.0, 1.0, -1.0, -1.0, 2.0, -1.0, -0.5, 9.0]
    logp = torch.tensor([[LN(r) for r in ratios]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 7 + [False]])
    return logp, torch.zeros_like(logp), torch.tensor([adv], dtype=torch.float64), mask


def test_ppo_clip_higher_and_dual_clip_hand_example_values_flags_and_gradients():
    logp, old, adv, mask = _hand_tokens()
    out = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    # token: ratio, A -> -A*r vs -A*clip(r, 0.8, 1.28) -> max [-> dual cap -A*3 for A < 0]
    # a: 1.5, +1 -> -1.5 vs -1.28 -> -1.28 clipped      b: 0.5, +1 -> -0.5 vs -0.8 -> -0.5
    # c: 0.5, -1 -> 0.5 vs 0.8 -> 0.8 clipped           d: 1.5, -1 -> 1.5 vs 1.28 -> 1.5
    # e: 1.1, +2 -> -2.2 (inside the range)             f: 4.0, -1 -> 4.0 -> cap 3.0 (dual)
    # g: 2.0, -0.5 -> 1.0 vs 0.64 -> 1.0, cap 1.5 does not bind;   pad -> 0
    expected = [-1.28, -0.5, 0.8, 1.5, -2.2, 3.0, 1.0, 0.0]
    np.testing.assert_allclose(out.loss[0].detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert out.clipped[0].tolist() == [True, False, True, False, False, False, False, False]
    assert out.dual_clipped[0].tolist() == [False, False, False, False, False, True, False, False]
    assert out.ratio[0, 7].item() == 1.0  # padding
    out.loss.sum().backward()
    # d(-A r)/dlogp = -A r where unclipped; 0 where a clip bound (or the dual cap) is active
    expected_grad = [0.0, -0.5, 0.0, 1.5, -2.2, 0.0, 1.0, 0.0]
    np.testing.assert_allclose(logp.grad[0].numpy(), expected_grad, rtol=1e-12, atol=1e-12)


def test_symmetric_clip_by_default_and_no_dual_clip():
    logp, old, adv, mask = _hand_tokens()
    out = ppo_clip_loss(logp, old, adv, mask, eps_low=0.2)
    # a clips at 1.2 now; f keeps its unbounded loss 4.0 without dual clip
    assert out.loss[0, 0].item() == pytest.approx(-1.2)
    assert out.loss[0, 5].item() == pytest.approx(4.0)
    assert not out.dual_clipped.any()


def test_gspo_sequence_ratio_hand_example():
    # seq 0: log ratios [ln 2, 0] -> mean ln2 / 2 -> s = sqrt(2) = 1.414214 on both tokens
    # seq 1: log ratios [ln 4] * 3 -> s = 4 on all three; A = +1, eps_high 0.5 -> clipped at 1.5
    logp = torch.tensor([[LN(2), 0.0, 0.0], [LN(4), LN(4), LN(4)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros_like(logp)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = ppo_clip_loss(logp, old, adv, mask, eps_low=0.5, eps_high=0.5, ratio_level="sequence")
    s = math.sqrt(2)
    np.testing.assert_allclose(out.ratio.detach().numpy(), [[s, s, 1.0], [4.0, 4.0, 4.0]], rtol=1e-12)
    np.testing.assert_allclose(out.loss.detach().numpy(), [[-s, -s, 0.0], [-1.5, -1.5, -1.5]], rtol=1e-12)
    assert out.clipped.tolist() == [[False, False, False], [True, True, True]]
    # GSPO objective = seq-mean-token-mean: (-s + -1.5) / 2. d/dlogp_t (seq 0) = 1/2 * -s * 1/2
    aggregate_loss(out.loss, mask, "seq-mean-token-mean").backward()
    np.testing.assert_allclose(logp.grad.numpy(), [[-s / 4, -s / 4, 0.0], [0.0, 0.0, 0.0]], rtol=1e-12)


def _reference_loss(logp, old, adv, mask, w, eps_low, eps_high, dual, level):
    """Per-token loss and clip flags with python loops, float64."""
    b, t = logp.shape
    loss, clipped, dual_flags = np.zeros((b, t)), np.zeros((b, t), bool), np.zeros((b, t), bool)
    for i in range(b):
        real = [j for j in range(t) if mask[i, j]]
        seq_lr = sum(logp[i, j] - old[i, j] for j in real) / max(len(real), 1)
        for j in real:
            r = math.exp(seq_lr if level == "sequence" else logp[i, j] - old[i, j])
            a = adv[i, j]
            plain, bounded = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            value = max(plain, bounded)
            clipped[i, j] = bounded > plain
            if dual is not None and a < 0 and value > -a * dual:
                value, dual_flags[i, j] = -a * dual, True
            loss[i, j] = value * w[i, j]
    return loss, clipped, dual_flags


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_loss_matches_float64_loop_reference_on_random_masked_batches(level, dual):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 10
    lengths = torch.tensor([10, 0, 3, 7, 1, 9])
    mask = torch.arange(t)[None] < lengths[:, None]
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    w = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    logp[~mask], old[~mask] = float("nan"), float("inf")  # padding garbage must not leak
    w[~mask] = float("inf")
    lo, hi = (0.2, 0.3) if level == "token" else (0.02, 0.03)  # sequence ratios move less (GSPO)
    out = ppo_clip_loss(logp, old, adv, mask, eps_low=lo, eps_high=hi, dual_clip=dual, ratio_level=level, weights=w)
    args = (logp.numpy(), old.numpy(), adv.numpy(), mask.numpy(), w.numpy(), lo, hi, dual, level)
    want_loss, want_clipped, want_dual = _reference_loss(*args)
    np.testing.assert_allclose(out.loss.numpy(), want_loss, rtol=1e-12, atol=1e-12)
    assert np.array_equal(out.clipped.numpy(), want_clipped)
    assert np.array_equal(out.dual_clipped.numpy(), want_dual)
    assert out.clipped.any() and (~out.clipped & mask).any()  # both regions exercised


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ppo_gradient_matches_finite_differences(level):
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [True, True, True, True]])
    logp = (-torch.rand(3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(3, generator=g, dtype=torch.float64)

    def objective(x):
        out = ppo_clip_loss(x, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=2.0, ratio_level=level)
        return aggregate_loss(out.loss, mask, "seq-mean-token-mean")

    assert torch.autograd.gradcheck(objective, (logp,), eps=1e-7, atol=1e-6)


def test_padding_garbage_gives_finite_loss_and_zero_gradient_there():
    logp = torch.tensor([[-1.0, float("nan"), float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("inf"), 0.0]])
    adv = torch.tensor([[1.0, float("nan"), float("inf")]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    for level in ("token", "sequence"):
        logp.grad = None
        out = ppo_clip_loss(
            logp, old, adv, mask, ratio_level=level, dual_clip=3.0, weights=torch.tensor([[1.0, INF, NAN]])
        )
        aggregate_loss(out.loss, mask).backward()
        assert torch.isfinite(out.loss).all() and torch.isfinite(logp.grad).all()
        assert logp.grad[0, 1:].tolist() == [0.0, 0.0]


def test_sequence_advantages_broadcast_like_token_advantages_and_weights_are_detached():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 5, generator=g).requires_grad_()
    old = logp.detach() + 0.1
    mask = torch.ones(3, 5, dtype=torch.bool)
    adv = torch.randn(3, generator=g)
    w = torch.rand(3, 5, generator=g).requires_grad_()
    a = ppo_clip_loss(logp, old, adv, mask, weights=w)
    b = ppo_clip_loss(logp, old, adv[:, None].expand(3, 5), mask, weights=w)
    assert torch.equal(a.loss, b.loss)
    a.loss.sum().backward()
    assert w.grad is None and logp.grad is not None


def test_log_ratio_levels_and_errors():
    logp = torch.tensor([[0.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    assert log_ratio(logp, torch.zeros_like(logp), mask).tolist() == [[0.0, 1.0, 0.0]]
    assert log_ratio(logp, torch.zeros_like(logp), mask, "sequence").tolist() == [[0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="ratio level"):
        log_ratio(logp, logp, mask, "group")
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(logp, logp, torch.zeros(1), mask, dual_clip=1.0)
