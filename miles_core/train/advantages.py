"""Advantages for a rollout batch: GRPO groups by `prompt_id`, written onto the samples.

Degenerate groups (all rewards equal: every advantage 0) are counted and, with
`drop_degenerate_groups`, removed before training (DAPO's selection), since they cost a full
forward/backward and teach nothing.
"""

from __future__ import annotations

import torch

from miles_core.rl import degenerate_groups, grpo_advantages, whiten
from miles_core.train.batching import Sample
from miles_core.train.config import TrainConfig


def assign_advantages(samples: list[Sample], cfg: TrainConfig) -> tuple[list[Sample], dict[str, float]]:
    """Set `sample.advantage` for every sample; returns (samples kept, metrics)."""
    if not samples:
        return [], {"advantage/degenerate_groups": 0.0, "advantage/dropped_samples": 0.0}
    ids: dict[str, int] = {}
    group = torch.tensor([ids.setdefault(s.group, len(ids)) for s in samples])  # [N]
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)  # [N]
    adv = grpo_advantages(rewards, group, normalize_std=cfg.advantage == "grpo")  # [N]
    degenerate = degenerate_groups(rewards, group)  # [G], in sorted id order == first-seen order
    keep = ~degenerate[group] if cfg.drop_degenerate_groups else torch.ones_like(group, dtype=torch.bool)
    if cfg.whiten_advantages:
        adv = whiten(adv, keep)
    for s, a in zip(samples, adv.tolist(), strict=True):
        s.advantage = float(a)
    kept = [s for s, k in zip(samples, keep.tolist(), strict=True) if k]
    metrics = {
        "advantage/degenerate_groups": float(degenerate.sum()),
        "advantage/dropped_samples": float(len(samples) - len(kept)),
        "advantage/mean_abs": float(adv.abs().mean()),
    }
    return kept, metrics
