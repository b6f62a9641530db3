"""Mixture-of-experts block: router (record/replay), routed experts as a grouped GEMM, shared experts.

Routing record and replay (Rollout Routing Replay, R3): the router always returns the experts it
used. Given `replay` indices it skips its own top-k and uses them, and the gate weights are then
gathered from the *current* router scores at the replayed experts, so the router keeps receiving
gradients while training sees exactly the experts the rollout saw.

Routers:
- softmax (Qwen3-MoE): probs = softmax(x W^T) in float32, top-k, optional renormalisation.
- sigmoid (DeepSeek-V3): scores = sigmoid(x W^T) in float32; the choice uses scores + correction
  bias, limited to the `topk_group` best groups (a group's score is the sum of its two best
  experts); gate weights are the unbiased scores, renormalised, times `routed_scaling_factor`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.kernels import grouped_triton, moe_combine, moe_route
from miles_core.kernels.grouped_gemm import grouped_linear
from miles_core.model.config import ModelConfig
from miles_core.model.layers import MLP, activation, gated


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.top_k, self.n_experts = cfg.router, cfg.num_experts_per_tok, cfg.num_experts
        self.norm_topk, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        if self.kind == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))

    def route(self, x: torch.Tensor, replay: torch.Tensor | None = None):
        """`forward`, plus the expert sort when the fused decode kernel made it (else None):
        x: [N, H] -> (weights [N, k], experts [N, k], plan (src, inverse, counts) or None)."""
        if replay is None and self.kind == "softmax" and moe_route.route_ok(x, x.shape[0], self.top_k, self.n_experts):
            logits = F.linear(x, self.weight)  # [N, E]
            return moe_route.topk_route(logits, self.top_k, self.norm_topk, self.scaling, x.dtype)
        return (*self(x, replay), None)

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None):
        """x: [N, H] -> (weights [N, k] in x.dtype, experts [N, k] int64)."""
        if self.kind == "softmax":
            scores = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [N, E]
            choice = scores
        else:
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [N, E]
            choice = self._group_limited(scores + self.e_score_correction_bias) if replay is None else None
        experts = replay.long() if replay is not None else torch.topk(choice, self.top_k, dim=-1)[1]
        weights = scores.gather(1, experts)  # [N, k] float32, differentiable into the router
        if self.norm_topk:
            eps = 1e-20 if self.kind == "sigmoid" else 0.0
            weights = weights / (weights.sum(-1, keepdim=True) + eps)
        weights = weights * self.scaling if self.scaling != 1.0 else weights
        return weights.to(x.dtype), experts

    def _group_limited(self, biased: torch.Tensor) -> torch.Tensor:
        if self.n_group <= 1:
            return biased
        n = biased.shape[0]
        grouped = biased.view(n, self.n_group, -1)  # [N, G, E/G]
        group_score = grouped.topk(2, dim=-1)[0].sum(-1)  # [N, G]
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, torch.topk(group_score, self.topk_group, dim=-1)[1], True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I].

    `weight_transform` (e.g. INT4 fake-quant for QAT) is applied to each stacked weight before use.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = activation(cfg.hidden_act)
        self.weight_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def sorted_forward(self, xs: torch.Tensor, counts: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        """xs: [M, H] rows sorted by expert (or, with `src` [M], the rows xs[src]), counts: [E] ->
        [M, H] expert outputs (unweighted), in sorted order.

        At decode sizes on CUDA (no autograd) the gate_up GEMM reads the rows xs[src] in place and, for
        silu, applies SwiGLU in its epilogue (`grouped_triton`): the bits of the unfused launches."""
        w1, w2 = self.gate_up_proj, self.down_proj
        if self.weight_transform is not None:
            w1, w2 = self.weight_transform(w1), self.weight_transform(w2)
        if grouped_triton.fusion_ok(xs, w1, xs.shape[0] if src is None else src.shape[0]):
            fused = self.act is F.silu
            h = grouped_triton.grouped_linear_triton(xs, w1, counts, src=src, swiglu=fused)  # [M, I] or [M, 2I]
            return grouped_linear(h if fused else gated(self.act, h), w2, counts)
        if src is not None:
            xs = xs.index_select(0, src)
        return grouped_linear(gated(self.act, grouped_linear(xs, w1, counts)), w2, counts)  # [M, 2I] -> [M, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, plan=None) -> torch.Tensor:
        """x: [N, H], weights/experts: [N, k] -> [N, H] = sum_k weight_k * expert_k(x)."""
        return dispatch(self.sorted_forward, x, weights, experts, self.gate_up_proj.shape[0], plan)


def sort_plan(x: torch.Tensor, experts: torch.Tensor, n_experts: int):
    """The expert sort of dispatch: experts [N, k] -> (src [N*k], inverse [N*k], counts [E]).

    Sorted row r is token `src[r]`'s slot; `inverse[n * k + j]` is the sorted row of token n's j-th
    slot; counts[e] rows go to expert e. Stable (slots of one expert in token order), no host sync.
    At decode sizes on CUDA one Triton launch (`moe_route.sort_route`), else torch's stable argsort.
    """
    n, k = experts.shape
    if moe_route.route_ok(x, n, k, n_experts):
        return moe_route.sort_route(experts, n_experts)
    flat = experts.reshape(-1)  # [N*k]
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    # [E] rows per expert; scatter_add (unlike bincount) needs no host sync on CUDA
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    # the inverse permutation, for an un-permute by gather (deterministic, unlike index_add's atomics)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order // k, inverse, counts


def combine(ys: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ys [N*k, H] in sorted order -> [N, H] = sum_j weights[n, j] * ys[inverse[n * k + j]], in a fixed
    order over the k slots of each token (one Triton pass on CUDA)."""
    if moe_combine.available(ys):
        return moe_combine.combine(ys, inverse, weights)
    n, k = weights.shape
    y = ys.index_select(0, inverse).view(n, k, -1)  # [N, k, H]
    return torch.einsum("nkh,nk->nh", y, weights) if k > 1 else y[:, 0] * weights


def dispatch(sorted_forward, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, n_experts: int, plan=None):
    """Sort token slots by expert, run `sorted_forward(x, counts, src)` (the expert outputs of rows
    x[src], in sorted order), un-permute, weight and sum.

    Shared by every experts implementation (bf16, FP8, INT4) and by the rollout engine, so they
    permute identically. No host sync: a CUDA graph can capture it. `plan` = (src, inverse,
    counts) when the router already sorted (`Router.route`), else `sort_plan` makes it.
    x: [N, H], weights/experts: [N, k] -> [N, H].
    """
    src, inverse, counts = plan if plan is not None else sort_plan(x, experts, n_experts)
    return combine(sorted_forward(x, counts, src), inverse, weights)  # [N*k, H] sorted -> [N, H]


class MoE(nn.Module):
    """Router + routed experts (+ shared experts). HF names: gate, experts, shared_experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared, cfg.hidden_act) if shared else None

    def forward(self, x: torch.Tensor, replay: torch.Tensor | None = None):
        """x: [B, T, H]; replay: [B*T, k] or None -> (out [B, T, H], experts [B*T, k])."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, H]
        weights, experts, plan = self.gate.route(flat, replay)
        out = self.experts(flat, weights, experts, plan).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, experts
