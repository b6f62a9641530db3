"""Rewards: the math verifier, reasoning-gym's scorers, and user functions by dotted path.

result = score_samples(prompts, responses, "auto")   # or "math", "pkg.mod:fn", a callable
result.rewards, result.errors, result.counts()
"""

from miles_core.rewards.extract import extract_answer, extract_boxed, last_number
from miles_core.rewards.gym import gym_answer, gym_reward
from miles_core.rewards.registry import (
    BUILTINS,
    RewardFn,
    auto_reward,
    gym_rewards,
    load_reward_fn,
    math_rewards,
    resolve_reward,
)
from miles_core.rewards.score import ScoreResult, annotate_rows, score_samples
from miles_core.rewards.verifier import answer_key, answers_match, math_reward, normalize, parse_number

__all__ = [
    "BUILTINS",
    "RewardFn",
    "ScoreResult",
    "annotate_rows",
    "answer_key",
    "answers_match",
    "auto_reward",
    "extract_answer",
    "extract_boxed",
    "gym_answer",
    "gym_reward",
    "gym_rewards",
    "last_number",
    "load_reward_fn",
    "math_reward",
    "math_rewards",
    "normalize",
    "parse_number",
    "resolve_reward",
    "score_samples",
]
