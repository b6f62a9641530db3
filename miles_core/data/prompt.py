"""The `Prompt` record: one task given to the policy, with what is needed to score it.

Every prompt source (JSONL, Parquet, reasoning-gym) yields the same record so that rollout,
rewards and evaluation never care where a prompt came from. `prompt_id` is a stable string
derived from the prompt's content (unless the file gives one), so that two runs, or two
evaluations of different checkpoints, can be joined prompt by prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Prompt", "content_id"]

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Prompt:
    """A prompt: plain `text` or chat `messages` (exactly one of the two), and its answer.

    `answer` is the reference answer as a string (None when the reward needs none).
    `metadata` holds everything else a reward function may want (for reasoning-gym prompts, the
    generator's entry, which its scorer reads). `source` names where the prompt came from and
    is the key of the per-source evaluation breakdown.
    """

    prompt_id: str
    source: str
    answer: str | None = None
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a Prompt has exactly one of `text` and `messages`")

    def chat(self) -> list[dict[str, str]]:
        """The prompt as chat messages (a text prompt is one user turn)."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]

    def question(self) -> str:
        """The text of the last user turn: what a human would call the question."""
        if self.text is not None:
            return self.text
        users = [m["content"] for m in self.messages or () if m["role"] == "user"]
        return users[-1] if users else ""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (rollout metadata, logs); non-JSON metadata values become strings."""
        out: dict[str, Any] = {"prompt_id": self.prompt_id, "source": self.source, "answer": self.answer}
        if self.text is not None:
            out["text"] = self.text
        else:
            out["messages"] = self.chat()
        out["metadata"] = json.loads(json.dumps(self.metadata, default=str))
        return out


def content_id(prefix: str, *parts: Any) -> str:
    """A stable id `prefix-<16 hex>` from the hash of `parts` (canonical JSON).

    Content-derived ids survive reordering and re-generation of a prompt file, which line numbers
    would not; two sources that share a prompt still differ by `prefix`.
    """
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return f"{prefix}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
