"""Per-token quantities read off the policy's logits: chosen-token log-probs and entropy.

The trainer's log-prob of a token must be computed *exactly* the way the rollout engine records
it, or the train-vs-rollout mismatch is not zero even with identical weights. The recipe, shared
by both sides, is: upcast the logits to float32 (at least), divide by the sampling temperature
(`logits / T`), `log_softmax` over the vocabulary, gather the chosen token. Entropy is that of the
same temperature-scaled distribution (the policy that was sampled and is being trained).

`chunk_size` processes that many token rows at a time, bounding the float32 `[chunk, V]`
temporaries for a big vocabulary. Under autograd every chunk's graph is still kept, so the saving
is in no-grad use (rollout, old-policy log-probs, entropy metrics); results do not depend on it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from miles_core.rl.aggregation import AggMode, aggregate_loss


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """[N, V] logits upcast to >= float32, divided by the temperature."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = logits.to(dtype)
    # x / 1.0 == x bit for bit: skip the second vocabulary-sized float32 copy at T = 1.
    return scaled if temperature == 1.0 else scaled / temperature


def _entropy_from_logp(logp: Tensor) -> Tensor:
    """Entropy of rows of log-probs [N, V] -> [N]; 0 * log 0 = 0 for -inf logits (masked vocab)."""
    p = logp.exp()
    safe = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p * safe).sum(-1)


def _by_rows(logits: Tensor, chunk_size: int | None, fn: Callable[[slice], tuple[Tensor, ...]]) -> list[Tensor]:
    """Apply fn to row slices of the flattened [N, V] logits and concatenate each output."""
    n = logits.numel() // logits.shape[-1]
    step = chunk_size or max(n, 1)
    parts = [fn(slice(i, i + step)) for i in range(0, max(n, 1), step)]
    return [torch.cat(outs) for outs in zip(*parts, strict=True)]


def logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Log-probs of the chosen tokens and the entropy, from one log_softmax.

    logits: [B, T, V] any float dtype, position t predicting tokens[:, t] (shift before calling);
    tokens: [B, T] int64, valid ids everywhere (pad with 0). Returns (logp [B, T], entropy [B, T]),
    float32 (float64 for float64 logits).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    ids = tokens.reshape(-1, 1)  # [N, 1]

    def one(rows: slice) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(_scaled(flat[rows], temperature), dim=-1)  # [n, V]
        return logp.gather(-1, ids[rows]).squeeze(-1), _entropy_from_logp(logp)

    logp, entropy = _by_rows(flat, chunk_size, one)
    return logp.reshape(tokens.shape), entropy.reshape(tokens.shape)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """log softmax(logits / T)[token]: [B, T, V], [B, T] int64 -> [B, T] float32 (see module doc)."""
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    ids = tokens.reshape(-1, 1)  # [N, 1]

    def one(rows: slice) -> tuple[Tensor]:
        logp = torch.log_softmax(_scaled(flat[rows], temperature), dim=-1)  # [n, V]
        return (logp.gather(-1, ids[rows]).squeeze(-1),)

    (logp,) = _by_rows(flat, chunk_size, one)
    return logp.reshape(tokens.shape)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits / T) per position: [..., V] -> [...] float32, stable for -inf logits."""
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]

    def one(rows: slice) -> tuple[Tensor]:
        return (_entropy_from_logp(torch.log_softmax(_scaled(flat[rows], temperature), dim=-1)),)

    (entropy,) = _by_rows(flat, chunk_size, one)
    return entropy.reshape(logits.shape[:-1])


def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    coef: float,
    *,
    mode: AggMode = "token-mean",
    norm: float | None = None,
    denom: float | Tensor | None = None,
) -> Tensor:
    """The entropy term to *add* to the loss: -coef * aggregated entropy (0-dim; 0 if coef == 0).

    entropy: [B, T] float (with grad to encourage exploration); mask: [B, T].
    """
    if coef == 0.0:
        return entropy.new_zeros(())
    return -coef * aggregate_loss(entropy, mask, mode, norm, denom)
