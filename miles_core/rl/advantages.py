"""Group-relative advantages (GRPO, Dr.GRPO), global whitening, and degenerate groups.

GRPO samples a group of responses per prompt and scores each against its own group: the
advantage is `(r - mean_group) / (std_group + eps)`. Dr.GRPO drops the division by the std,
which up-weights prompts that are nearly solved or nearly hopeless. A group whose rewards are all
equal gives every response advantage 0: it costs a full forward/backward and teaches nothing.
Those groups are reported, and `informative_mask` selects the others, which is the selection
step of DAPO's dynamic sampling (the rollout keeps sampling until enough groups survive).

Groups come in either of two forms:
  rewards [G, S]                 G groups of S samples each (one row per prompt), or
  rewards [N] + group_ids [N]    any integer id per sample (e.g. a hash of `prompt_id`);
                                 groups may have different sizes and need not be contiguous.
The std is the sample std (Bessel-corrected, as `torch.std`); a group of one sample has std 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miles_core.rl.masking import as_bool, masked_fill_zero, masked_mean, masked_std


def _group_index(rewards: Tensor, group_ids: Tensor | None) -> tuple[Tensor, Tensor, int]:
    """Flatten to (rewards [N], group index [N] in 0..G-1, G); groups ordered by sorted id."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards without group_ids must be [num_groups, group_size], got {tuple(rewards.shape)}")
        g, s = rewards.shape
        index = torch.arange(g, device=rewards.device).repeat_interleave(s)  # [G*S]
        return rewards.reshape(-1), index, g
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    ids, index = torch.unique(group_ids, return_inverse=True)  # index: [N] in 0..G-1
    return rewards, index, ids.numel()


def _group_reduce(x: Tensor, index: Tensor, g: int, reduce: str) -> Tensor:
    """Per-group sum/amax/amin of x [N] -> [G]."""
    out = x.new_zeros(g)
    if reduce == "sum":
        return out.index_add(0, index, x)
    return out.scatter_reduce(0, index, x, reduce, include_self=False)


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor | None = None,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO advantages, one per sample, same shape as `rewards`.

    rewards: [G, S] or [N] float (with group_ids [N] int). Returns (r - group mean), divided by
    (group std + eps) when `normalize_std` (GRPO), not divided otherwise (Dr.GRPO).
    Broadcast to tokens with `adv[:, None]` (the policy loss accepts [B] or [B, T]).
    """
    r, index, g = _group_index(rewards, group_ids)  # r: [N], index: [N]
    count = torch.bincount(index, minlength=g).to(r.dtype)  # [G]
    mean = _group_reduce(r, index, g, "sum") / count  # [G]
    centered = r - mean[index]  # [N]
    if normalize_std:
        var = _group_reduce(centered.square(), index, g, "sum") / (count - 1).clamp(min=1)  # [G]
        centered = centered / (var.sqrt()[index] + eps)
    return centered.reshape(rewards.shape)


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor | None = None) -> Tensor:
    """Dr.GRPO advantages: r - group mean, no std division. Shapes as `grpo_advantages`."""
    return grpo_advantages(rewards, group_ids, normalize_std=False)


def whiten(values: Tensor, mask: Tensor | None = None, *, eps: float = 1e-6) -> Tensor:
    """Global whitening: (x - mean) / (std + eps) over the whole batch (masked entries only).

    values: any shape, e.g. advantages [N] or per-token advantages [B, T] with mask [B, T]
    (then every token counts once, so long responses weigh more). Masked-out entries become 0.
    std is the sample std over the selected entries.
    """
    m = torch.ones_like(values, dtype=torch.bool) if mask is None else as_bool(mask).expand_as(values)
    mean = masked_mean(values, m)
    std = masked_std(values, m)
    return masked_fill_zero((values - mean) / (std + eps), m)


def degenerate_groups(rewards: Tensor, group_ids: Tensor | None = None) -> Tensor:
    """Which groups have all rewards equal (zero advantage for all): bool [G].

    Groups in row order for [G, S] rewards, in sorted group-id order for [N] + group_ids.
    """
    r, index, g = _group_index(rewards, group_ids)
    return _group_reduce(r, index, g, "amax") == _group_reduce(r, index, g, "amin")  # [G]


def informative_mask(rewards: Tensor, group_ids: Tensor | None = None) -> Tensor:
    """Keep-mask for the first dim of `rewards`, dropping degenerate groups (DAPO selection).

    rewards [G, S] -> bool [G] (one per group row); rewards [N] + group_ids -> bool [N] (one per
    sample, True when its group is not degenerate). Index your batch with it.
    """
    degenerate = degenerate_groups(rewards, group_ids)  # [G]
    if group_ids is None:
        return ~degenerate
    _, index, _ = _group_index(rewards, group_ids)
    return ~degenerate[index]
