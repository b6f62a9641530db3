"""Triton kernels for the quantized paths. Imported only through `load()` in fp8_gemm.py /
w4a16_gemm.py, so that miles_core imports without triton.

- `fp8_act_quant_kernel`: 1x128 dynamic activation quantization (bf16/fp32 -> e4m3 + fp32 scale per
  row and 128 columns), scales written through arbitrary strides so that `torch._scaled_mm` gets
  its column-major scale layout without a transpose copy.
- `w4a16_kernel`: y = x @ dequant(W)^T for packed int4 W (compressed-tensors layout). The nibbles
  are unpacked in registers to exact small integers in bf16, the tile's dot runs on tensor cores,
  and the group scale multiplies the fp32 partial sum (one multiply per output per group instead
  of one per weight, and no rounding of q*scale to bf16). Split-K keeps the GPU busy at decode
  sizes, where the whole cost is streaming the 4-bit weights once; the last split of a tile sums
  the partials (no zero fill or cast launches).
- `w4a16_planes_kernel`: the decode-size variant: nibbles stay in their words and the activations
  are split into the 8 nibble planes instead; int4 -> float by bit tricks (no conversions).
- `grouped_*_kernel`: the same for MoE experts, rows sorted by expert; a program's tile -> expert
  map is computed on the device from the per-expert tile counts (no host sync, no padding of rows).
- `grouped_fp8_kernel`: FP8 block-scaled grouped GEMM (1x128 activation and 128x128 weight scales
  applied to each 128-deep partial product in fp32, the DeepSeek-V3 recipe).
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # globals inside @triton.jit must be constexpr


@triton.jit
def fp8_act_quant_kernel(
    X, Q, S, M, M_ALLOC, K, stride_xm, stride_qm, stride_sm, stride_sk, EPS, BM: tl.constexpr, BLOCK: tl.constexpr
):
    # X: [M, K]; Q: [M_alloc, K] fp8; S: scale [M_alloc, ceil(K/BLOCK)] with strides (stride_sm, stride_sk).
    # Rows in [M, M_alloc) (padding for cuBLAS) are written as zeros with scale EPS/448.
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), EPS)  # [BM]
    # div_rn: IEEE division, as torch does (Triton's `/` on fp32 is the approximate div.full)
    scale = tl.div_rn(amax, FP8_MAX)
    q = tl.clamp(tl.div_rn(x, scale[:, None]), -FP8_MAX, FP8_MAX)
    out_mask = (rows[:, None] < M_ALLOC) & (cols[None, :] < K)
    tl.store(Q + rows[:, None] * stride_qm + cols[None, :], q.to(Q.dtype.element_ty), mask=out_mask)
    tl.store(S + rows * stride_sm + pid_k * stride_sk, scale, mask=rows < M_ALLOC)


@triton.jit
def _load_int4(
    W, cols, stride_wn, k0, N, k_words, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, UNPACK: tl.constexpr
):
    # -> [BN, BK] int32 in [-8, 7] for input columns k0 .. k0+BK; column 8j+i is nibble i of word j.
    # UNPACK 0: load [BN, BK/8] words, shift into [BN, BK/8, 8], reshape.
    # UNPACK 1: load the word of every column (each word 8 times, from L1), shift by column.
    # UNPACK 2: load [BN, BK/8] words, repeat each 8 times with tl.interleave, shift by column.
    if UNPACK == 1:
        ks = k0 + tl.arange(0, BK)
        wp = tl.load(
            W + cols[:, None] * stride_wn + ks[None, :] // 8,
            mask=(cols[:, None] < N) & ((ks[None, :] < k_words * 8) | EVEN_K),
            other=0,
        )
        nib = (wp >> ((tl.arange(0, BK) % 8) * 4)[None, :]) & 0xF
    else:
        words = k0 // 8 + tl.arange(0, BK // 8)
        wp = tl.load(
            W + cols[:, None] * stride_wn + words[None, :],
            mask=(cols[:, None] < N) & ((words[None, :] < k_words) | EVEN_K),
            other=0,
        )
        if UNPACK == 0:
            shifts = tl.arange(0, 8) * 4
            nib = tl.reshape((wp[:, :, None] >> shifts[None, None, :]) & 0xF, (BN, BK))
        else:
            wp = tl.interleave(wp, wp)
            wp = tl.interleave(wp, wp)
            wp = tl.interleave(wp, wp)
            nib = (wp >> ((tl.arange(0, BK) % 8) * 4)[None, :]) & 0xF
    return nib - 8


@triton.jit
def _mac(acc, x, w, s):
    # acc [BM, BN] += (x [BM, BK] @ w^T [BK, BN]) * s [BN]; a GEMV in fp32 FMAs when BM == 1.
    if x.shape[0] == 1:
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :] * s[None, :]
    else:
        acc += tl.dot(x, tl.trans(w.to(x.dtype))) * s[None, :]
    return acc


@triton.jit
def w4a16_kernel(
    X,
    W,
    S,
    Y,
    P,
    LOCKS,
    M,
    N,
    K,
    kb_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sg,
    stride_ym,
    GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    UNPACK: tl.constexpr,
):
    # X: [M, K] bf16 (fp16/fp32 also run: the interpreter tests); W: [N, ceil(K/8)] int32;
    # S: [N, ceil(K/GROUP)]; Y: [M, N]; P: [SPLIT_K, M, N] fp32 partials, LOCKS: tile counters (SPLIT_K > 1).
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    # kb_per_split = ceil(ceil(K / BK) / SPLIT_K) K blocks per split (the last may run past K: masked)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(0, kb_per_split):
        k0 = (pid_k * kb_per_split + i) * BK
        ks = k0 + tl.arange(0, BK)
        x = tl.load(
            X + rows[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < M) & ((ks[None, :] < K) | EVEN_K),
            other=0.0,
        )
        w = _load_int4(W, cols, stride_wn, k0, N, k_words, BN, BK, EVEN_K, UNPACK)  # exact small integers
        s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=(cols < N) & (k0 < K), other=0.0)
        s = s.to(tl.float32)  # masked past K: a split that runs past the end adds 0, not 0 * garbage
        acc = _mac(acc, x, w, s)
    _store_split(acc, Y, P, LOCKS, rows, cols, M, N, stride_ym, SPLIT_K)


@triton.jit
def _store_split(acc, Y, P, LOCKS, rows, cols, M, N, stride_ym, SPLIT_K: tl.constexpr):
    # acc [BM, BN] fp32: this program's sum over its K range (split program_id(2)).
    # SPLIT_K > 1: each split writes its partial to P [SPLIT_K, M, N] fp32 and counts itself in LOCKS
    # (one int32 per output tile, zero between calls); the last split to arrive sums the partials in
    # split order (deterministic), stores Y and resets the counter. One launch: no zero fill, no cast.
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        offs = rows[:, None] * N + cols[None, :]
        tl.store(P + tl.program_id(2) * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the (releasing) count below
        tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(LOCKS + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tot = tl.zeros_like(acc)
            for i in tl.static_range(SPLIT_K):  # .cg: read from L2, where the other SMs' stores are
                tot += tl.load(P + i * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, tot.to(Y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(LOCKS + tile, 0)


@triton.jit
def _plane(wp, I: tl.constexpr):
    # int32 words -> fp32 1 + u/16, u = nibble I (bits 4I..4I+3, the stored q + 8). The nibble is moved
    # into the top 4 mantissa bits of 1.0: a shift and one and/or (LOP3), no int -> float conversion.
    # 1 + u/16 is exact in bf16/fp16 too. sum_k x (1 + u/16) = 1.5 sum_k x + sum_k x q / 16.
    if 4 * I <= 19:
        t = wp << (19 - 4 * I)
    else:
        t = wp >> (4 * I - 19)
    return ((t & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def w4a16_planes_kernel(
    X,
    W,
    S,
    Y,
    P,
    LOCKS,
    M,
    N,
    K,
    kb_per_split,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_sg,
    stride_ym,
    GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SWAP: tl.constexpr,
):
    # The skinny (decode) W4A16 GEMM. Weights stay packed as loaded ([BN, BK/8] int32, 16-byte loads);
    # instead of interleaving nibbles into K order, the *activations* are split into the 8 nibble
    # planes (x[:, 8j + i] goes with nibble i of word j), which costs loads of the small x tile only.
    # BM == 1: a GEMV in fp32 FMAs, 3 ALU ops per weight (shift, LOP3, FMA), the K reduction kept
    # per word in registers until the end. BM >= 16: 8 tensor-core dots of depth BK/8 per K block
    # (SWAP: W as the MMA's M side, y^T = W x^T). BK divides GROUP (one scale per row per K block).
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    wl = tl.arange(0, BK // 8)
    k_words = (K + 7) // 8
    if BM == 1:
        acc = tl.zeros((BN, BK // 8), dtype=tl.float32)
    elif SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for it in range(0, kb_per_split):
        k0 = (pid_k * kb_per_split + it) * BK
        words = k0 // 8 + wl
        wmask = (cols[:, None] < N) & ((words[None, :] < k_words) | EVEN_K)
        wp = tl.load(W + cols[:, None] * stride_wn + words[None, :], mask=wmask, other=0)  # [BN, BK/8]
        s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=(cols < N) & (k0 < K), other=0.0)
        s = s.to(tl.float32)  # masked past K: a split that runs past the end adds 0, not 0 * garbage
        if BM == 1:
            p = tl.zeros((BN, BK // 8), dtype=tl.float32)
            xsum = tl.zeros((BK // 8,), dtype=tl.float32)
            for i in tl.static_range(8):
                ks = k0 + 8 * wl + i
                xi = tl.load(X + pid_m * stride_xm + ks, mask=(ks < K) | EVEN_K, other=0.0).to(tl.float32)
                p += _plane(wp, i) * xi[None, :]
                xsum += xi
            acc += (p - 1.5 * xsum[None, :]) * s[:, None]
        else:
            xsum = tl.zeros((BM,), dtype=tl.float32)
            if SWAP:
                part = tl.zeros((BN, BM), dtype=tl.float32)
            else:
                part = tl.zeros((BM, BN), dtype=tl.float32)
            for i in tl.static_range(8):
                ks = k0 + 8 * wl + i
                xmask = (rows[:, None] < M) & ((ks[None, :] < K) | EVEN_K)
                xi = tl.load(X + rows[:, None] * stride_xm + ks[None, :], mask=xmask, other=0.0)  # [BM, BK/8]
                wi = _plane(wp, i).to(xi.dtype)  # [BN, BK/8], exact
                if SWAP:
                    part = tl.dot(wi, tl.trans(xi), part)
                else:
                    part = tl.dot(xi, tl.trans(wi), part)
                xsum += tl.sum(xi.to(tl.float32), axis=1)
            if SWAP:
                acc += (part - 1.5 * xsum[None, :]) * s[:, None]
            else:
                acc += (part - 1.5 * xsum[:, None]) * s[None, :]
    if BM == 1:
        out = (16.0 * tl.sum(acc, axis=1))[None, :]  # [1, BN]
    elif SWAP:
        out = 16.0 * tl.trans(acc)
    else:
        out = 16.0 * acc
    _store_split(out, Y, P, LOCKS, rows, cols, M, N, stride_ym, SPLIT_K)


@triton.jit
def _expert_tile(TILE_END, ROW_START, COUNTS, E, pid, E_P2: tl.constexpr, BM: tl.constexpr):
    # Which expert owns tile `pid`, and that tile's row range; e == E when pid is past the last tile.
    es = tl.arange(0, E_P2)
    ends = tl.load(TILE_END + es, mask=es < E, other=2147483647)
    e = tl.sum((ends <= pid).to(tl.int32))
    e_safe = tl.minimum(e, E - 1)
    first = tl.load(TILE_END + e_safe - 1, mask=e_safe > 0, other=0)
    r0 = tl.load(ROW_START + e_safe) + (pid - first) * BM
    r1 = tl.load(ROW_START + e_safe) + tl.load(COUNTS + e_safe)
    return e, e_safe, r0, r1


@triton.jit
def grouped_w4a16_kernel(
    X,
    W,
    S,
    Y,
    TILE_END,
    ROW_START,
    COUNTS,
    E,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_sg,
    stride_ym,
    GROUP: tl.constexpr,
    E_P2: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    UNPACK: tl.constexpr,
):
    # X: [M, K] rows sorted by expert; W: [E, N, ceil(K/8)] int32; S: [E, N, ceil(K/GROUP)]; Y: [M, N].
    e, e_safe, r0, r1 = _expert_tile(TILE_END, ROW_START, COUNTS, E, tl.program_id(0), E_P2, BM)
    if e >= E:
        return
    rows = r0 + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    W += e_safe.to(tl.int64) * stride_we
    S += e_safe.to(tl.int64) * stride_se
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(
            X + rows[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < r1) & ((ks[None, :] < K) | EVEN_K),
            other=0.0,
        )
        w = _load_int4(W, cols, stride_wn, k0, N, k_words, BN, BK, EVEN_K, UNPACK)  # exact small integers
        s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=cols < N, other=0.0).to(tl.float32)
        acc = _mac(acc, x, w, s)
    mask = (rows[:, None] < r1) & (cols[None, :] < N)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def grouped_fp8_kernel(
    A,
    SA,
    B,
    SB,
    Y,
    TILE_END,
    ROW_START,
    COUNTS,
    E,
    N,
    K,
    stride_am,
    stride_sam,
    stride_be,
    stride_bn,
    stride_sbe,
    stride_sbn,
    stride_ym,
    E_P2: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # A: [M, K] fp8 rows sorted by expert, SA: [M, ceil(K/128)] fp32; B: [E, N, K] fp8,
    # SB: [E, ceil(N/128), ceil(K/128)] fp32; Y: [M, N]. BK == 128 and BN divides 128.
    e, e_safe, r0, r1 = _expert_tile(TILE_END, ROW_START, COUNTS, E, tl.program_id(0), E_P2, BM)
    if e >= E:
        return
    rows = r0 + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    B += e_safe.to(tl.int64) * stride_be
    SB += e_safe.to(tl.int64) * stride_sbe + (tl.program_id(1) * BN // 128) * stride_sbn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BK)):
        ks = kb * BK + tl.arange(0, BK)
        a = tl.load(
            A + rows[:, None] * stride_am + ks[None, :],
            mask=(rows[:, None] < r1) & ((ks[None, :] < K) | EVEN_K),
            other=0.0,
        )
        b = tl.load(
            B + cols[:, None] * stride_bn + ks[None, :],
            mask=(cols[:, None] < N) & ((ks[None, :] < K) | EVEN_K),
            other=0.0,
        )
        sa = tl.load(SA + rows * stride_sam + kb, mask=rows < r1, other=0.0)
        sb = tl.load(SB + kb)
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
    mask = (rows[:, None] < r1) & (cols[None, :] < N)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)
