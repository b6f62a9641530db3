"""Masked reductions and loss aggregation: hand examples, a float64 loop reference, padding safety."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import AGG_MODES, aggregate_loss
from miles_core.rl.masking import masked_max, masked_mean, masked_min, masked_std, masked_sum

NAN, INF = float("nan"), float("inf")


def _padded_batch(seed: int, b: int = 7, t: int = 11):
    """Random float64 loss [B, T] and a right-padded mask with one full and one empty row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = t, 0
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B, T] bool
    loss = torch.randn(b, t, generator=g, dtype=torch.float64)
    return loss, mask


def _reference(loss: np.ndarray, mask: np.ndarray, mode: str, norm=None, denom=None) -> float:
    """Python loops over sequences and tokens, float64."""
    b, t = loss.shape
    seq_values, total, n_tokens = [], 0.0, 0
    for i in range(b):
        toks = [float(loss[i, j]) for j in range(t) if mask[i, j]]
        total += sum(toks)
        n_tokens += len(toks)
        if toks:
            divisor = len(toks) if mode == "seq-mean-token-mean" else (t if norm is None else norm)
            seq_values.append(sum(toks) / divisor)
    if mode == "token-mean":
        return total / (denom if denom is not None else max(n_tokens, 1))
    return sum(seq_values) / (denom if denom is not None else max(len(seq_values), 1))


def test_aggregate_hand_example_each_mode_with_nan_inf_padding():
    # real tokens: row 0 = [1, 2, 3], row 1 = [4]; padding holds NaN/inf and must not leak.
    loss = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, INF, NAN, -INF]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)  # float mask works too
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(2.5)
    # seq-mean-token-mean: (6/3 + 4/1) / 2 = (2 + 4) / 2 = 3
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    # seq-mean-token-sum-norm, norm = T = 4: (6/4 + 4/4) / 2 = 1.25
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(1.25)
    # ... with a given constant 2: (6/2 + 4/2) / 2 = 2.5
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm=2).item() == pytest.approx(2.5)
    # global denominators: token-mean 10 / 8 = 1.25; seq-mean-token-mean 6 / 4 = 1.5
    assert aggregate_loss(loss, mask, "token-mean", denom=8).item() == pytest.approx(1.25)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean", denom=4).item() == pytest.approx(1.5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_gradient_is_finite_and_zero_on_nan_padding(mode):
    loss = torch.tensor([[1.0, 2.0, NAN], [INF, NAN, NAN]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    aggregate_loss(loss, mask, mode).backward()
    assert torch.isfinite(loss.grad).all()
    assert (loss.grad[~mask] == 0).all()
    assert (loss.grad[mask] > 0).all()


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_float64_loop_reference_on_random_masked_batches(mode):
    for seed in range(5):
        loss, mask = _padded_batch(seed)
        loss_np, mask_np = loss.numpy(), mask.numpy()
        got = aggregate_loss(loss, mask, mode).item()
        assert got == pytest.approx(_reference(loss_np, mask_np, mode), rel=1e-12, abs=1e-12)
        got = aggregate_loss(loss, mask, mode, norm=5.0, denom=13.0).item()
        assert got == pytest.approx(_reference(loss_np, mask_np, mode, 5.0, 13.0), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_with_global_denom_sum_to_the_full_batch_loss(mode):
    loss, mask = _padded_batch(3, b=8)
    full = aggregate_loss(loss, mask, mode)
    denom = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
    norm = float(mask.shape[-1])
    parts = [aggregate_loss(loss[i : i + 3], mask[i : i + 3], mode, norm, denom) for i in range(0, 8, 3)]
    assert torch.stack(parts).sum().item() == pytest.approx(full.item(), rel=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_of_empty_mask_is_zero_not_nan(mode):
    loss = torch.full((2, 3), NAN, requires_grad=True)
    out = aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), mode)
    assert out.item() == 0.0
    out.backward()
    assert (loss.grad == 0).all()


def test_unknown_aggregation_mode_raises():
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate_loss(torch.zeros(1, 2), torch.ones(1, 2), "sum")


def test_masked_reductions_hand_example_and_empty_masks():
    x = torch.tensor([[1.0, 5.0, NAN], [-2.0, INF, 0.0]])
    m = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_sum(x, m).item() == 4.0  # 1 + 5 - 2 + 0
    assert masked_mean(x, m).item() == 1.0  # 4 / 4
    assert masked_mean(x, m, dim=-1).tolist() == [3.0, -1.0]
    assert masked_max(x, m).item() == 5.0
    assert masked_min(x, m).item() == -2.0
    # sample std of [1, 5, -2, 0]: mean 1, squares 0 + 16 + 9 + 1 = 26, / 3 -> sqrt(26/3)
    assert masked_std(x, m).item() == pytest.approx(math.sqrt(26 / 3))
    empty = torch.zeros_like(m)
    for fn in (masked_sum, masked_mean, masked_max, masked_min, masked_std):
        assert fn(x, empty).item() == 0.0
    assert masked_mean(x, empty, dim=-1).tolist() == [0.0, 0.0]
