"""Policy forward: per-token log-probs (and entropy, routed experts, hidden states) of a micro-batch.

The same function computes the current policy's log-probs (with grad), the old policy's and the
reference model's (no grad), so that at step 0 all of them, and the rollout engine's, are the same
numbers: temperature-scaled log_softmax in float32 through `miles_core.rl.logprobs_and_entropy`.

R3: when the micro-batch carries the rollout's routed experts and replay is on, the forward uses
that selection (the gate weights still come from the current router). Either way the forward
reports which experts it used, so the routing mismatch against the rollout can be measured.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from miles_core.kernels import logprobs as fused_logprobs
from miles_core.rl import entropy_from_logits, logprobs_and_entropy, token_logprobs
from miles_core.train.batching import MicroBatch


@dataclass
class PolicyOut:
    logp: Tensor  # [B, T] float32, log-prob of targets; 0 off the attention mask
    entropy: Tensor | None  # [B, T] float32
    routed_experts: Tensor | None  # [B, T, moe_layers, k], the selection the forward used
    hidden: Tensor | None  # [B, T, H], last decoder layer (for the MTP loss)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA (fp32 master weights, fp32 log-softmax); a no-op elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def policy_forward(
    model,
    mb: MicroBatch,
    *,
    temperature: float = 1.0,
    replay: bool = True,
    entropy: bool = False,
    entropy_grad: bool = True,
    hidden: bool = False,
    bf16: bool = False,
    chunk_rows: int | None = None,
) -> PolicyOut:
    """One forward over a micro-batch; grad flows if enabled by the caller.

    `entropy_grad=False`: the entropy is a metric only, computed without autograd (chunked by
    `chunk_rows`), so the backward keeps no [N, V] entropy graph: for a 150k vocabulary that is
    several GB per micro-batch.

    On CUDA the log-probs and the entropy come from one fused Triton pass over the logits in their
    own dtype (`miles_core.kernels.logprobs`; its backward writes the logits' gradient in one more
    pass); elsewhere from the pure-torch functions of `miles_core.rl`, its reference.
    """
    routed = mb.routed_experts if replay else None
    record = mb.routed_experts is not None and getattr(model, "num_moe_layers", 0) > 0
    with autocast(mb.input_ids.device, bf16):
        out = model(
            mb.input_ids,
            routed_experts=routed,
            return_routed_experts=record,
            attention_mask=mb.attention_mask,
            return_hidden_states=hidden,
        )
    logits = out.logits  # [B, T, V]
    if fused_logprobs.available(logits):  # one Triton pass over the logits, forward and backward
        logp, ent = fused_logprobs.fused_logprobs_entropy(logits, mb.targets, temperature)
        ent = (ent if entropy_grad else ent.detach()) if entropy else None
    elif entropy and (entropy_grad or not logits.requires_grad):
        rows = None if logits.requires_grad else chunk_rows  # chunking saves nothing under autograd
        logp, ent = logprobs_and_entropy(logits, mb.targets, temperature, rows)
    elif entropy:
        logp = chunked_token_logprobs(logits, mb.targets, temperature, chunk_rows)
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach(), temperature, chunk_rows)
    elif logits.requires_grad:
        logp, ent = chunked_token_logprobs(logits, mb.targets, temperature, chunk_rows), None
    else:
        logp, ent = token_logprobs(logits, mb.targets, temperature, chunk_rows), None
    logp = logp.masked_fill(~mb.attention_mask, 0.0)
    return PolicyOut(logp, ent, out.routed_experts, out.hidden_states)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[token] whose backward recomputes the softmax chunk by chunk.

    Autograd through `token_logprobs` keeps the float32 [N, V] log-softmax (and its upcast input)
    for the backward: 10 GB for 8k tokens of a 150k vocabulary. This keeps only the logits (in
    their own dtype) and rebuilds `(onehot - softmax) / T` per chunk of rows in the backward. The
    forward values are `token_logprobs`' exactly (log_softmax is row-wise, chunking changes nothing).
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, chunk_rows):
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return token_logprobs(logits, tokens, temperature, chunk_rows)  # [N]

    @staticmethod
    def backward(ctx, grad):  # grad: [N]
        logits, tokens = ctx.saved_tensors
        t, step = ctx.temperature, ctx.chunk_rows or logits.shape[0]
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            x = logits[rows].to(torch.promote_types(logits.dtype, torch.float32)) / t
            d = torch.softmax(x, dim=-1).mul_(-grad[rows, None])  # [n, V]
            d.scatter_add_(1, tokens[rows, None], grad[rows, None].to(d.dtype))
            out[rows] = d.div_(t).to(logits.dtype)
        return out, None, None, None


def chunked_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_rows: int | None = None):
    """`token_logprobs` ([B, T, V], [B, T] -> [B, T] float32) with a memory-light backward."""
    flat = logits.reshape(-1, logits.shape[-1])  # [N, V]
    logp = _TokenLogprobs.apply(flat, tokens.reshape(-1), temperature, chunk_rows or 4096)
    return logp.reshape(tokens.shape)


@torch.no_grad()
def compute_logprobs(
    model,
    micro_batches: list[MicroBatch],
    *,
    temperature: float = 1.0,
    replay: bool = True,
    bf16: bool = False,
    chunk_rows: int | None = None,
) -> list[Tensor]:
    """No-grad log-probs [B, T] per micro-batch: old-policy, reference, or (in tests) the rollout's."""
    return [
        policy_forward(model, mb, temperature=temperature, replay=replay, bf16=bf16, chunk_rows=chunk_rows).logp
        for mb in micro_batches
    ]


@torch.no_grad()
def routing_mismatch(used: Tensor | None, recorded: Tensor | None, mask: Tensor) -> tuple[int, int]:
    """(differing, total) (position, MoE layer) pairs whose expert *set* differs from the rollout's.

    used, recorded: [B, T, L, k] int; mask: [B, T] bool (real positions). (0, 0) when either is None.
    """
    if used is None or recorded is None:
        return 0, 0
    a = used.to(torch.int64).sort(dim=-1).values
    b = recorded.to(a.device, torch.int64).sort(dim=-1).values
    differs = (a != b).any(dim=-1)  # [B, T, L]
    m = mask[..., None].expand_as(differs)
    return int((differs & m).sum()), int(m.sum())
