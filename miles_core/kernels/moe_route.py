"""MoE routing at decode sizes in one launch (Triton): top-k of the router, then the expert sort.

At decode a MoE layer routes a few hundred token slots (64 tokens x top-8 at batch 64), and the
pure-torch routing is about fifteen tiny kernels per layer (softmax, topk, gather, sum, divide,
cast; then a stable argsort, which is a multi-pass radix sort, a scatter-add for the expert counts,
the inverse permutation, ...): ~40 us of launches per layer in a CUDA graph, for microseconds of
arithmetic. Here one program does all of it:

- `topk_route(logits, k, renorm, scaling, dtype)`: the softmax router of `Router.forward`
  (probabilities in float32, top-k, optional renormalisation over the k, scaling, cast), plus
- the sort of the N*k slots by expert that `moe.dispatch` needs, as a counting sort: pass 1 takes
  the histogram of the chosen experts; pass 2 gives each slot its row in expert order (the
  expert's first row + the slots of that expert in earlier tokens, an exclusive cumsum down the
  [tokens, experts] one-hot tile + earlier slots of the same token), which is exactly the
  permutation of a *stable* argsort of the token-major expert ids. Pass 2 reads pass 1's expert
  stores back after a barrier (`__syncthreads` orders global memory within the program).
  Tokens go in chunks (16 at 128 experts by default, `CONFIG`), so a [chunk, experts] tile is a
  few registers per thread.
- `sort_route(experts, n_experts)`: the sort alone, for routers the kernel does not cover (sigmoid
  with group limits, replayed experts).

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

MAX_SLOTS = 4096  # N * k routed in one program; beyond it (prefill, training) the torch path is faster
CONFIG = (2048, 4)  # (elements of the [tokens, experts] tile a chunk works on, warps)


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
    def _topk(L, W, EX, stride_l, toks, N, E, scaling, K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr,
              RENORM: tl.constexpr, SCALE: tl.constexpr):  # fmt: skip
        """The router on tokens `toks` [BT]: stores weights and experts [BT, K]; returns the one-hot
        count of each token's experts [BT, EP]."""
        cols = tl.arange(0, EP)
        kcols = tl.arange(0, KP)
        live = toks < N
        x = tl.load(
            L + toks[:, None].to(tl.int64) * stride_l + cols[None, :],
            mask=live[:, None] & (cols[None, :] < E),
            other=float("-inf"),
        ).to(tl.float32)  # [BT, EP]
        mx = tl.max(x, axis=1)  # [BT]
        total = tl.sum(tl.exp(x - mx[:, None]), axis=1)  # [BT] softmax denominator (NaN stays NaN)
        x = tl.where(x == x, x, float("-inf"))  # a NaN logit is never chosen (its row's weights are NaN)
        hits = tl.zeros(x.shape, tl.int32)
        ex = tl.zeros([x.shape[0], KP], tl.int32)
        p = tl.zeros([x.shape[0], KP], tl.float32)
        for j in tl.static_range(K):
            m = tl.max(x, axis=1)  # [BT] the j-th largest logit
            idx = tl.min(tl.where(x == m[:, None], cols[None, :], EP), axis=1)  # lowest id among ties
            chosen = cols[None, :] == idx[:, None]  # [BT, EP]
            hits += chosen.to(tl.int32)
            x = tl.where(chosen, float("-inf"), x)
            ex = tl.where(kcols[None, :] == j, idx[:, None], ex)
            p = tl.where(kcols[None, :] == j, tl.div_rn(tl.exp(m - mx), total)[:, None], p)
        if RENORM:
            p = tl.div_rn(p, tl.sum(p, axis=1)[:, None])
        if SCALE:
            p = p * scaling
        out = toks[:, None].to(tl.int64) * K + kcols[None, :]
        m = live[:, None] & (kcols[None, :] < K)
        tl.store(W + out, p.to(W.dtype.element_ty), mask=m)
        tl.store(EX + out, ex.to(tl.int64), mask=m)
        return tl.where(live[:, None], hits, 0)

    @triton.jit
    def route_kernel(
        L,
        EX_IN,
        W,
        EX,
        SRC,
        INV,
        CNT,
        N,
        E,
        stride_l,
        scaling,
        K: tl.constexpr,
        KP: tl.constexpr,
        EP: tl.constexpr,
        BT: tl.constexpr,
        TOPK: tl.constexpr,
        RENORM: tl.constexpr,
        SCALE: tl.constexpr,
    ):
        # L: [N, E] router logits (TOPK) or EX_IN: [N, K] experts; W, EX: [N, K] weights / experts out (TOPK);
        # SRC, INV: [N*K] int64; CNT: [E] int64. One program; tokens in chunks of BT.
        cols = tl.arange(0, EP)
        counts = tl.zeros([EP], tl.int32)
        for t0 in range(0, N, BT):  # pass 1: the router's choice and the histogram
            toks = t0 + tl.arange(0, BT)
            if TOPK:
                hits = _topk(L, W, EX, stride_l, toks, N, E, scaling, K, KP, EP, RENORM, SCALE)
            else:
                hits = tl.zeros([BT, EP], tl.int32)
                for j in tl.static_range(K):
                    e = tl.load(EX_IN + toks.to(tl.int64) * K + j, mask=toks < N, other=EP)
                    hits += (cols[None, :] == e[:, None]).to(tl.int32)
            counts += tl.sum(hits, axis=0)
        tl.store(CNT + cols, counts.to(tl.int64), mask=cols < E)
        tl.debug_barrier()  # pass 1's expert stores are visible to every thread of the program
        start = tl.cumsum(counts, axis=0) - counts  # [EP] first sorted row of each expert
        for t0 in range(0, N, BT):  # pass 2: each slot's row in expert order (a stable sort)
            toks = t0 + tl.arange(0, BT)
            live = toks < N
            slots = toks.to(tl.int64) * K
            hits = tl.zeros([BT, EP], tl.int32)
            for j in tl.static_range(K):
                e = tl.load((EX if TOPK else EX_IN) + slots + j, mask=live, other=EP)
                hits += (cols[None, :] == e[:, None]).to(tl.int32)
            row = tl.cumsum(hits, axis=0) - hits + start[None, :]  # [BT, EP] rows taken by earlier tokens
            start += tl.sum(hits, axis=0)
            for j in tl.static_range(K):  # earlier slots of the same token (a repeated expert) first
                e = tl.load((EX if TOPK else EX_IN) + slots + j, mask=live, other=EP)
                hit = cols[None, :] == e[:, None]
                r = tl.sum(tl.where(hit, row, 0), axis=1)  # [BT]
                row += hit.to(tl.int32)
                tl.store(INV + slots + j, r.to(tl.int64), mask=live)
                tl.store(SRC + r, toks.to(tl.int64), mask=live)


def _launch(n, k, n_experts, device, logits=None, experts_in=None, renorm=False, scaling=1.0, dtype=None, tile=None):
    """One program over all N tokens: top-k (given logits) or the given experts, then the sort.
    `tile` = (tokens per chunk, warps); default CONFIG (chosen on the device, bench/route.py)."""
    kp, ep = _p2(k), _p2(n_experts)
    elements, warps = tile or CONFIG
    bt = max(1, min(_p2(n), elements // ep))
    src = torch.empty(n * k, dtype=torch.long, device=device)
    inverse = torch.empty(n * k, dtype=torch.long, device=device)
    counts = torch.empty(n_experts, dtype=torch.long, device=device)
    topk = logits is not None
    weights = torch.empty(n, k, dtype=dtype, device=device) if topk else src
    experts = torch.empty(n, k, dtype=torch.long, device=device) if topk else src
    route_kernel[(1,)](
        logits if topk else experts_in,
        experts_in if not topk else logits,
        weights,
        experts,
        src,
        inverse,
        counts,
        n,
        n_experts,
        logits.stride(0) if topk else 0,
        float(scaling),
        K=k,
        KP=kp,
        EP=ep,
        BT=bt,
        TOPK=topk,
        RENORM=renorm,
        SCALE=scaling != 1.0,
        num_warps=warps,
    )
    return weights, experts, (src, inverse, counts)


def topk_route(logits: torch.Tensor, k: int, renorm: bool, scaling: float, dtype: torch.dtype, tile=None):
    """logits [N, E] (any float dtype) -> (weights [N, k] dtype, experts [N, k] int64, plan).

    Same values as `topk_route_reference` + `sort_route_reference` (float32 softmax; the sums may
    differ from torch's in reduction order, i.e. in the last float32 bit before the cast)."""
    n, e = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _launch(n, k, e, logits.device, logits=logits, renorm=renorm, scaling=scaling, dtype=dtype, tile=tile)


def sort_route(experts: torch.Tensor, n_experts: int, tile=None):
    """experts [N, k] -> plan (src, inverse, counts), equal to `sort_route_reference`."""
    n, k = experts.shape
    return _launch(n, k, n_experts, experts.device, experts_in=experts.contiguous(), tile=tile)[2]
