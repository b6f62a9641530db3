"""Scoring a batch of samples without ever losing one.

A reward function that raises on one odd response must not take down a rollout of thousands,
nor silently turn into a reward the trainer believes. So: the batch is scored in one call; if
that call fails, each sample is scored alone so the failure lands on the samples that caused it.
A failed sample gets reward 0 and keeps its error (`ScoreResult.errors`, and `reward_error` in
the rollout row's metadata via `annotate_rows`); the counts go back to the stage. With
`strict=True` the first failure raises a `MilesError` instead.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from miles_core.data.prompt import Prompt
from miles_core.errors import MilesError
from miles_core.rewards.registry import RewardFn, resolve_reward

__all__ = ["ScoreResult", "annotate_rows", "score_samples"]


@dataclass
class ScoreResult:
    """One reward per sample, in input order; `errors[i]` is None when sample i scored cleanly."""

    rewards: list[float]
    errors: list[str | None]

    @property
    def n_errors(self) -> int:
        return sum(e is not None for e in self.errors)

    @property
    def statuses(self) -> list[str]:
        """`ok` or `reward_error` per sample."""
        return ["ok" if e is None else "reward_error" for e in self.errors]

    def counts(self) -> dict[str, int]:
        return {"samples": len(self.rewards), "scored": len(self.rewards) - self.n_errors, "errors": self.n_errors}


def score_samples(
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    reward_fn: str | RewardFn | None = None,
    *,
    strict: bool = False,
) -> ScoreResult:
    """Score `responses[i]` against `prompts[i]` with `reward_fn` (a spec or a batched callable)."""
    if len(prompts) != len(responses):
        raise MilesError(f"score_samples got {len(prompts)} prompts but {len(responses)} responses")
    fn = resolve_reward(reward_fn)
    prompts, responses = list(prompts), list(responses)
    if not prompts:
        return ScoreResult([], [])
    try:
        rewards, errors = _check(fn(prompts, responses), len(prompts))
    except Exception:  # find out which samples fail, one by one
        rewards, errors = [], []
        for p, r in zip(prompts, responses, strict=True):
            reward, error = _score_one(fn, p, r)
            rewards.append(reward)
            errors.append(error)
    if strict:
        _raise_first(fn, prompts, errors)
    return ScoreResult(rewards, errors)


def _score_one(fn: RewardFn, prompt: Prompt, response: str) -> tuple[float, str | None]:
    try:
        rewards, errors = _check(fn([prompt], [response]), 1)
    except Exception as e:
        return 0.0, f"{type(e).__name__}: {e}"
    return rewards[0], errors[0]


def _check(values: Any, n: int) -> tuple[list[float], list[str | None]]:
    """Rewards as floats; a batch of the wrong length raises, a bad value fails its sample only."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward function returned {len(values)} rewards for {n} samples")
    rewards, errors = [], []
    for v in values:
        ok = isinstance(v, numbers.Real) and math.isfinite(v)
        rewards.append(float(v) if ok else 0.0)
        errors.append(None if ok else f"ValueError: reward {v!r} is not a finite number")
    return rewards, errors


def _raise_first(fn: RewardFn, prompts: list[Prompt], errors: list[str | None]) -> None:
    for i, error in enumerate(errors):
        if error is not None:
            name = getattr(fn, "__qualname__", repr(fn))
            n = sum(e is not None for e in errors)
            raise MilesError(
                f"reward function {name} failed on {n} sample(s); first: sample {i} "
                f"(prompt {prompts[i].prompt_id}): {error}"
            )


def annotate_rows(rows: Sequence[dict[str, Any]], result: ScoreResult) -> list[dict[str, Any]]:
    """Rollout rows with `reward` set and, for failed samples, the error in their metadata.

    The row's `status` (completed/truncated/aborted) describes generation and is left alone;
    a scoring failure is `metadata.reward_status == "reward_error"` plus `metadata.reward_error`.
    """
    if len(rows) != len(result.rewards):
        raise MilesError(f"{len(rows)} rows but {len(result.rewards)} scores")
    out = []
    for row, reward, error in zip(rows, result.rewards, result.errors, strict=True):
        meta = row.get("metadata") or {}
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)
        if error is None:
            meta.pop("reward_error", None)
            meta["reward_status"] = "ok"
        else:
            meta.update(reward_status="reward_error", reward_error=error)
        out.append({**row, "reward": reward, "metadata": meta})
    return out
