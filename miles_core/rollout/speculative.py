"""Speculative decoding with the MTP draft: the interfaces the engine will grow into (not built yet).

Plan, so that what exists already fits it:

1. Propose. The model's MTP layers (DeepSeek-V3 style, `miles_core.model.mtp`) predict token
   t+2 from the last decoder hidden state at t and the embedding of token t+1; chained, they
   propose k tokens per running sample. A `Drafter` returns the k tokens and, for sampling, the
   draft distributions they were drawn from.
2. Verify. One `forward_step` with `n_valid = k + 1` per row (the last accepted token followed
   by the k drafts, `start` = the sample's cached length) and `all_logits=True` gives the target
   logits at every draft position, and writes their KV / experts into the slot as usual.
3. Accept. Greedy: the longest prefix where the draft equals the target argmax, plus the target's
   next token. Sampling: rejection sampling (accept d_i with probability min(1, p_i / q_i), on a
   reject draw from norm(max(p - q, 0))) with the counter-based uniforms of `sampling.uniform`
   salted per draft position, so results stay reproducible per request. The recorded log-prob of
   each accepted token is the target's `log_softmax(logits / T)` from the verify forward: the same
   quantity as without speculation.
4. Roll back. Nothing to erase in a slot cache: the sample's cached length (`Sample.fed`) is set
   to the accepted length; rejected positions hold stale KV and experts that the attention mask
   (`key <= query position`) never reads and the next step overwrites.

The MTP draft trains online (`miles_core.model.mtp.mtp_loss`); its weights arrive with the
policy's through `Engine.update_weights`, and its acceptance rate is a rollout metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Drafter", "SpeculativeConfig", "accept", "propose"]


@dataclass(frozen=True)
class SpeculativeConfig:
    num_draft_tokens: int = 3  # k tokens proposed per sample and step
    draft_temperature: float | None = None  # None: the request's own temperature


class Drafter(Protocol):
    def propose(self, hidden: torch.Tensor, last_tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, H] (last decoder layer, pre-norm), last_tokens [N] ->
        (draft tokens [N, k] int64, draft probabilities [N, k, V] float32)."""
        ...


def propose(model, hidden: torch.Tensor, last_tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP draft of `model` as a Drafter (planned)."""
    raise NotImplementedError("speculative decoding with the MTP draft is not implemented yet")


def accept(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor, sampling
) -> tuple[torch.Tensor, torch.Tensor]:
    """target_logits [N, k + 1, V] -> (accepted count [N] int64, tokens [N, k + 1] int64) (planned)."""
    raise NotImplementedError("speculative decoding with the MTP draft is not implemented yet")
