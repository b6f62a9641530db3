"""Requests and samples: what goes into the engine and what comes out of it.

A `Request` is one prompt asking for `n_samples` samples (a GRPO group). Each `Sample` carries its
own state through the engine and, finished, is the rollout row: response tokens, the log-prob of
each under the sampling temperature, the weight version that produced each, and (MoE) the experts
chosen at every position of prompt+response except the last. A sample interrupted by a partial
rollout's budget keeps all of it (status `aborted`) and is resumed later from where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from miles_core.rollout.sampling import SamplingParams

__all__ = ["Request", "Sample"]

FINISHED = ("completed", "truncated")


@dataclass
class Request:
    prompt_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n_samples: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-able, copied into each row's metadata
    prompt: Any = None  # the data layer's Prompt, when the request came from one (rewards need it)


@dataclass(eq=False)
class Sample:
    request: Request
    sample_index: int
    seed: int
    response_tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log softmax(logits / T)[token], one per token
    versions: list[int] = field(default_factory=list)  # weight version that produced each token
    status: str | None = None  # None while waiting or running; completed | truncated | aborted
    finish_reason: str | None = None  # stop_token | stop_string | max_new_tokens | max_len | budget
    text: str | None = None  # decoded response (cut before a matched stop string)
    experts: torch.Tensor | None = None  # [P + R - 1, moe_layers, k] int16 on the CPU, set when it stops
    rounds: int = 0  # engine rounds this sample took part in
    aborts: int = 0  # times a budget interrupted it
    slot: int | None = None  # engine-internal: the cache slot while running
    fed: int = 0  # engine-internal: positions of the slot holding this sample's tokens

    @property
    def prompt_tokens(self) -> list[int]:
        return self.request.prompt_tokens

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_tokens) + len(self.response_tokens)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def weight_version(self) -> int:
        """The oldest version among its tokens: a sample with any old-policy token counts as that old."""
        return min(self.versions) if self.versions else 0
