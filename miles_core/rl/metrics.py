"""Training metrics as dicts of python floats, masked-aware, 0 (never NaN) on empty input.

The train-vs-rollout mismatch is the health signal of train-inference alignment: with identical
weights and kernels it is exactly 0 (see the step-0 test); a drift in it points at a kernel,
a quantization or a routing difference long before the reward curve shows anything.
Keys are namespaced (`mismatch/...`, `policy/...`) so that the trainer can merge the dicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miles_core.rl.advantages import degenerate_groups
from miles_core.rl.kl import kl_penalty
from miles_core.rl.masking import (
    as_bool,
    masked_count,
    masked_fill_zero,
    masked_max,
    masked_mean,
    masked_min,
    masked_std,
)


def _f(x: Tensor) -> float:
    return float(x.detach().double())


@torch.no_grad()
def mismatch_metrics(
    train_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, low: float = 0.5, high: float = 2.0
) -> dict[str, float]:
    """Train-vs-rollout log-prob mismatch over real tokens.

    train_logp, rollout_logp: [B, T] float; mask: [B, T]. k3_kl estimates KL(rollout || train)
    with the rollout's own samples; ratio_outside_frac counts tokens with pi_train / pi_rollout
    outside [low, high].
    """
    m = as_bool(mask)
    diff = masked_fill_zero(train_logp.double() - rollout_logp.double(), m)  # [B, T]
    ratio = torch.exp(diff)
    outside = (ratio < low) | (ratio > high)
    return {
        "mismatch/abs_diff_mean": _f(masked_mean(diff.abs(), m)),
        "mismatch/abs_diff_max": _f(masked_max(diff.abs(), m)),
        "mismatch/k3_kl": _f(masked_mean(kl_penalty(rollout_logp.double(), train_logp.double(), m, "k3"), m)),
        "mismatch/ratio_outside_frac": _f(masked_mean(outside.double(), m)),
    }


@torch.no_grad()
def policy_metrics(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    *,
    clipped: Tensor | None = None,
    dual_clipped: Tensor | None = None,
    entropy: Tensor | None = None,
) -> dict[str, float]:
    """Policy-update metrics over real tokens.

    logp, old_logp: [B, T]; clipped, dual_clipped: [B, T] bool from `ppo_clip_loss`;
    entropy: [B, T]. approx_kl is k3 of KL(pi_old || pi) (Schulman's PPO approx KL).
    """
    m = as_bool(mask)
    out = {"policy/approx_kl": _f(masked_mean(kl_penalty(old_logp.double(), logp.double(), m, "k3"), m))}
    if clipped is not None:
        out["policy/clip_frac"] = _f(masked_mean(as_bool(clipped).double(), m))
    if dual_clipped is not None:
        out["policy/dual_clip_frac"] = _f(masked_mean(as_bool(dual_clipped).double(), m))
    if entropy is not None:
        out["policy/entropy"] = _f(masked_mean(entropy.double(), m))
    return out


@torch.no_grad()
def off_policy_metrics(weights: Tensor, keep: Tensor, mask: Tensor) -> dict[str, float]:
    """TIS/MIS summary: mean and max TIS weight, and the fraction of real tokens MIS kept.

    weights: [B, T] float from `tis_weights`; keep: [B, T] bool from `mis_mask`; mask: [B, T].
    """
    m = as_bool(mask)
    return {
        "off_policy/tis_weight_mean": _f(masked_mean(weights.double(), m)),
        "off_policy/tis_weight_max": _f(masked_max(weights.double(), m)),
        "off_policy/mis_keep_frac": _f(masked_mean((as_bool(keep) & m).double(), m)),
    }


@torch.no_grad()
def length_metrics(mask: Tensor, max_len: int | None = None) -> dict[str, float]:
    """Response-length stats over the batch; `max_len` adds the fraction that hit it (truncated).

    mask: [B, T] marking each response's tokens.
    """
    lengths = masked_count(mask, dim=-1).double()  # [B]
    every = torch.ones_like(lengths, dtype=torch.bool)
    out = {
        "response/len_mean": _f(masked_mean(lengths, every)),
        "response/len_min": _f(masked_min(lengths, every)),
        "response/len_max": _f(masked_max(lengths, every)),
    }
    if max_len is not None:
        out["response/truncated_frac"] = _f(masked_mean((lengths >= max_len).double(), every))
    return out


@torch.no_grad()
def reward_metrics(rewards: Tensor, group_ids: Tensor | None = None) -> dict[str, float]:
    """Reward stats (mean, sample std, min, max) and, for grouped rewards, the degenerate fraction.

    rewards: [G, S] (grouped by row), [N] with group_ids [N] (grouped by id), or [N] alone.
    `reward/degenerate_group_frac` is the fraction of groups whose rewards are all equal.
    """
    flat = rewards.reshape(-1).double()  # [N]
    every = torch.ones_like(flat, dtype=torch.bool)
    out = {
        "reward/mean": _f(masked_mean(flat, every)),
        "reward/std": _f(masked_std(flat, every)),
        "reward/min": _f(masked_min(flat, every)),
        "reward/max": _f(masked_max(flat, every)),
    }
    if flat.numel() and (group_ids is not None or rewards.dim() == 2):
        out["reward/degenerate_group_frac"] = _f(degenerate_groups(rewards, group_ids).double().mean())
    return out
