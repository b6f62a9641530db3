"""MoE routing at decode sizes in two launches (Triton): top-k of the router, then the expert sort.

At decode a MoE layer routes a few hundred token slots (64 tokens x top-8 at batch 64), and the
pure-torch routing is about fifteen tiny kernels per layer (softmax, topk, gather, sum, divide,
cast; then a stable argsort, which is a multi-pass radix sort, a scatter-add for the expert counts,
the inverse permutation, ...): ~68 us per layer in a CUDA graph on an H200, for microseconds of
arithmetic. Here:

- `topk_route(logits, k, renorm, scaling, dtype)`: the softmax router of `Router.forward`
  (probabilities in float32, top-k, optional renormalisation over the k, scaling, cast), a few
  tokens per program; then
- the sort of the N*k slots by expert that `moe.dispatch` needs, one program per expert: program e
  reads all N*k expert ids (a few KB), and its slots' rows are (slots of experts < e) + (earlier
  slots of expert e), a count and a cumsum: exactly the permutation of a *stable* argsort of the
  token-major expert ids. No program waits for another, so the latency is one program's.
  On an H200 (bench/decode_kernels.py): 4.6 us per layer for 64 tokens (+ the router GEMM, 5.2 us)
  against 68 us of torch ops; 6.3 us at 256 tokens. (A first version did everything in one
  program, in token chunks: 21-39 us, bound by the chain of block-wide reductions.)
- `sort_route(experts, n_experts)`: the sort alone, for routers the top-k kernel does not cover
  (sigmoid with group limits, replayed experts).

Both return the plan `(src, inverse, counts)`: `src[r]` the token of sorted row r (rows go to the
grouped GEMM as `x[src]`), `inverse[s]` the sorted row of slot s = token * k + j (the combine reads
it), `counts[e]` the rows of expert e. The `*_reference` functions are the same in pure torch (the
CPU path and what the tests compare against). Ties in the top-k go to the lower expert id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the pure-torch path is used
    triton = None

__all__ = ["MAX_SLOTS", "route_ok", "sort_route", "sort_route_reference", "topk_route", "topk_route_reference"]

MAX_SLOTS = 4096  # N * k slots sorted by one program per expert; prefill and training use torch
CONFIG = (4, 4)  # (tokens per top-k program, warps of a sort program): best of an H200 sweep


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def route_ok(x: torch.Tensor, n_tokens: int, k: int, n_experts: int) -> bool:
    """The kernel applies: CUDA, no autograd (inference, the engine), few enough slots, <= 1024 experts."""
    from miles_core import kernels

    return (
        kernels.DECODE_FUSION
        and triton is not None
        and x.is_cuda
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and 0 < n_tokens * k <= MAX_SLOTS
        and k <= n_experts <= 1024
    )


# ---- pure-torch references ---------------------------------------------------------------------


def topk_route_reference(logits: torch.Tensor, k: int, renorm: bool, scaling: float, dtype: torch.dtype):
    """logits [N, E] -> (weights [N, k] dtype, experts [N, k] int64): the softmax router of Router.forward."""
    scores = F.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
    experts = torch.topk(scores, k, dim=-1)[1]
    weights = scores.gather(1, experts)
    if renorm:
        weights = weights / weights.sum(-1, keepdim=True)
    weights = weights * scaling if scaling != 1.0 else weights
    return weights.to(dtype), experts


def sort_route_reference(experts: torch.Tensor, n_experts: int):
    """experts [N, k] -> (src [N*k], inverse [N*k], counts [E]) int64: a stable sort by expert."""
    n, k = experts.shape
    flat = experts.reshape(-1).long()  # [N*k] token-major
    order = torch.argsort(flat, stable=True)  # sorted row -> slot
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order // k, inverse, counts


# ---- the kernel --------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def topk_kernel(L, W, EX, N, E, stride_l, scaling, K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
                    BT: tl.constexpr, RENORM: tl.constexpr, SCALE: tl.constexpr):  # fmt: skip
        # L: [N, E] router logits -> W [N, K] weights, EX [N, K] int64 experts, for BT tokens per program.
        cols = tl.arange(0, EP)
        kcols = tl.arange(0, KP)
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        live = toks < N
        x = tl.load(
            L + toks[:, None].to(tl.int64) * stride_l + cols[None, :],
            mask=live[:, None] & (cols[None, :] < E),
            other=float("-inf"),
        ).to(tl.float32)  # [BT, EP]
        mx = tl.max(x, axis=1)  # [BT]
        total = tl.sum(tl.exp(x - mx[:, None]), axis=1)  # [BT] softmax denominator (NaN stays NaN)
        x = tl.where(x == x, x, float("-inf"))  # a NaN logit is never chosen (its row's weights are NaN)
        ex = tl.zeros([BT, KP], tl.int32)
        p = tl.zeros([BT, KP], tl.float32)
        for j in tl.static_range(K):
            m = tl.max(x, axis=1)  # [BT] the j-th largest logit
            idx = tl.min(tl.where(x == m[:, None], cols[None, :], EP), axis=1)  # lowest id among ties
            x = tl.where(cols[None, :] == idx[:, None], float("-inf"), x)
            ex = tl.where(kcols[None, :] == j, idx[:, None], ex)
            p = tl.where(kcols[None, :] == j, tl.div_rn(tl.exp(m - mx), total)[:, None], p)
        if RENORM:
            p = tl.div_rn(p, tl.sum(p, axis=1)[:, None])
        if SCALE:
            p = p * scaling
        out = toks[:, None].to(tl.int64) * K + kcols[None, :]
        m = live[:, None] & (kcols[None, :] < K)
        tl.store(W + out, p.to(W.dtype.element_ty), mask=m)
        tl.store(EX + out, tl.minimum(ex, E - 1).to(tl.int64), mask=m)

    @triton.jit
    def sort_kernel(EX, SRC, INV, CNT, S, K: tl.constexpr, SP: tl.constexpr):
        # Program e places the slots that chose expert e. EX: [S] expert of each slot (S = N * K,
        # token-major); SRC, INV: [S] int64; CNT: [E] int64.
        e = tl.program_id(0)
        slots = tl.arange(0, SP)
        ex = tl.load(EX + slots, mask=slots < S, other=-1)  # [SP]
        mine = (ex == e).to(tl.int32)
        start = tl.sum((ex < e) & (slots < S))  # rows of the experts before e
        row = start + tl.cumsum(mine, axis=0) - mine  # [SP] stable: slot order within the expert
        tl.store(CNT + e, tl.sum(mine).to(tl.int64))
        tl.store(INV + slots, row.to(tl.int64), mask=mine == 1)
        tl.store(SRC + row, (slots // K).to(tl.int64), mask=mine == 1)


def _sort(experts: torch.Tensor, n_experts: int, warps: int):
    """experts [N, k] (int, contiguous) -> plan (src, inverse, counts): one program per expert."""
    n, k = experts.shape
    s = n * k
    src = torch.empty(s, dtype=torch.long, device=experts.device)
    inverse = torch.empty(s, dtype=torch.long, device=experts.device)
    counts = torch.empty(n_experts, dtype=torch.long, device=experts.device)
    warps = warps if s <= 1024 else 2 * warps  # 2048 slots (batch 256): 8 warps ran 10.4 us vs 11.6 (H200)
    sort_kernel[(n_experts,)](experts, src, inverse, counts, s, K=k, SP=_p2(s), num_warps=warps)
    return src, inverse, counts


def topk_route(logits: torch.Tensor, k: int, renorm: bool, scaling: float, dtype: torch.dtype, tile=None):
    """logits [N, E] (any float dtype) -> (weights [N, k] dtype, experts [N, k] int64, plan).

    Same values as `topk_route_reference` + `sort_route_reference` (float32 softmax; the sums may
    differ from torch's in reduction order, i.e. in the last float32 bit before the cast).
    `tile` = (tokens per top-k program, warps of the sort); default CONFIG."""
    n, e = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bt, warps = tile or CONFIG
    weights = torch.empty(n, k, dtype=dtype, device=logits.device)
    experts = torch.empty(n, k, dtype=torch.long, device=logits.device)
    grid = (-(-n // bt),)
    topk_kernel[grid](logits, weights, experts, n, e, logits.stride(0), float(scaling), K=k, KP=_p2(k), EP=_p2(e),
                      BT=bt, RENORM=renorm, SCALE=scaling != 1.0, num_warps=4)  # fmt: skip
    return weights, experts, _sort(experts, e, warps)


def sort_route(experts: torch.Tensor, n_experts: int, tile=None):
    """experts [N, k] -> plan (src, inverse, counts), equal to `sort_route_reference`."""
    return _sort(experts.contiguous(), n_experts, (tile or CONFIG)[1])
