"""TIS weights, MIS masks and stale-token handling: hand examples and a float64 loop reference."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import correct_stale, mis_mask, rollout_log_ratio, stale_tokens, tis_weights

NAN = float("nan")


def _hand_batch():
    """Two rows; ratios pi_old / pi_rollout: row 0 = [1.5, 3, 0.25] + pad, row 1 = [3, 1] + 2 pads."""
    ratios = torch.tensor([[1.5, 3.0, 0.25, 1.0], [3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    rollout = torch.tensor([[-0.3, -2.0, -1.1, NAN], [-0.7, -0.2, NAN, NAN]], dtype=torch.float64)
    old = rollout + ratios.log()
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    return old, rollout, mask


def test_tis_hand_example_token_sequence_geometric():
    old, rollout, mask = _hand_batch()
    # token: min(r, 2) -> row 0 [1.5, 2, 0.25], row 1 [2, 1]; padding 0
    want = [[1.5, 2.0, 0.25, 0.0], [2.0, 1.0, 0.0, 0.0]]
    np.testing.assert_allclose(tis_weights(old, rollout, mask, cap=2.0).numpy(), want, rtol=1e-12)
    # sequence: product 1.5 * 3 * 0.25 = 1.125 (< 2); row 1: 3 -> capped at 2
    want = [[1.125, 1.125, 1.125, 0.0], [2.0, 2.0, 0.0, 0.0]]
    np.testing.assert_allclose(tis_weights(old, rollout, mask, level="sequence").numpy(), want, rtol=1e-12)
    # geometric: 1.125^(1/3) = 1.040042; row 1: sqrt(3) = 1.732051
    g0, g1 = 1.125 ** (1 / 3), math.sqrt(3)
    want = [[g0, g0, g0, 0.0], [g1, g1, 0.0, 0.0]]
    np.testing.assert_allclose(tis_weights(old, rollout, mask, level="geometric").numpy(), want, rtol=1e-12)


def test_mis_hand_example_token_sequence_geometric():
    old, rollout, mask = _hand_batch()
    # token, keep r in [0.5, 2]: row 0 [1.5 yes, 3 no, 0.25 no]; row 1 [3 no, 1 yes]
    keep = mis_mask(old, rollout, mask, low=0.5, high=2.0)
    assert keep.tolist() == [[True, False, False, False], [False, True, False, False]]
    # sequence: row 0 product 1.125 kept whole; row 1 product 3 dropped whole
    keep = mis_mask(old, rollout, mask, level="sequence")
    assert keep.tolist() == [[True, True, True, False], [False, False, False, False]]
    # geometric: row 1 sqrt(3) = 1.73 is inside [0.5, 2] -> kept
    keep = mis_mask(old, rollout, mask, level="geometric")
    assert keep.tolist() == [[True, True, True, False], [True, True, False, False]]


def _reference(old, rollout, mask, level):
    """Per-token log ratio broadcast per the level, with python loops, float64."""
    out = np.zeros(old.shape)
    for i in range(old.shape[0]):
        real = [j for j in range(old.shape[1]) if mask[i, j]]
        diffs = [old[i, j] - rollout[i, j] for j in real]
        for k, j in enumerate(real):
            if level == "token":
                out[i, j] = diffs[k]
            else:
                out[i, j] = sum(diffs) / (len(diffs) if level == "geometric" else 1)
    return out


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_tis_and_mis_match_float64_loop_reference_on_random_batches(level):
    g = torch.Generator().manual_seed(0)
    rollout = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 3
    old = rollout + torch.randn(6, 9, generator=g, dtype=torch.float64) * 0.5
    mask = torch.arange(9)[None] < torch.tensor([9, 0, 1, 4, 6, 8])[:, None]
    rollout[~mask] = NAN
    log_r = _reference(old.numpy(), rollout.numpy(), mask.numpy(), level)
    m = mask.numpy()
    want_w = np.where(m, np.minimum(np.exp(log_r), 1.7), 0.0)
    np.testing.assert_allclose(tis_weights(old, rollout, mask, cap=1.7, level=level).numpy(), want_w, rtol=1e-12)
    want_keep = m & (np.exp(log_r) >= 0.8) & (np.exp(log_r) <= 1.25)
    got_keep = mis_mask(old, rollout, mask, low=0.8, high=1.25, level=level).numpy()
    assert np.array_equal(got_keep, want_keep)
    assert want_keep.any() and (m & ~want_keep).any()  # both outcomes exercised


def test_tis_weights_are_detached_and_bad_level_raises():
    old, rollout, mask = _hand_batch()
    old.requires_grad_()
    assert not tis_weights(old, rollout, mask).requires_grad
    with pytest.raises(ValueError, match="importance-sampling level"):
        rollout_log_ratio(old, rollout, mask, "prefix")


def test_stale_tokens_from_per_token_and_per_sample_versions():
    versions = torch.tensor([[3, 3, 4, 4], [4, 4, 4, 9]])  # 9 sits on padding and is ignored
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # newest real version is 4 -> the first two tokens of row 0 came from policy 3
    assert stale_tokens(versions, mask).tolist() == [[True, True, False, False], [False] * 4]
    assert not stale_tokens(versions, mask, current_version=3).any()
    # per-sample versions [2, 5]: row 0's real tokens are stale
    assert stale_tokens(torch.tensor([2, 5]), mask).tolist() == [[True] * 4, [False] * 4]
    assert not stale_tokens(versions, torch.zeros_like(mask)).any()


def test_correct_stale_masks_or_reweights_only_the_stale_tokens():
    # ratios pi_old / pi_rollout = [3, 0.5, 1] + pad; token 0 is stale
    rollout = torch.tensor([[-1.0, -2.0, -0.5, NAN]])
    old = rollout + torch.tensor([[3.0, 0.5, 1.0, 1.0]]).log()
    mask = torch.tensor([[True, True, True, False]])
    stale = torch.tensor([[True, False, False, True]])
    keep, w = correct_stale(mask, stale, old, rollout, mode="mask")
    assert keep.tolist() == [[False, True, True, False]]
    assert w.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    # tis: the stale token gets min(3, 2) = 2; fresh tokens stay 1 (even the 0.5 one); pad 0
    keep, w = correct_stale(mask, stale, old, rollout, mode="tis", cap=2.0)
    assert keep.tolist() == mask.tolist()
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="stale-token mode"):
        correct_stale(mask, stale, old, rollout, mode="drop")
