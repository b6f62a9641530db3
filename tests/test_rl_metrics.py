"""Metric dicts: hand examples, a float64 numpy reference for the mismatch, 0.0 on empty masks."""

import math

import numpy as np
import pytest
import torch

from miles_core.rl import length_metrics, mismatch_metrics, off_policy_metrics, policy_metrics, reward_metrics

NAN = float("nan")


def _all_python_floats(d: dict) -> bool:
    return all(type(v) is float and math.isfinite(v) for v in d.values())


def test_mismatch_metrics_hand_example():
    # real tokens: (pi_train 0.9, pi_rollout 0.3) -> diff ln 3 = 1.098612, ratio 3 (outside [0.5, 2])
    #              (0.5, 0.5)                     -> diff 0, ratio 1
    # mean |diff| = 0.549306, max 1.098612; k3 of KL(rollout || train): r = 3 -> 3 - 1 - ln 3 = 0.901388,
    # mean over 2 tokens = 0.450694; ratio_outside_frac = 1/2
    train = torch.tensor([[math.log(0.9), math.log(0.5), NAN]])
    rollout = torch.tensor([[math.log(0.3), math.log(0.5), 5.0]])
    mask = torch.tensor([[True, True, False]])
    got = mismatch_metrics(train, rollout, mask)
    assert _all_python_floats(got)
    assert got["mismatch/abs_diff_mean"] == pytest.approx(0.549306, abs=1e-6)
    assert got["mismatch/abs_diff_max"] == pytest.approx(1.098612, abs=1e-6)
    assert got["mismatch/k3_kl"] == pytest.approx(0.450694, abs=1e-6)
    assert got["mismatch/ratio_outside_frac"] == 0.5


def test_mismatch_metrics_match_float64_numpy_reference():
    rng = np.random.default_rng(0)
    rollout = -rng.random((5, 12)) * 4
    train = rollout + rng.normal(0, 0.6, size=(5, 12))
    mask = rng.random((5, 12)) < 0.7
    d = (train - rollout)[mask]
    r = np.exp(d)
    got = mismatch_metrics(torch.from_numpy(train), torch.from_numpy(rollout), torch.from_numpy(mask))
    assert got["mismatch/abs_diff_mean"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
    assert got["mismatch/abs_diff_max"] == pytest.approx(np.abs(d).max(), rel=1e-12)
    assert got["mismatch/k3_kl"] == pytest.approx(np.mean(r - 1 - np.log(r)), rel=1e-10)
    assert got["mismatch/ratio_outside_frac"] == pytest.approx(np.mean((r < 0.5) | (r > 2)), rel=1e-12)


def test_policy_metrics_hand_example():
    # token 0: pi_old 0.5 -> pi 0.25, r = 0.5: k3 = r - 1 - ln r = 0.5 - 1 + 0.693147 = 0.193147
    # token 1: unchanged -> 0. approx_kl = 0.096574; clip_frac 1/2; dual 0; entropy (1 + 3) / 2 = 2
    logp = torch.tensor([[math.log(0.25), -1.0, NAN]])
    old = torch.tensor([[math.log(0.5), -1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    got = policy_metrics(
        logp,
        old,
        mask,
        clipped=torch.tensor([[True, False, True]]),
        dual_clipped=torch.zeros(1, 3, dtype=torch.bool),
        entropy=torch.tensor([[1.0, 3.0, NAN]]),
    )
    assert _all_python_floats(got)
    assert got["policy/approx_kl"] == pytest.approx(0.096574, abs=1e-6)
    assert got["policy/clip_frac"] == 0.5
    assert got["policy/dual_clip_frac"] == 0.0
    assert got["policy/entropy"] == 2.0


def test_length_reward_and_off_policy_metrics_hand_examples():
    mask = torch.arange(4)[None] < torch.tensor([3, 1, 0, 4])[:, None]  # lengths 3, 1, 0, 4
    got = length_metrics(mask, max_len=4)
    # mean 8/4 = 2, min 0, max 4, one of four hit max_len
    assert got == {
        "response/len_mean": 2.0,
        "response/len_min": 0.0,
        "response/len_max": 4.0,
        "response/truncated_frac": 0.25,
    }
    # rewards [1, 0, 1, 1]: mean 0.75, sample std sqrt((3 * 0.0625 + 0.5625) / 3) = 0.5; group [1, 1] degenerate
    got = reward_metrics(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert got["reward/mean"] == 0.75 and got["reward/std"] == pytest.approx(0.5)
    assert (got["reward/min"], got["reward/max"], got["reward/degenerate_group_frac"]) == (0.0, 1.0, 0.5)
    got = reward_metrics(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert got["reward/degenerate_group_frac"] == 0.5
    assert "reward/degenerate_group_frac" not in reward_metrics(torch.tensor([1.0, 0.0]))
    # TIS weights [1.5, 2, 0.25] (+pad), MIS keeps the first only: mean 1.25, max 2, keep 1/3
    w = torch.tensor([[1.5, 2.0, 0.25, 9.0]])
    keep = torch.tensor([[True, False, False, True]])
    got = off_policy_metrics(w, keep, torch.tensor([[True, True, True, False]]))
    assert got["off_policy/tis_weight_mean"] == 1.25
    assert got["off_policy/tis_weight_max"] == 2.0
    assert got["off_policy/mis_keep_frac"] == pytest.approx(1 / 3)


def test_every_metric_is_zero_not_nan_on_empty_masks_and_batches():
    x = torch.full((2, 3), NAN)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    dicts = [
        mismatch_metrics(x, x, empty),
        policy_metrics(x, x, empty, clipped=empty, dual_clipped=empty, entropy=x),
        off_policy_metrics(x, empty, empty),
        length_metrics(torch.zeros(0, 3, dtype=torch.bool), max_len=3),
        reward_metrics(torch.zeros(0)),
        reward_metrics(torch.zeros(0, 4)),
    ]
    for d in dicts:
        assert d and _all_python_floats(d) and all(v == 0.0 for v in d.values()), d
