"""reasoning-gym's own scorers as rewards.

Each reasoning-gym task ships a `score_answer(answer, entry)` that knows the task's answer
format (partial credit, several valid answers, tolerance), so its prompts are scored by it,
never by a generic verifier. The answer handed to it is what reasoning-gym's own evaluation
hands it: the content of the last `<answer>` tag (its system prompt asks for one), here also a
`\\boxed{}` answer; a response with neither gets what the scorer gives `None` (0).
"""

from __future__ import annotations

from reasoning_gym.utils import extract_answer as extract_tag

from miles_core.data.gym import gym_dataset
from miles_core.data.prompt import Prompt
from miles_core.rewards.extract import extract_boxed

__all__ = ["gym_answer", "gym_reward", "is_gym_prompt"]


def is_gym_prompt(prompt: Prompt) -> bool:
    return "reasoning_gym" in prompt.metadata


def gym_answer(response: str) -> str | None:
    """The answer reasoning-gym's scorer should see: last `<answer>` tag, else `\\boxed{}`."""
    tagged = extract_tag(response)
    return tagged if tagged is not None else extract_boxed(response)


def gym_reward(prompt: Prompt, response: str) -> float:
    """The task's own score of `response`, in [0, 1]."""
    info = prompt.metadata.get("reasoning_gym")
    if not info:
        raise ValueError(f"prompt {prompt.prompt_id} is not a reasoning-gym prompt (no metadata['reasoning_gym'])")
    dataset = gym_dataset(info["dataset"], info.get("seed", 0), info.get("config") or {})
    entry = {"question": prompt.question(), "answer": prompt.answer, "metadata": info.get("entry_metadata", {})}
    return float(dataset.score_answer(gym_answer(response), entry))
