"""Reward functions by name: built-ins, or the user's own by dotted path.

Every reward function has the batched signature

    fn(prompts: list[Prompt], responses: list[str]) -> list[float]

because real reward models and sandboxed verifiers are fast only in batches. A spec is
`auto` (reasoning-gym prompts by their task's scorer, others by the math verifier), `math`,
`reasoning_gym`, or `package.module:function` for a function of the user's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from miles_core.data.prompt import Prompt
from miles_core.errors import MilesError
from miles_core.rewards.gym import gym_reward, is_gym_prompt
from miles_core.rewards.verifier import math_reward

__all__ = ["BUILTINS", "RewardFn", "auto_reward", "gym_rewards", "load_reward_fn", "math_rewards", "resolve_reward"]

RewardFn = Callable[[list[Prompt], list[str]], list[float]]


def math_rewards(prompts: list[Prompt], responses: list[str]) -> list[float]:
    """The math verifier against each prompt's reference answer."""
    return [math_reward(r, p.answer) for p, r in zip(prompts, responses, strict=True)]


def gym_rewards(prompts: list[Prompt], responses: list[str]) -> list[float]:
    """Each reasoning-gym prompt scored by its own task's scorer."""
    return [gym_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


def auto_reward(prompts: list[Prompt], responses: list[str]) -> list[float]:
    """reasoning-gym's scorer where the prompt came from reasoning-gym, the math verifier elsewhere."""
    return [
        gym_reward(p, r) if is_gym_prompt(p) else math_reward(r, p.answer)
        for p, r in zip(prompts, responses, strict=True)
    ]


BUILTINS: dict[str, RewardFn] = {"auto": auto_reward, "math": math_rewards, "reasoning_gym": gym_rewards}


def load_reward_fn(path: str) -> RewardFn:
    """Import `package.module:function` (or `package.module.function`) and check it is callable."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise MilesError(f"reward function {path!r}: write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MilesError(f"reward function {path!r}: cannot import {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MilesError(f"reward function {path!r}: {module_name} has no callable {attr!r}")
    return fn


def resolve_reward(spec: str | RewardFn | None) -> RewardFn:
    """A reward function from a spec (see the module docstring); a callable passes through."""
    if spec is None:
        return auto_reward
    if callable(spec):
        return spec
    return BUILTINS.get(spec) or load_reward_fn(spec)
