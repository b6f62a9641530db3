"""RL math for GRPO training: advantages, policy losses, KL, TIS/MIS, metrics.

Small pure torch functions over right-padded `[B, T]` response tensors with a `[B, T]` mask;
nothing here knows about models, configs or the trainer. See each module's docstring for the why.
"""

from miles_core.rl.advantages import (
    degenerate_groups,
    dr_grpo_advantages,
    grpo_advantages,
    informative_mask,
    whiten,
)
from miles_core.rl.aggregation import AGG_MODES, aggregate_loss
from miles_core.rl.kl import kl_loss, kl_penalty
from miles_core.rl.logits import entropy_bonus, entropy_from_logits, logprobs_and_entropy, token_logprobs
from miles_core.rl.masking import masked_mean, masked_sum
from miles_core.rl.metrics import (
    length_metrics,
    mismatch_metrics,
    off_policy_metrics,
    policy_metrics,
    reward_metrics,
)
from miles_core.rl.off_policy import correct_stale, mis_mask, rollout_log_ratio, stale_tokens, tis_weights
from miles_core.rl.policy_loss import PolicyLoss, log_ratio, ppo_clip_loss

__all__ = [
    "AGG_MODES",
    "PolicyLoss",
    "aggregate_loss",
    "correct_stale",
    "degenerate_groups",
    "dr_grpo_advantages",
    "entropy_bonus",
    "entropy_from_logits",
    "grpo_advantages",
    "informative_mask",
    "kl_loss",
    "kl_penalty",
    "length_metrics",
    "log_ratio",
    "logprobs_and_entropy",
    "masked_mean",
    "masked_sum",
    "mis_mask",
    "mismatch_metrics",
    "off_policy_metrics",
    "policy_metrics",
    "ppo_clip_loss",
    "reward_metrics",
    "rollout_log_ratio",
    "stale_tokens",
    "tis_weights",
    "token_logprobs",
    "whiten",
]
