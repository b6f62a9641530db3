"""Triton kernels for the quantized paths. Imported only through `load()` in fp8_gemm.py /
w4a16_gemm.py, so that miles_core imports without triton.

- `fp8_act_quant_kernel`: 1x128 dynamic activation quantization (bf16/fp32 -> e4m3 + fp32 scale per
  row and 128 columns), scales written through arbitrary strides so that `torch._scaled_mm` gets
  its column-major scale layout without a transpose copy. GATHER reads the rows x[src] in place (the
  MoE experts' rows sorted by expert, without an index_select copy first).
- `swiglu_fp8_quant_kernel`: SwiGLU on the experts' gate_up output, rounded as `swiglu` rounds, then
  quantized as above: the down GEMM's fp8 input in one launch, the same bits as the two launches.
- `w4a16_kernel`: y = x @ dequant(W)^T for packed int4 W (compressed-tensors layout). The nibbles
  are unpacked in registers to exact small integers in bf16, the tile's dot runs on tensor cores,
  and the group scale multiplies the fp32 partial sum (one multiply per output per group instead
  of one per weight, and no rounding of q*scale to bf16). Split-K keeps the GPU busy at decode
  sizes, where the whole cost is streaming the 4-bit weights once; the last split of a tile sums
  the partials (no zero fill or cast launches).
- `w4a16_gemv_kernel`: M = 1 (decode): int4 -> fp32 by magic numbers (the nibble or-ed into the
  mantissa of 128.0, one LOP3 in PTX), fp32 FMAs, several groups per step, the next step prefetched.
- `grouped_*_kernel`: the same for MoE experts, rows sorted by expert; each program finds its expert
  and rows from the per-expert row counts alone (`_expert_tile`: a scan over E counts in registers), so
  a call needs no prep launches, no host sync and no padding of rows, and its grid is static. The INT4
  one (as grouped_triton's bf16 kernel) can read its rows as x[src] (GATHER), the MoE's token rows in place.
- `grouped_fp8_kernel` / `fp8_dense_kernel`: FP8 block-scaled GEMMs (1x128 activation and 128x128
  weight scales applied to each 128-deep partial product in fp32, the DeepSeek-V3 recipe). With QUANT
  the A operand is the bf16 activations, quantized per 1x128 tile inside the GEMM with the act-quant
  kernel's arithmetic (`_quantize_rows`, shared): the same bits as the two-kernel path, one launch less
  and no fp8 copy of x; every N tile redoes its rows' quantization, which only pays at decode sizes.
  SWAP puts the weights on the MMA's M side (y^T = W x^T), so that a few rows use wgmma as its N.
"""

from __future__ import annotations

import triton
import triton.language as tl

from miles_core.kernels.swiglu import silu_mul

FP8_MAX = tl.constexpr(448.0)  # globals inside @triton.jit must be constexpr


@triton.jit
def fp8_act_quant_kernel(
    X,
    Q,
    S,
    SRC,
    M,
    M_ALLOC,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    stride_sk,
    EPS,
    BM: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHER: tl.constexpr = False,
    KFAST: tl.constexpr = False,
):
    # X: [M, K], or (GATHER) [T, K] token rows with SRC [M]: row r is X[SRC[r]] (the MoE's rows sorted by
    # expert, read in place); Q: [M_alloc, K] fp8; S: scale [M_alloc, ceil(K/BLOCK)] with strides
    # (stride_sm, stride_sk). Rows in [M, M_alloc) (padding for cuBLAS) are written as zeros with scale EPS/448.
    # Grid (row tiles, K blocks), or with KFAST (K blocks, row tiles): neighbouring programs then read
    # neighbouring 128-column blocks of the same rows.
    if KFAST:
        pid_m, pid_k = tl.program_id(1), tl.program_id(0)
    else:
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    if GATHER:
        x_rows = tl.load(SRC + rows, mask=rows < M, other=0)
    else:
        x_rows = rows
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + x_rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, scale = _quantize_rows(x, EPS)
    out_mask = (rows[:, None] < M_ALLOC) & (cols[None, :] < K)
    tl.store(Q + rows[:, None] * stride_qm + cols[None, :], q.to(Q.dtype.element_ty), mask=out_mask)
    tl.store(S + rows * stride_sm + pid_k * stride_sk, scale, mask=rows < M_ALLOC)


@triton.jit
def swiglu_fp8_quant_kernel(X, Q, S, M, N, stride_xm, stride_qm, stride_sm, EPS, BM: tl.constexpr, BLOCK: tl.constexpr):
    # X: [M, 2N] gate columns then up columns (the gate_up GEMM's output) -> h = silu(gate) * up rounded to
    # X's dtype, as `swiglu` writes it, then quantized as fp8_act_quant_kernel quantizes h: Q [M, N] fp8,
    # S [M, ceil(N/BLOCK)] fp32. One launch, and no [M, N] h in memory between them.
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    ptrs = X + rows[:, None] * stride_xm + cols[None, :]
    g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ptrs + N, mask=mask, other=0.0).to(tl.float32)
    h = silu_mul(g, u).to(X.dtype.element_ty).to(tl.float32)  # masked: silu(0) * 0 = 0, as a masked load
    q, scale = _quantize_rows(h, EPS)
    tl.store(Q + rows[:, None] * stride_qm + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + rows * stride_sm + pid_k, scale, mask=rows < M)


@triton.jit
def _quantize_rows(x, EPS):
    # x [R, BLOCK] fp32 (zeros where masked) -> (q [R, BLOCK] fp32 in +-448, still to be cast to e4m3;
    # scale [R] fp32): the 1x128 recipe. One function for the act-quant kernel and the fused GEMMs, so
    # that both produce the same bits.
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), EPS)  # [R]
    # div_rn: IEEE division, as torch does (Triton's `/` on fp32 is the approximate div.full)
    scale = tl.div_rn(amax, FP8_MAX)
    return tl.clamp(tl.div_rn(x, scale[:, None]), -FP8_MAX, FP8_MAX), scale


@triton.jit
def _load_int4(
    W,
    cols,
    stride_wn,
    k0,
    N,
    k_words,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    UNPACK: tl.constexpr,
    BF16: tl.constexpr = False,
    ASM: tl.constexpr = False,
    BT: tl.constexpr = 0,
):
    # -> [BN, BK] int32 in [-8, 7] for input columns k0 .. k0+BK; column 8j+i is nibble i of word j.
    # BT > 0 (UNPACK 0, 2, 4): W in `w4a16_mma.repack_tiles(packed, BT)`'s layout (see _load_words).
    # UNPACK 0: load [BN, BK/8] words, shift into [BN, BK/8, 8], reshape.
    # UNPACK 1: load the word of every column (each word 8 times, from L1), shift by column.
    # UNPACK 2: load [BN, BK/8] words, repeat each 8 times with tl.interleave, shift by column.
    # UNPACK 4: load [BN, BK/8] words, magic numbers instead of conversions (_magic_join); returns
    #   136 + q (exact, fp32 or BF16): the caller subtracts 136 * sum(x) (see _mac).
    if UNPACK == 1:
        ks = k0 + tl.arange(0, BK)
        wp = tl.load(
            W + cols[:, None] * stride_wn + ks[None, :] // 8,
            mask=(cols[:, None] < N) & ((ks[None, :] < k_words * 8) | EVEN_K),
            other=0,
        )
        nib = (wp >> ((tl.arange(0, BK) % 8) * 4)[None, :]) & 0xF
    else:
        wp = _load_words(W, cols, stride_wn, k0, N, k_words, BK, EVEN_K, True, BT)
        if UNPACK == 4:
            out = _magic_join(wp, BF16, ASM)
        elif UNPACK == 0:
            shifts = tl.arange(0, 8) * 4
            nib = tl.reshape((wp[:, :, None] >> shifts[None, None, :]) & 0xF, (BN, BK))
        else:
            wp = tl.interleave(wp, wp)
            wp = tl.interleave(wp, wp)
            wp = tl.interleave(wp, wp)
            nib = (wp >> ((tl.arange(0, BK) % 8) * 4)[None, :]) & 0xF
    if UNPACK != 4:
        out = nib - 8
    return out


@triton.jit
def _mac(acc, x, w, s, OFFSET: tl.constexpr = 0.0, SWAP: tl.constexpr = False):
    # acc [BM, BN] += (x [BM, BK] @ (w - OFFSET)^T [BK, BN]) * s [BN]; a GEMV in fp32 FMAs when BM == 1.
    # OFFSET: w holds q + OFFSET (UNPACK 4), removed once per row as OFFSET * sum(x).
    # SWAP: acc is [BN, BM] (= W x^T, the weights on the MMA's M side).
    if x.shape[0] == 1:
        y = tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
    elif SWAP:
        y = tl.dot(w.to(x.dtype), tl.trans(x))  # [BN, BM]
    else:
        y = tl.dot(x, tl.trans(w.to(x.dtype)))
    if SWAP and x.shape[0] > 1:
        if OFFSET != 0.0:
            y -= OFFSET * tl.sum(x.to(tl.float32), axis=1)[None, :]
        acc += y * s[:, None]
    else:
        if OFFSET != 0.0:
            y -= OFFSET * tl.sum(x.to(tl.float32), axis=1)[:, None]
        acc += y * s[None, :]
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
    ASM: tl.constexpr = False,
    SWAP: tl.constexpr = False,
    BT: tl.constexpr = 0,
):
    # X: [M, K] bf16 (fp16/fp32 also run: the interpreter tests); W: [N, ceil(K/8)] int32 (or, BT > 0 and
    # UNPACK != 1, `w4a16_mma.repack_tiles(W, BT)`'s layout);
    # S: [N, ceil(K/GROUP)]; Y: [M, N]; P: [SPLIT_K, M, N] fp32 partials, LOCKS: tile counters (SPLIT_K > 1).
    # SWAP (BM >= 16): y^T = W x^T per tile, the weights on the MMA's M side.
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    # kb_per_split = ceil(ceil(K / BK) / SPLIT_K) K blocks per split (the last may run past K: masked)
    if SWAP and BM > 1:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(0, kb_per_split):
        k0 = (pid_k * kb_per_split + i) * BK
        ks = k0 + tl.arange(0, BK)
        x = tl.load(
            X + rows[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < M) & ((ks[None, :] < K) | EVEN_K),
            other=0.0,
        )
        w = _load_int4(W, cols, stride_wn, k0, N, k_words, BN, BK, EVEN_K, UNPACK, BM > 1, ASM, BT)  # exact
        s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=(cols < N) & (k0 < K), other=0.0)
        s = s.to(tl.float32)  # masked past K: a split that runs past the end adds 0, not 0 * garbage
        acc = _mac(acc, x, w, s, 136.0 if UNPACK == 4 else 0.0, SWAP)
    if SWAP and BM > 1:
        acc = tl.trans(acc)
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
def _plane(wp, NIB: tl.constexpr):
    # int32 words -> int32 bits of the fp32 128 + u (u = nibble NIB, bits 4NIB..4NIB+3: q + 8).
    # The nibble goes to bits 16..19, where 128.0 has its units digit: a shift, an and, an or.
    if NIB < 4:
        t = wp << (16 - 4 * NIB)
    else:
        t = wp >> (4 * NIB - 16)
    return (t & 0xF0000) | 0x43000000


_F32_ASM = tl.constexpr("""{ .reg .b32 t;
shl.b32 t, $8, 16; lop3.b32 $0, t, 0xF0000, 0x43000000, 0xea;
shl.b32 t, $8, 12; lop3.b32 $1, t, 0xF0000, 0x43000000, 0xea;
shl.b32 t, $8, 8; lop3.b32 $2, t, 0xF0000, 0x43000000, 0xea;
shl.b32 t, $8, 4; lop3.b32 $3, t, 0xF0000, 0x43000000, 0xea;
lop3.b32 $4, $8, 0xF0000, 0x43000000, 0xea;
shr.b32 t, $8, 4; lop3.b32 $5, t, 0xF0000, 0x43000000, 0xea;
shr.b32 t, $8, 8; lop3.b32 $6, t, 0xF0000, 0x43000000, 0xea;
shr.b32 t, $8, 12; lop3.b32 $7, t, 0xF0000, 0x43000000, 0xea; }""")

# bf16 pairs: (w >> 4i) & 0x000F000F | 0x43004300 holds 128 + u_i (low half) and 128 + u_{i+4} (high
# half): 4 LOP3 and 3 shifts for 8 weights; the halves are register names, not instructions.
_BF16_ASM = tl.constexpr("""{ .reg .b32 t, u;
lop3.b32 t, $8, 0x000F000F, 0x43004300, 0xea; mov.b32 {$0, $4}, t;
shr.b32 u, $8, 4; lop3.b32 t, u, 0x000F000F, 0x43004300, 0xea; mov.b32 {$1, $5}, t;
shr.b32 u, $8, 8; lop3.b32 t, u, 0x000F000F, 0x43004300, 0xea; mov.b32 {$2, $6}, t;
shr.b32 u, $8, 12; lop3.b32 t, u, 0x000F000F, 0x43004300, 0xea; mov.b32 {$3, $7}, t; }""")


@triton.jit
def _nibbles(wp, BF16: tl.constexpr, ASM: tl.constexpr):
    # int32 words [...] -> the 8 nibble planes, each [...] (fp32, or bf16 if BF16) = 128 + u_i, exact:
    # bit tricks instead of int -> float conversions. ASM: the same in PTX, with the and + or fused into
    # one LOP3 (ptxas will not fuse two immediates); the interpreter runs the plain version.
    if ASM:
        if BF16:
            h = tl.inline_asm_elementwise(_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r", [wp], (tl.int16,) * 8, True, 1)
            t = tl.bfloat16
        else:
            h = tl.inline_asm_elementwise(_F32_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [wp], (tl.int32,) * 8, True, 1)
            t = tl.float32
        return (
            h[0].to(t, bitcast=True),
            h[1].to(t, bitcast=True),
            h[2].to(t, bitcast=True),
            h[3].to(t, bitcast=True),
            h[4].to(t, bitcast=True),
            h[5].to(t, bitcast=True),
            h[6].to(t, bitcast=True),
            h[7].to(t, bitcast=True),
        )
    t = tl.bfloat16 if BF16 else tl.float32
    return (
        _plane(wp, 0).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 1).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 2).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 3).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 4).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 5).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 6).to(tl.float32, bitcast=True).to(t),
        _plane(wp, 7).to(tl.float32, bitcast=True).to(t),
    )


@triton.jit
def _load_words(
    W, cols, stride_wn, k0, N, k_words, BK: tl.constexpr, EVEN_K: tl.constexpr, live=True, BT: tl.constexpr = 0
):
    # -> [BN, BK/8] int32 packed words of input columns k0 .. k0+BK (zeros where masked or not `live`)
    # BT > 0: W in `w4a16_mma.repack_tiles(packed, BT)`'s layout, [N/BT, K/128, BT, 16] (K a multiple of 128,
    # BK of 128 and k0 of BK): word (n, kw) at (n // BT) * BT * k_words + (kw // 16) * 16 BT + (n % BT) * 16 +
    # kw % 16, i.e. each row's words in runs of 16 (64 bytes), which the hints let Triton load 16 bytes at a time
    words = k0 // 8 + tl.arange(0, BK // 8)
    mask = (cols[:, None] < N) & ((words[None, :] < k_words) | EVEN_K) & live
    if BT == 0:
        ptrs = W + cols[:, None] * stride_wn + words[None, :]
    else:
        runs = tl.max_contiguous(tl.multiple_of((words // 16) * (16 * BT) + words % 16, 16), 16)
        ptrs = W + ((cols // BT).to(tl.int64) * (BT * k_words) + (cols % BT) * 16)[:, None] + runs[None, :]
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _magic_join(wp, BF16: tl.constexpr, ASM: tl.constexpr):
    # [BN, BK/8] words -> [BN, BK] 136 + q in K order (fp32, or bf16 if BF16): the 8 planes of _nibbles
    # joined so that column 8j + 4a + 2b + c is plane 4a + 2b + c of word j (joins are register moves).
    p = _nibbles(wp, BF16, ASM)
    lo = tl.join(tl.join(p[0], p[4]), tl.join(p[2], p[6]))  # [BN, BK/8, 2, 2]: planes 4a + 2b
    hi = tl.join(tl.join(p[1], p[5]), tl.join(p[3], p[7]))  # planes 4a + 2b + 1
    return tl.reshape(tl.join(lo, hi), (wp.shape[0], wp.shape[1] * 8))


@triton.jit
def int4_dequant_kernel(
    W,
    S,
    OUT,
    N,
    K,
    stride_wn,
    stride_sn,
    stride_sg,
    stride_on,
    GROUP: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    BT: tl.constexpr = 0,
):
    # OUT[n, k] = q[n, k] * S[n, k // GROUP] in fp32, stored in OUT's dtype: the bits of
    # `int4.int4_group_dequantize` (one fp32 product, one rounding). W [N, ceil(K/8)] int32, or (BT > 0) in
    # `w4a16_mma.repack_tiles(W, BT)`'s layout. A [BN, BK] tile per program; BK a multiple of 8.
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    k0 = pid_k * BK
    wp = _load_words(W, cols, stride_wn, k0, N, (K + 7) // 8, BK, EVEN_K, True, BT)
    w = _magic_join(wp, False, ASM) - 136.0  # [BN, BK] q, exact
    ks = k0 + tl.arange(0, BK)
    mask = (cols[:, None] < N) & (ks[None, :] < K)
    if BK % GROUP == 0:  # one scale per (column, group), broadcast over the group's K
        g = k0 // GROUP + tl.arange(0, BK // GROUP)
        smask = (cols[:, None] < N) & (g[None, :] * GROUP < K)
        s = tl.load(S + cols[:, None] * stride_sn + g[None, :] * stride_sg, mask=smask, other=0.0)
        w3 = tl.reshape(w, (BN, BK // GROUP, GROUP)) * s.to(tl.float32)[:, :, None]
        out = tl.reshape(w3, (BN, BK))
    else:
        s = tl.load(S + cols[:, None] * stride_sn + (ks[None, :] // GROUP) * stride_sg, mask=mask, other=0.0)
        out = w * s.to(tl.float32)
    tl.store(OUT + cols[:, None].to(tl.int64) * stride_on + ks[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def w4a16_gemv_kernel(
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
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    ASM: tl.constexpr,
    STAGES: tl.constexpr = 1,
    BT: tl.constexpr = 0,
):
    # Decode GEMV, one row of x per program along axis 0. fp32 FMAs on the magic-number weights (a shift,
    # a LOP3 and an FMA per weight); the K reduction stays in registers per group. BK is a divisor of
    # GROUP or a multiple of it (several groups per step: fewer, larger loads). PREFETCH: the next step's
    # words are loaded before this step's math (two steps of loads in flight per program, in registers).
    # STAGES > 1: the loop's loads are software-pipelined through shared memory (cp.async, STAGES - 1
    # steps ahead): Triton pipelines loads that feed no dot only in a loop that carries its own
    # num_stages (`tl.range`), so a kernel-level num_stages alone leaves this loop unpipelined.
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_n * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    kb0 = pid_k * kb_per_split
    acc = tl.zeros((BN,), dtype=tl.float32)
    if PREFETCH:
        wp = _load_words(W, cols, stride_wn, kb0 * BK, N, k_words, BK, EVEN_K, True, BT)
    for it in tl.range(0, kb_per_split, num_stages=STAGES):
        k0 = (kb0 + it) * BK
        if PREFETCH:
            cur = wp
            wp = _load_words(W, cols, stride_wn, k0 + BK, N, k_words, BK, EVEN_K, it + 1 < kb_per_split, BT)
        else:
            cur = _load_words(W, cols, stride_wn, k0, N, k_words, BK, EVEN_K, True, BT)
        ks = k0 + tl.arange(0, BK)
        x = tl.load(X + pid_m * stride_xm + ks, mask=(ks < K) | EVEN_K, other=0.0).to(tl.float32)  # [BK]
        w = _magic_join(cur, False, ASM)  # [BN, BK] fp32, 136 + q
        if BK <= GROUP:
            s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=(cols < N) & (k0 < K), other=0.0)
            acc += (tl.sum(w * x[None, :], axis=1) - 136.0 * tl.sum(x)) * s.to(tl.float32)
        else:
            g = k0 // GROUP + tl.arange(0, BK // GROUP)
            smask = (cols[:, None] < N) & (g[None, :] * GROUP < K)
            s = tl.load(S + cols[:, None] * stride_sn + g[None, :] * stride_sg, mask=smask, other=0.0)  # [BN, NG]
            part = tl.sum(tl.reshape(w * x[None, :], (BN, BK // GROUP, GROUP)), axis=2)  # [BN, NG]
            xs = tl.sum(tl.reshape(x, (BK // GROUP, GROUP)), axis=1)  # [NG]
            acc += tl.sum((part - 136.0 * xs[None, :]) * s.to(tl.float32), axis=1)
    rows = pid_m + tl.arange(0, 1)
    _store_split(acc[None, :], Y, P, LOCKS, rows, cols, M, N, stride_ym, SPLIT_K)


@triton.jit
def _expert_tile(COUNTS, TILE_END, ROW_START, E, pid, E_P2: tl.constexpr, BM: tl.constexpr, PREP: tl.constexpr):
    # -> (e, e_safe, r0, r1): the expert that owns tile `pid` (e >= E when pid is past the last tile; e_safe
    # is e clamped to E - 1) and the tile's rows [r0, min(r0 + BM, r1)). Tiles go expert by expert,
    # ceil(count / BM) each, so a static grid of ceil(M / BM) + E programs along axis 0 covers them all.
    # COUNTS: [E] int32 or int64 rows per expert. Every program scans the E counts in registers (a few
    # hundred bytes from L2) instead of reading tables that prep kernels made before the GEMM.
    # PREP: read fp8_gemm.expert_tiles' tables instead (TILE_END [E] cumulative tile counts, ROW_START [E],
    # COUNTS int32): the previous path, kept to benchmark against.
    es = tl.arange(0, E_P2)
    if PREP:
        ends = tl.load(TILE_END + es, mask=es < E, other=2147483647)
        e = tl.sum((ends <= pid).to(tl.int32))
        e_safe = tl.minimum(e, E - 1)
        first = tl.load(TILE_END + e_safe - 1, mask=e_safe > 0, other=0)
        row0 = tl.load(ROW_START + e_safe)
    else:
        c = tl.load(COUNTS + es, mask=es < E, other=0).to(tl.int32)  # [E_P2], zeros past E
        tiles = (c + BM - 1) // BM
        e = tl.sum((tl.cumsum(tiles, axis=0) <= pid).to(tl.int32))  # experts whose tiles end at or before pid
        e_safe = tl.minimum(e, E - 1)
        first = tl.sum(tl.where(es < e, tiles, 0))  # e's first tile
        row0 = tl.sum(tl.where(es < e, c, 0))  # e's first row
    r1 = row0 + tl.load(COUNTS + e_safe).to(tl.int32)
    return e, e_safe, row0 + (pid - first) * BM, r1


@triton.jit
def grouped_w4a16_kernel(
    X,
    W,
    S,
    Y,
    TILE_END,
    ROW_START,
    COUNTS,
    SRC,
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
    ASM: tl.constexpr = False,
    PREP: tl.constexpr = False,
    GATHER: tl.constexpr = False,
):
    # X: [M, K] rows sorted by expert, or (GATHER) [T, K] token rows with SRC [M]: row r is X[SRC[r]];
    # W: [E, N, ceil(K/8)] int32; S: [E, N, ceil(K/GROUP)]; Y: [M, N];
    # COUNTS: [E] rows per expert (TILE_END, ROW_START: read only with PREP, see _expert_tile).
    e, e_safe, r0, r1 = _expert_tile(COUNTS, TILE_END, ROW_START, E, tl.program_id(0), E_P2, BM, PREP)
    if e >= E:
        return
    rows = r0 + tl.arange(0, BM)
    if GATHER:
        x_rows = tl.load(SRC + rows, mask=rows < r1, other=0)
    else:
        x_rows = rows
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    k_words = (K + 7) // 8
    W += e_safe.to(tl.int64) * stride_we
    S += e_safe.to(tl.int64) * stride_se
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(
            X + x_rows[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < r1) & ((ks[None, :] < K) | EVEN_K),
            other=0.0,
        )
        w = _load_int4(W, cols, stride_wn, k0, N, k_words, BN, BK, EVEN_K, UNPACK, BM > 1, ASM)  # exact
        s = tl.load(S + cols * stride_sn + (k0 // GROUP) * stride_sg, mask=cols < N, other=0.0).to(tl.float32)
        acc = _mac(acc, x, w, s, 136.0 if UNPACK == 4 else 0.0)
    mask = (rows[:, None] < r1) & (cols[None, :] < N)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_block_dot(
    A,
    SA,
    B,
    SB,
    rows,
    row_end,
    col0,
    N,
    K,
    kb_lo,
    kb_hi,
    stride_am,
    stride_sam,
    stride_bn,
    stride_sbn,
    EPS,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANT: tl.constexpr,
    SWAP: tl.constexpr,
    KU: tl.constexpr = 1,
    a_rows=None,
    TILED: tl.constexpr = False,
):
    # -> sum over K blocks [kb_lo, kb_hi) of (a_kb @ b_kb^T) * sa_kb * sb_kb, fp32 [BM, BN] ([BN, BM] if SWAP),
    # for the output columns col0 .. col0 + BN.
    # A: [*, K] e4m3 with SA [*, ceil(K/128)] fp32 scales, or (QUANT) the activations themselves, each
    # 1x128 tile quantized here; B: [N, K] e4m3 (one expert), SB: [ceil(N/128), ceil(K/128)]. BK == 128,
    # BN divides 128. KU: K blocks per loop iteration (2: twice the bytes per pipeline stage, half the
    # loop's bookkeeping per byte; a missing last block reads as zeros). The sum runs in K-block order
    # either way, so KU does not change the result's bits.
    # Rows >= row_end read as zeros (their outputs are not stored). `a_rows`: the rows of A (and SA) that
    # tile rows `rows` read (a gather), else `rows` themselves. TILED: B in `quant.fp8.tile_fp8_weights`'
    # layout (8 KB boxes of 64 rows x one K block; N a multiple of 64, K of 128; stride_bn unused).
    if a_rows is None:
        a_rows = rows
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    rmask = rows < row_end
    cols = col0 + tl.arange(0, BN)
    for kb in range(kb_lo, kb_hi, KU):
        acc = _fp8_kstep(
            acc, A, SA, B, SB, a_rows, rmask, cols, col0, N, K, kb, True,
            stride_am, stride_sam, stride_bn, stride_sbn, EPS, BK, EVEN_K, QUANT, SWAP, TILED,
        )  # fmt: skip
        if KU == 2:
            acc = _fp8_kstep(
                acc, A, SA, B, SB, a_rows, rmask, cols, col0, N, K, kb + 1, kb + 1 < kb_hi,
                stride_am, stride_sam, stride_bn, stride_sbn, EPS, BK, EVEN_K, QUANT, SWAP, TILED,
            )  # fmt: skip
    return acc


@triton.jit
def _fp8_kstep(
    acc,
    A,
    SA,
    B,
    SB,
    rows,
    rmask,
    cols,
    col0,
    N,
    K,
    kb,
    live,
    stride_am,
    stride_sam,
    stride_bn,
    stride_sbn,
    EPS,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANT: tl.constexpr,
    SWAP: tl.constexpr,
    TILED: tl.constexpr = False,
):
    # acc + (a_kb @ b_kb^T) * sa_kb * sb_kb (see _fp8_block_dot), A's rows `rows` (masked by rmask);
    # `live` False: acc unchanged (zeros read)
    ks = kb * BK + tl.arange(0, BK)
    kmask = ((ks < K) | EVEN_K) & live
    a = tl.load(A + rows[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    if QUANT:
        q, sa = _quantize_rows(a.to(tl.float32), EPS)
        a = q.to(tl.float8e4nv)
    else:
        sa = tl.load(SA + rows * stride_sam + kb, mask=rmask & live, other=0.0)
    if TILED:  # row n's K block kb at ((n // 64) * KB + kb) * 8192 + (n % 64) * 128
        box = ((cols // 64).to(tl.int64) * tl.cdiv(K, BK) + kb) * (64 * BK) + (cols % 64) * BK
        b_ptrs = B + box[:, None] + tl.arange(0, BK)[None, :]
    else:
        b_ptrs = B + cols[:, None] * stride_bn + ks[None, :]
    b = tl.load(b_ptrs, mask=(cols[:, None] < N) & kmask[None, :], other=0.0)
    sb = tl.load(SB + (col0 // 128) * stride_sbn + kb, mask=live, other=0.0)  # the tile lies in one scale block
    if SWAP:
        acc += tl.dot(b, tl.trans(a)) * (sb * sa[None, :])
    else:
        acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
    return acc


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
    EPS,
    E_P2: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANT: tl.constexpr = False,
    SWAP: tl.constexpr = False,
    PREP: tl.constexpr = False,
    NFAST: tl.constexpr = False,
    KU: tl.constexpr = 1,
    SRC=None,
    GATHER: tl.constexpr = False,
    YS=None,
    stride_ysm=0,
    SWIGLU_DT: tl.constexpr = None,
    TILED: tl.constexpr = False,
):
    # TILED: B in `quant.fp8.tile_fp8_weights`' layout (see _fp8_block_dot).
    # SWIGLU_DT (a dtype; BN == 128, N = 2I gate rows then up rows): the SwiGLU of the output and its 1x128
    # act-quant in the epilogue. Program pid_n computes gate columns pid_n * 128 + [0, 128) and the same
    # up columns, rounds both to SWIGLU_DT (the unfused GEMM's output dtype), h = silu(gate) * up rounded
    # to SWIGLU_DT, and stores h quantized: Y [M, I] e4m3 and YS [M, I/128] fp32 (the bits of the GEMM
    # then swiglu_fp8_quant_kernel). Grid N extent I / 128.
    # A: [M, K] rows sorted by expert, fp8 with SA [M, ceil(K/128)] fp32, or (QUANT) bf16/fp16/fp32; with
    # GATHER, A [T, K] (and SA [T, *]) token rows and SRC [M]: sorted row r reads A[SRC[r]] in place;
    # B: [E, N, K] fp8, SB: [E, ceil(N/128), ceil(K/128)] fp32; Y: [M, N]; COUNTS: [E] rows per expert.
    # BK == 128; BN divides 128. Grid (row tiles, N tiles), or with NFAST (N tiles, row tiles): the N
    # tiles of one row tile are then neighbours in launch order, so its A rows come from L2 after the
    # first (prefill sizes, where A is re-read once per N tile otherwise).
    if NFAST:
        pid_t, pid_n = tl.program_id(1), tl.program_id(0)
    else:
        pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    e, e_safe, r0, r1 = _expert_tile(COUNTS, TILE_END, ROW_START, E, pid_t, E_P2, BM, PREP)
    if e >= E:
        return
    rows = r0 + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    if GATHER:
        a_rows = tl.load(SRC + rows, mask=rows < r1, other=0)
    else:
        a_rows = rows
    B += e_safe.to(tl.int64) * stride_be
    SB += e_safe.to(tl.int64) * stride_sbe
    acc = _fp8_block_dot(
        A, SA, B, SB, rows, r1, pid_n * BN, N, K, 0, tl.cdiv(K, BK),
        stride_am, stride_sam, stride_bn, stride_sbn, EPS, BM, BN, BK, EVEN_K, QUANT, SWAP, KU, a_rows, TILED,
    )  # fmt: skip
    if SWAP:
        acc = tl.trans(acc)
    if SWIGLU_DT is not None:
        up = _fp8_block_dot(
            A, SA, B, SB, rows, r1, N // 2 + pid_n * BN, N, K, 0, tl.cdiv(K, BK),
            stride_am, stride_sam, stride_bn, stride_sbn, EPS, BM, BN, BK, EVEN_K, QUANT, SWAP, KU, a_rows,
        )  # fmt: skip
        if SWAP:
            up = tl.trans(up)
        g = acc.to(SWIGLU_DT).to(tl.float32)  # the unfused GEMM's stored outputs
        h = silu_mul(g, up.to(SWIGLU_DT).to(tl.float32)).to(SWIGLU_DT).to(tl.float32)  # as `swiglu` stores h
        q, scale = _quantize_rows(h, EPS)  # BN == 128: one 1x128 tile per row
        mask = (rows[:, None] < r1) & (cols[None, :] < N // 2)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], q.to(Y.dtype.element_ty), mask=mask)
        tl.store(YS + rows * stride_ysm + pid_n, scale, mask=rows < r1)
    else:
        mask = (rows[:, None] < r1) & (cols[None, :] < N)
        tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def fp8_dense_kernel(
    A,
    SA,
    B,
    SB,
    Y,
    P,
    LOCKS,
    M,
    N,
    K,
    kb_per_split,
    stride_am,
    stride_sam,
    stride_bn,
    stride_sbn,
    stride_ym,
    EPS,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    QUANT: tl.constexpr,
    SWAP: tl.constexpr,
    KU: tl.constexpr = 1,
):
    # y = x @ W^T at decode sizes: no expert machinery, grid (M tiles, N tiles, SPLIT_K). A, SA, B, SB as
    # in grouped_fp8_kernel with one expert; Y: [M, N]; P: [SPLIT_K, M, N] fp32 partials and LOCKS: tile
    # counters (SPLIT_K > 1, reduced in split order by the last split: deterministic, see _store_split).
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, tl.cdiv(K, BK))
    acc = _fp8_block_dot(
        A, SA, B, SB, rows, M, pid_n * BN, N, K, kb_lo, kb_hi,
        stride_am, stride_sam, stride_bn, stride_sbn, EPS, BM, BN, BK, EVEN_K, QUANT, SWAP, KU,
    )  # fmt: skip
    if SWAP:
        acc = tl.trans(acc)
    _store_split(acc, Y, P, LOCKS, rows, cols, M, N, stride_ym, SPLIT_K)
