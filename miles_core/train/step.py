"""One GRPO optimizer step over a mini-batch of micro-batches, and the guarded update.

Each micro-batch's loss is divided by the *mini-batch's* token (or sequence) count, so the summed
micro-batch gradients equal the gradient of the whole mini-batch: gradient accumulation changes
memory, not the result. The per-token loss is PPO-clip against pi_old, times TIS weights, with MIS
and stale-token masks (miles_core.rl); plus KL to the reference, the entropy bonus and the MTP loss.

The update is guarded: a non-finite loss or gradient norm skips the optimizer step (and the
scheduler's), zeroes the gradients and is reported as `skipped = 1`, instead of writing NaNs into
the weights and the Adam moments where they would never leave.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from miles_core.rl import (
    aggregate_loss,
    correct_stale,
    entropy_bonus,
    kl_loss,
    kl_penalty,
    mis_mask,
    mismatch_metrics,
    off_policy_metrics,
    policy_metrics,
    ppo_clip_loss,
    stale_tokens,
    tis_weights,
)
from miles_core.train.batching import MicroBatch
from miles_core.train.config import TrainConfig
from miles_core.train.logprobs import policy_forward, routing_mismatch


def apply_update(optimizer: torch.optim.Optimizer, scheduler, cfg: TrainConfig, loss_finite: bool = True):
    """Clip, then step unless the loss or the gradient norm is not finite: (grad_norm, skipped)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
    if params and params[0].is_cuda and optimizer.defaults.get("fused"):
        return _fused_update(optimizer, scheduler, cfg, params, max_norm, loss_finite)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    norm = float(norm)
    skipped = cfg.nan_guard and not (loss_finite and math.isfinite(norm))
    if not skipped:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped


def _fused_update(optimizer, scheduler, cfg: TrainConfig, params, max_norm: float, loss_finite: bool):
    """`apply_update` for a fused CUDA optimizer: clipping and the guard happen inside its kernel.

    The fused Adam(W) kernel divides every gradient by `optimizer.grad_scale` and skips the update
    (weights, moments and step count) where `optimizer.found_inf` is non-zero: the contract
    torch.amp.GradScaler uses. Clipping becomes grad_scale = max(1, (norm + 1e-6) / max_norm), the same
    factor `clip_grad_norm_` multiplies by, inverted; this saves a read-modify-write pass over every
    gradient and the host round-trip before the step. The host reads the norm (copied before the
    step is launched) while the step runs, and steps the scheduler only if the update happened.
    """
    # float32: the fused kernel takes float32 grad_scale / found_inf whatever the parameters' dtype
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True).float()
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0) if math.isfinite(max_norm) else None
    bad = ~torch.isfinite(norm) | (not loss_finite)
    optimizer.found_inf = bad.float() if cfg.nan_guard else None
    host = torch.empty((), dtype=norm.dtype, pin_memory=True)
    host.copy_(norm, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    optimizer.zero_grad(set_to_none=True)
    ready.synchronize()  # the norm only; the step's kernels keep running
    value = float(host)
    skipped = cfg.nan_guard and not (loss_finite and math.isfinite(value))
    if not skipped:
        scheduler.step()
    return value, skipped


def minibatch_denominators(micro_batches: list[MicroBatch], cfg: TrainConfig) -> tuple[float, float | None]:
    """(denom, norm) for `aggregate_loss` so that micro-batch losses sum to the mini-batch loss."""
    masks = [mb.loss_mask for mb in micro_batches]
    if cfg.loss_agg == "token-mean":
        denom = float(sum(int(m.sum()) for m in masks))
    else:
        denom = float(sum(int(m.any(-1).sum()) for m in masks))
    norm = None
    if cfg.loss_agg == "seq-mean-token-sum-norm":
        norm = cfg.loss_agg_norm or float(max(int(m.sum(-1).max()) for m in masks))
    return max(denom, 1.0), norm


def _token_masks(
    mb: MicroBatch, old: Tensor, cfg: TrainConfig, current_version: int | None
) -> tuple[Tensor, Tensor | None]:
    """(keep mask, loss weights or None): stale-token handling, MIS and TIS against the rollout."""
    keep, weights = mb.loss_mask, None
    if cfg.stale_tokens != "keep":
        stale = stale_tokens(mb.weight_version, keep, current_version)
        keep, weights = correct_stale(keep, stale, old, mb.rollout_logprobs, mode=cfg.stale_tokens, cap=cfg.tis_cap)
    if cfg.mis:
        keep = keep & mis_mask(old, mb.rollout_logprobs, mb.loss_mask, low=cfg.mis_low, high=cfg.mis_high,
                               level=cfg.mis_level)  # fmt: skip
    if cfg.tis:
        w = tis_weights(old, mb.rollout_logprobs, mb.loss_mask, cap=cfg.tis_cap, level=cfg.tis_level)
        weights = w if weights is None else weights * w
    return keep, weights


def grpo_step(
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    micro_batches: list[MicroBatch],
    cfg: TrainConfig,
    *,
    old_logp: list[Tensor] | None = None,
    ref_logp: list[Tensor] | None = None,
    current_version: int | None = None,
) -> dict[str, float]:
    """Forward/backward every micro-batch, then one guarded optimizer step. Returns metrics.

    old_logp: per micro-batch [B, T] log-probs of pi_old (None: the current forward, detached, i.e.
    on-policy; `cfg.old_logprobs == "rollout"`: the rollout's). ref_logp: per micro-batch, for KL.
    current_version: the newest weight version in the rollout batch; older tokens are stale.
    """
    t0 = time.perf_counter()
    model.train()
    denom, norm = minibatch_denominators(micro_batches, cfg)
    total_tokens = sum(mb.num_tokens for mb in micro_batches)
    mtp = cfg.mtp_loss_scale > 0 and getattr(model, "mtp", None) is not None
    acc = _Accumulator()
    for i, mb in enumerate(micro_batches):
        out = policy_forward(model, mb, temperature=cfg.temperature, replay=cfg.r3, entropy=True,
                             entropy_grad=cfg.entropy_coef > 0, hidden=mtp, bf16=cfg.bf16,
                             chunk_rows=cfg.logprob_chunk_rows)  # fmt: skip
        if cfg.old_logprobs == "rollout":
            old = mb.rollout_logprobs
        else:
            old = out.logp.detach() if old_logp is None else old_logp[i]
        keep, weights = _token_masks(mb, old, cfg, current_version)
        pl = ppo_clip_loss(out.logp, old, mb.advantages, keep, eps_low=cfg.eps_clip, eps_high=cfg.eps_clip_high,
                           dual_clip=cfg.dual_clip, ratio_level=cfg.ratio_level, weights=weights)  # fmt: skip
        pg = aggregate_loss(pl.loss, keep, cfg.loss_agg, norm, denom)
        ref = None if ref_logp is None else ref_logp[i]
        kl = kl_loss(out.logp, ref, mb.loss_mask, cfg.kl_coef, kind=cfg.kl_estimator, mode=cfg.loss_agg, norm=norm,
                     denom=denom)  # fmt: skip
        ent = entropy_bonus(out.entropy, mb.loss_mask, cfg.entropy_coef, mode=cfg.loss_agg, norm=norm, denom=denom)
        loss = pg + kl + ent
        mtp_term = torch.zeros(())
        if mtp:
            from miles_core.model import mtp_loss

            share = mb.num_tokens / max(total_tokens, 1)
            mtp_term = mtp_loss(model, mb.input_ids, out.hidden, mb.attention_mask, cfg.mtp_detach_trunk) * share
            loss = loss + cfg.mtp_loss_scale * mtp_term
        loss.backward()
        acc.add(mb, out, old, ref, pl, keep, weights, {"loss": loss, "pg_loss": pg, "kl_loss": kl,
                                                       "entropy_loss": ent, "mtp_loss": mtp_term})  # fmt: skip
    grad_norm, skipped = apply_update(optimizer, scheduler, cfg, loss_finite=math.isfinite(acc.sums["loss"]))
    seconds = time.perf_counter() - t0
    metrics = acc.metrics(cfg)
    metrics.update(
        grad_norm=grad_norm,
        skipped=float(skipped),
        lr=float(optimizer.param_groups[0]["lr"]),
        tokens=float(total_tokens),
        tokens_per_s=sum(int(mb.attention_mask.sum()) for mb in micro_batches) / max(seconds, 1e-9),
        step_seconds=seconds,
    )
    return metrics


class _Accumulator:
    """Collects per-token values of every micro-batch, so that metrics are over the whole mini-batch."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.cols: dict[str, list[Tensor]] = {}
        self.routing = [0, 0]

    def _put(self, name: str, values: Tensor, mask: Tensor) -> None:
        self.cols.setdefault(name, []).append(values.detach()[mask].double().cpu())

    def add(self, mb, out, old, ref, pl, keep, weights, losses) -> None:
        m = mb.loss_mask
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self._put("logp", out.logp, m)
        self._put("old", old, m)
        # the trainer's side of the train-vs-rollout mismatch: pi_old, or the current forward when
        # pi_old *is* the rollout's (old_logprobs="rollout"), which would make the mismatch 0 by fiat
        self._put("trainer", out.logp if old is mb.rollout_logprobs else old, m)
        self._put("rollout", mb.rollout_logprobs, m)
        self._put("entropy", out.entropy, m)
        self._put("ratio", pl.ratio, m)
        self._put("clipped", pl.clipped.double(), m)
        self._put("dual_clipped", pl.dual_clipped.double(), m)
        self._put("keep", keep.double(), m)
        self._put("weights", torch.ones_like(old) if weights is None else weights, m)
        if ref is not None:
            self._put("ref", ref, m)
        d, n = routing_mismatch(out.routed_experts, mb.routed_experts, mb.attention_mask)
        self.routing[0] += d
        self.routing[1] += n

    def metrics(self, cfg: TrainConfig) -> dict[str, float]:
        c = {k: torch.cat(v)[None] for k, v in self.cols.items()}  # each [1, N]
        mask = torch.ones_like(c["logp"], dtype=torch.bool)
        out = dict(self.sums)
        out.update(mismatch_metrics(c["trainer"], c["rollout"], mask))
        out.update(policy_metrics(c["logp"], c["old"], mask, clipped=c["clipped"].bool(),
                                  dual_clipped=c["dual_clipped"].bool(), entropy=c["entropy"]))  # fmt: skip
        n = max(c["ratio"].numel(), 1)
        out["policy/ratio_mean"] = float(c["ratio"].sum()) / n
        out["policy/ratio_max_dev"] = float((c["ratio"] - 1).abs().max()) if c["ratio"].numel() else 0.0
        if cfg.tis or cfg.mis or cfg.stale_tokens != "keep":
            out.update(off_policy_metrics(c["weights"], c["keep"].bool(), mask))
        kl = kl_penalty(c["logp"], c["ref"], mask, cfg.kl_estimator) if "ref" in c else torch.zeros(1)
        out["kl"] = float(kl.mean())
        diff, total = self.routing
        out["routing/mismatch_frac"] = diff / total if total else 0.0
        return out
