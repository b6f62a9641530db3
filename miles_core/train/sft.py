"""Plain SFT: next-token cross-entropy on response tokens, for the demo's warm-up and draft training.

It uses the GRPO step's batching, accumulation and guarded update; only the loss differs.
`mtp_only=True` trains just the MTP (draft) layers on the frozen trunk: the loss is the MTP loss
with the trunk's hidden states, embedding and head detached (build the optimizer with
`build_optimizer(model, cfg, mtp_only=True)` so the trunk has no grads at all).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from miles_core.train.batching import MicroBatch
from miles_core.train.config import TrainConfig
from miles_core.train.logprobs import autocast
from miles_core.train.step import apply_update


def sft_loss(model, mb: MicroBatch, denom: float, *, bf16: bool = False, mtp_scale: float = 0.0,
             mtp_detach_trunk: bool = True, mtp_only: bool = False, mtp_share: float = 1.0):  # fmt: skip
    """(loss, ce, mtp) for one micro-batch; ce is summed over response tokens and divided by `denom`."""
    need_hidden = mtp_only or mtp_scale > 0
    with autocast(mb.input_ids.device, bf16):
        out = model(mb.input_ids, attention_mask=mb.attention_mask, compute_logits=not mtp_only,
                    return_hidden_states=need_hidden)  # fmt: skip
    ce = torch.zeros((), device=mb.input_ids.device)
    if not mtp_only:
        logits = out.logits[mb.loss_mask].float()  # [N, V], response positions only
        ce = F.cross_entropy(logits, mb.targets[mb.loss_mask], reduction="sum") / denom
    mtp = torch.zeros((), device=mb.input_ids.device)
    if need_hidden:
        from miles_core.model import mtp_loss

        mtp = mtp_loss(model, mb.input_ids, out.hidden_states, mb.attention_mask, mtp_only or mtp_detach_trunk)
        mtp = mtp * mtp_share
    loss = mtp if mtp_only else ce + mtp_scale * mtp
    return loss, ce, mtp


def sft_step(model, optimizer, scheduler, micro_batches: list[MicroBatch], cfg: TrainConfig,
             mtp_only: bool = False) -> dict[str, float]:  # fmt: skip
    """One guarded optimizer step of SFT over the micro-batches; returns metrics."""
    t0 = time.perf_counter()
    model.train()
    total = sum(mb.num_tokens for mb in micro_batches)
    sums = {"loss": 0.0, "sft/ce": 0.0, "mtp_loss": 0.0}
    for mb in micro_batches:
        loss, ce, mtp = sft_loss(model, mb, max(total, 1), bf16=cfg.bf16, mtp_scale=cfg.mtp_loss_scale,
                                 mtp_detach_trunk=cfg.mtp_detach_trunk, mtp_only=mtp_only,
                                 mtp_share=mb.num_tokens / max(total, 1))  # fmt: skip
        loss.backward()
        for k, v in zip(sums, (loss, ce, mtp), strict=True):
            sums[k] += float(v.detach())
    grad_norm, skipped = apply_update(optimizer, scheduler, cfg, loss_finite=math.isfinite(sums["loss"]))
    seconds = time.perf_counter() - t0
    return {
        **sums,
        "grad_norm": grad_norm,
        "skipped": float(skipped),
        "lr": float(optimizer.param_groups[0]["lr"]),
        "tokens": float(total),
        "tokens_per_s": sum(int(mb.attention_mask.sum()) for mb in micro_batches) / max(seconds, 1e-9),
        "step_seconds": seconds,
    }
