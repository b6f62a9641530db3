"""Decode-step sampling of the rows that need no sort, in two launches (Triton).

`rollout.sampling.sample` on a [64, 151936] step is a chain of vocabulary-sized torch passes
(a float32 copy, log_softmax, exp, cumsum, searchsorted, gather) and ~15 tiny int64 kernels for the
counter-based uniform: ~0.15 ms of a ~3.5 ms step, for one read of the logits' worth of work. Here,
for greedy rows and rows that sample softmax(logits / T) with no top-k/top-p/min-p:

- `_chunk_stats_kernel`, grid (rows, vocabulary chunks): each program reads one chunk of one row
  once and keeps three numbers: the chunk's max of logits / T, sum of exp(x - that max), and the
  first index of the max. A row alone is too little work for one program (64 rows against 132 SMs),
  a chunk of 4096 is enough to hide the loads.
- `_pick_kernel`, one program per row: combines the chunks into the row's max and softmax total;
  greedy takes the first index of the max (torch.argmax's tie rule); sampling draws u = `uniform(
  seed, step)` (the same 32-bit hash, in uint32 arithmetic), finds the chunk where the cumulative
  mass first exceeds u * total and scans that chunk alone (a second read of 1/38 of the row).

The draw is the inverse CDF of `sampling._inverse_cdf` over the vocabulary order (the first token
whose cumulative mass exceeds u * total), with two deliberate differences that only float32
rounding can reach: a token of probability 0 is never drawn (where rounding puts the target past
every crossing, the last token of nonzero probability is), and the partial sums are added in a
different order, so a target within float32 rounding of a boundary may fall on the neighbour.
The recorded log-prob is (x / T)[token] - max - log(total) as torch's log_softmax computes it; the
division is IEEE (`div_rn`), as torch's, so x / T is bit-identical. NaN logits are not handled.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no triton: the pure-torch path is used
    triton = None

__all__ = ["CONFIG", "available", "sample_plain", "uniform_triton"]

CONFIG = (4096, 4, 4)  # (vocabulary chunk, warps of the chunk kernel, warps of the pick kernel)


def available(logits: torch.Tensor) -> bool:
    """The kernels apply: switched on (kernels.DECODE_FUSION), triton present, CUDA logits, >= 1 row."""
    from miles_core import kernels

    return kernels.DECODE_FUSION and triton is not None and logits.is_cuda and logits.shape[0] > 0


if triton is not None:

    @triton.jit
    def _mix32(x):
        """lowbias32 on uint32 (products wrap mod 2^32): `sampling._mix32` without the int64 masks."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _uniform(seed, step):
        """`sampling.uniform` bit for bit: int64 seed, step (scalars or blocks) -> float32 in (0, 1]."""
        h = _mix32(seed.to(tl.uint32) ^ 0x5BD1E995)
        h = _mix32(h ^ (seed >> 32).to(tl.uint32))
        h = _mix32(h ^ (step.to(tl.uint32) * 0x9E3779B1))
        h = _mix32(h + (step >> 32).to(tl.uint32))
        return ((h >> 8).to(tl.int32).to(tl.float32) + 0.5) * (1.0 / 16777216.0)

    @triton.jit
    def _uniform_kernel(SEED, STEP, U, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < N
        u = _uniform(tl.load(SEED + offs, mask=live, other=0), tl.load(STEP + offs, mask=live, other=0))
        tl.store(U + offs, u, mask=live)

    @triton.jit
    def _scaled(L, row, stride, offs, V, t):
        """logits[row, offs] / t in float32 [CHUNK] (-inf past V); t = 1 skips the division."""
        x = tl.load(L + row.to(tl.int64) * stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if t != 1.0:
            x = tl.div_rn(x, t)  # IEEE, as torch's logits.float() / T
        return x

    @triton.jit
    def _row_temperature(T, row):
        """The T of the row's log-prob: its temperature, 1 for greedy (0)."""
        t = tl.load(T + row)
        return tl.where(t > 0, t, 1.0)

    @triton.jit
    def _chunk_stats_kernel(L, T, MX, SM, AM, V, stride, C, CHUNK: tl.constexpr):
        # L: [N, V] logits (row stride `stride`); MX, SM: [N, C] float32; AM: [N, C] int32. Grid (N, C).
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        x = _scaled(L, row, stride, offs, V, _row_temperature(T, row))  # [CHUNK]
        mx = tl.max(x, 0)
        first = tl.min(tl.where(x == mx, offs, V), 0)  # torch.argmax: the first of equal maxima
        ref = tl.where(mx == float("-inf"), 0.0, mx)  # an all -inf chunk sums to 0, not NaN
        total = tl.sum(tl.exp(x - ref), 0)
        out = row.to(tl.int64) * C + chunk
        tl.store(MX + out, mx)
        tl.store(SM + out, total)
        tl.store(AM + out, first)

    @triton.jit
    def _draw(L, row, stride, V, t, m, w, target, CHUNK: tl.constexpr, CP: tl.constexpr):
        """The first token whose cumulative mass exceeds `target` (never one of mass 0) and its x / T.
        w [CP]: each chunk's mass exp(x - m) summed; only the chunk the target falls in is read."""
        cs = tl.arange(0, CP)
        cum = tl.cumsum(w, 0)  # [CP]
        last = tl.max(tl.where(w > 0, cs, -1), 0)  # the last chunk with mass
        chunk = tl.minimum(tl.min(tl.where(cum > target, cs, CP), 0), last)
        base = tl.sum(tl.where(cs == chunk - 1, cum, 0.0), 0)  # mass before the chunk (<= target)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        x = _scaled(L, row, stride, offs, V, t)  # [CHUNK]
        p = tl.exp(x - m)
        cross = (base + tl.cumsum(p, 0) > target) & (p > 0)
        token = tl.min(tl.where(cross, offs, V), 0)
        token = tl.where(token < V, token, tl.max(tl.where(p > 0, offs, -1), 0))  # rounding ran past the end
        return token, tl.sum(tl.where(offs == token, x, 0.0), 0)

    @triton.jit
    def _pick_kernel(L, T, SEED, STEP, MX, SM, AM, TOK, LP, V, stride, C, CHUNK: tl.constexpr, CP: tl.constexpr):
        # MX, SM, AM: [N, C] chunk stats; TOK: [N] int64, LP: [N] float32. Grid (N,).
        row = tl.program_id(0)
        cs = tl.arange(0, CP)
        stats = row.to(tl.int64) * C + cs
        mc = tl.load(MX + stats, mask=cs < C, other=float("-inf"))  # [CP]
        m = tl.max(mc, 0)
        w = tl.load(SM + stats, mask=cs < C, other=0.0) * tl.exp(mc - m)  # [CP] chunk mass, units exp(m)
        total = tl.sum(w, 0)
        token = tl.min(tl.where(mc == m, tl.load(AM + stats, mask=cs < C, other=V), V), 0)  # greedy
        x_tok = m
        t = tl.load(T + row)
        if t > 0:
            target = _uniform(tl.load(SEED + row), tl.load(STEP + row)) * total
            token, x_tok = _draw(L, row, stride, V, t, m, w, target, CHUNK, CP)
        tl.store(TOK + row, token.to(tl.int64))
        tl.store(LP + row, (x_tok - m) - tl.log(total))  # torch's log_softmax: (x - max) - log(sum)


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def sample_plain(
    logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, step: torch.Tensor, config=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (bf16/fp16/fp32), temperature [N] float32 (0 = greedy), seed, step [N] int64
    -> (tokens [N] int64, log-probs [N] float32 of log_softmax(logits / T) at them, T = 1 if greedy).

    `config` = (chunk, warps, warps); default CONFIG. No host sync, fixed grids (capturable)."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk, warps_stats, warps_pick = config or CONFIG
    c = triton.cdiv(v, chunk)
    dev = logits.device
    mx = torch.empty(n, c, dtype=torch.float32, device=dev)  # [N, C] chunk max of logits / T
    sm = torch.empty(n, c, dtype=torch.float32, device=dev)  # [N, C] chunk sum of exp(x - chunk max)
    am = torch.empty(n, c, dtype=torch.int32, device=dev)  # [N, C] chunk's first index of its max
    t = temperature.float()
    _chunk_stats_kernel[(n, c)](logits, t, mx, sm, am, v, logits.stride(0), c, CHUNK=chunk, num_warps=warps_stats)
    tokens = torch.empty(n, dtype=torch.int64, device=dev)
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    _pick_kernel[(n,)](
        logits, t, seed, step, mx, sm, am, tokens, logp, v, logits.stride(0), c,
        CHUNK=chunk, CP=_p2(c), num_warps=warps_pick,
    )  # fmt: skip
    return tokens, logp


def uniform_triton(seed: torch.Tensor, step: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The kernels' uniform for seed, step [N] int64 -> [N] float32 (tests: equal to `sampling.uniform`)."""
    n = seed.numel()
    u = torch.empty(n, dtype=torch.float32, device=seed.device)
    _uniform_kernel[(triton.cdiv(n, block),)](seed, step, u, n, BLOCK=block)
    return u
