"""GRPO/Dr.GRPO advantages, whitening, degenerate groups: hand examples and float64 numpy references."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import degenerate_groups, dr_grpo_advantages, grpo_advantages, informative_mask, whiten


def _reference_advantages(rewards: np.ndarray, ids: np.ndarray, normalize_std: bool, eps: float) -> np.ndarray:
    """Loop over the unique ids; numpy's ddof=1 std (0 for a group of one)."""
    out = np.zeros_like(rewards, dtype=np.float64)
    for gid in np.unique(ids):
        idx = np.nonzero(ids == gid)[0]
        r = rewards[idx].astype(np.float64)
        adv = r - r.mean()
        if normalize_std:
            std = r.std(ddof=1) if len(r) > 1 else 0.0
            adv = adv / (std + eps)
        out[idx] = adv
    return out


def test_grpo_hand_example_two_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # group 0: mean 0.5, deviations +-0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735
    #   -> +-0.5 / 0.57735 = +-0.866025 (eps 1e-6 is below the tolerance)
    # group 1: all equal -> deviations 0 -> advantage 0 (std 0, divided by eps only)
    adv = grpo_advantages(rewards)
    expected = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert (adv[1] == 0).all()
    # Dr.GRPO: no std division -> +-0.5 and 0
    expected_dr = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(dr_grpo_advantages(rewards), expected_dr)
    assert torch.equal(grpo_advantages(rewards, normalize_std=False), expected_dr)


def test_group_id_form_with_shuffled_noncontiguous_ids_equals_row_form():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    perm = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])
    flat = rewards.reshape(-1)[perm]
    ids = torch.tensor([42, 42, 42, 42, 7, 7, 7, 7])[perm]  # arbitrary ids, interleaved
    for normalize in (True, False):
        by_row = grpo_advantages(rewards, normalize_std=normalize).reshape(-1)[perm]
        by_id = grpo_advantages(flat, ids, normalize_std=normalize)
        torch.testing.assert_close(by_id, by_row, rtol=1e-6, atol=1e-7)


def test_group_of_one_sample_gets_zero_advantage_not_nan():
    adv = grpo_advantages(torch.tensor([0.3, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    # group 0 = [0.3]: 0.3 - 0.3 = 0; group 1 = [1, 2]: mean 1.5, std sqrt(0.5) -> -+0.707107
    torch.testing.assert_close(adv, torch.tensor([0.0, -0.707107, 0.707107]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_advantages_match_float64_numpy_reference_with_ragged_groups(normalize_std):
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = rng.integers(0, 9, size=40) * 13 - 50  # ragged groups, negative and sparse ids
        rewards = rng.normal(size=40)
        rewards[ids == ids[0]] = 0.7  # one degenerate group
        got = grpo_advantages(torch.from_numpy(rewards), torch.from_numpy(ids), normalize_std=normalize_std)
        want = _reference_advantages(rewards, ids, normalize_std, 1e-6)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    grid = rng.normal(size=(6, 8))
    got = grpo_advantages(torch.from_numpy(grid), normalize_std=normalize_std).numpy()
    want = _reference_advantages(grid.reshape(-1), np.repeat(np.arange(6), 8), normalize_std, 1e-6)
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-12, atol=1e-12)


def test_advantage_shape_errors_are_clear():
    with pytest.raises(ValueError, match="num_groups, group_size"):
        grpo_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))


def test_whiten_hand_example_and_masked_entries():
    # [1, 2, 3]: mean 2, sample std 1 -> [-1, 0, 1] (/ (1 + 1e-6))
    torch.testing.assert_close(whiten(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]))
    x = torch.tensor([[1.0, 3.0, float("nan")], [2.0, float("inf"), 100.0]])
    m = torch.tensor([[True, True, False], [True, False, False]])
    # selected [1, 3, 2]: mean 2, std 1 -> [-1, 1, 0]; everything else 0
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert (whiten(x, torch.zeros_like(m)) == 0).all()


def test_whiten_matches_float64_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(5, 7))
    m = rng.random((5, 7)) < 0.6
    sel = x[m]
    want = np.where(m, (x - sel.mean()) / (sel.std(ddof=1) + 1e-6), 0.0)
    got = whiten(torch.from_numpy(x), torch.from_numpy(m)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_degenerate_groups_reported_in_both_forms():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5000001]])
    assert degenerate_groups(rewards).tolist() == [True, False, True, False]
    # id form: groups in sorted id order: id 2 -> [1, 1], id 5 -> [0, 1], id 9 -> [3]
    flat = torch.tensor([0.0, 1.0, 1.0, 1.0, 3.0])
    ids = torch.tensor([5, 2, 5, 2, 9])
    assert degenerate_groups(flat, ids).tolist() == [True, False, True]


def test_informative_mask_is_the_dapo_dynamic_sampling_selection():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    keep = informative_mask(rewards)
    assert keep.tolist() == [False, True, False, True]  # one flag per group row
    kept = rewards[keep]  # DAPO keeps these and samples more prompts until the batch is full
    assert not degenerate_groups(kept).any()
    flat = rewards.reshape(-1)
    ids = torch.arange(4).repeat_interleave(2)
    assert informative_mask(flat, ids).tolist() == [False, False, True, True, False, False, True, True]


def test_float32_rewards_match_float64_within_float32_precision():
    rng = np.random.default_rng(2)
    r = rng.integers(0, 2, size=(16, 8)).astype(np.float64)
    got = grpo_advantages(torch.from_numpy(r).float()).double().numpy()
    want = _reference_advantages(r.reshape(-1), np.repeat(np.arange(16), 8), True, 1e-6).reshape(16, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(got.sum()))
