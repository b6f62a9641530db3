"""Procedural prompt sources from the `reasoning-gym` package (`reasoning_gym:chain_sum`, ...).

Why a hash split: reasoning-gym generates item `i` of a dataset from `seed + i`, so two
datasets with different seeds can still produce the same question, and a train set and an eval
set drawn from seeds would leak. Here one stream of items (for the given seed) is drawn and
each question goes to `eval` when the hash of its text falls below `eval_fraction`, else to
`train`. The split is a function of the question alone, so train and eval can never share a
question, whatever seeds, sizes or configs the two loads use. Repeated questions within a split
are dropped, so `size` prompts are `size` distinct questions.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from miles_core.data.prompt import Prompt, content_id
from miles_core.errors import MilesError

__all__ = ["GYM_PREFIX", "SPLITS", "check_disjoint", "gym_dataset", "gym_prompts", "split_of"]

GYM_PREFIX = "reasoning_gym:"
SPLITS = ("train", "eval")
# How many stream items may be drawn per wanted prompt before giving up (small question spaces).
_DRAWS_PER_PROMPT = 20


def split_of(question: str, eval_fraction: float) -> str:
    """`eval` or `train` for a question: the first 8 bytes of its SHA-256 as a fraction of 2^64."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2.0**64
    return "eval" if h < eval_fraction else "train"


@lru_cache(maxsize=64)
def _cached_dataset(name: str, seed: int, config_json: str, size: int) -> Any:
    import reasoning_gym

    config = json.loads(config_json)
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except Exception as e:  # unknown name or a bad config value: a user mistake
        raise MilesError(f"cannot create reasoning-gym dataset {name!r} with {config}: {e}") from e


def gym_dataset(name: str, seed: int = 0, config: dict[str, Any] | None = None, size: int = 1) -> Any:
    """The reasoning-gym dataset object (cached): it generates items and owns `score_answer`.

    Some tasks precompute per-index state at creation (gsm_symbolic draws a template per index),
    so `size` is rounded up to a power of two: a few cached objects serve every request, and the
    precomputation is prefix-stable, so item i does not depend on the size asked for.
    """
    size = 1 << max(int(size) - 1, 0).bit_length()
    return _cached_dataset(name, int(seed), json.dumps(config or {}, sort_keys=True), size)


def gym_prompts(
    name: str,
    size: int,
    seed: int = 0,
    split: str = "train",
    eval_fraction: float = 0.2,
    config: dict[str, Any] | None = None,
    system_prompt: str | None = "default",
) -> list[Prompt]:
    """`size` distinct prompts of one split of reasoning-gym task `name`, deterministic in `seed`.

    system_prompt: a key of reasoning-gym's SYSTEM_PROMPTS (their scorers expect the answer in
    `<answer>` tags, which the default prompt asks for), literal text, or None for a bare question.
    """
    if split not in SPLITS:
        raise MilesError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < eval_fraction < 1.0:
        raise MilesError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if size < 1:
        raise MilesError(f"size must be >= 1, got {size}")
    config = dict(config or {})
    system = _system_text(system_prompt)
    fraction = eval_fraction if split == "eval" else 1.0 - eval_fraction
    max_draws = int(size / fraction * _DRAWS_PER_PROMPT) + 1000
    dataset = gym_dataset(name, seed, config, size=max_draws)
    out: list[Prompt] = []
    seen: set[str] = set()
    for index in range(max_draws):
        entry = dataset[index]
        question = entry["question"]
        if question in seen or split_of(question, eval_fraction) != split:
            continue
        seen.add(question)
        out.append(_to_prompt(name, entry, index, seed, split, config, system))
        if len(out) == size:
            return out
    raise MilesError(
        f"{GYM_PREFIX}{name} gave only {len(out)} distinct {split} questions in {max_draws} draws "
        f"(wanted {size}); ask for fewer, or widen the task's config"
    )


def _system_text(system_prompt: str | None) -> str | None:
    if system_prompt is None:
        return None
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS.get(system_prompt, system_prompt)


def _to_prompt(name: str, entry: dict, index: int, seed: int, split: str, config: dict, system: str | None) -> Prompt:
    question = entry["question"]
    messages = ({"role": "system", "content": system},) if system else ()
    messages += ({"role": "user", "content": question},)
    metadata = {
        "reasoning_gym": {
            "dataset": name,
            "seed": seed,
            "config": config,
            "index": index,
            "split": split,
            "entry_metadata": entry.get("metadata", {}),
        }
    }
    return Prompt(
        prompt_id=content_id(name, question),
        source=f"{GYM_PREFIX}{name}",
        answer=None if entry.get("answer") is None else str(entry["answer"]),
        messages=messages,
        metadata=metadata,
    )


def check_disjoint(a: list[Prompt], b: list[Prompt]) -> None:
    """Raise a `MilesError` if two prompt sets share a question (train/eval leakage)."""
    shared = {p.question() for p in a} & {p.question() for p in b}
    if shared:
        example = next(iter(shared))
        raise MilesError(f"{len(shared)} question(s) appear in both sets, e.g. {example[:80]!r}")
