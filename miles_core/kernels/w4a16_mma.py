"""W4A16 at decode sizes (M <= 64) on tensor cores with the dequantized weights never leaving registers
(Gluon, Triton's explicit-layout language). `w4a16_gemm.w4a16_linear` runs it at 2-32 rows (`mma_config`);
tiles and timings: bench/exp_w4a16_gemv.py --mma. At 17-32 rows a program runs two MMA row tiles over each
dequantized weight tile (x then loaded in the step that uses it); 64 rows per program (four row tiles)
compile and are tested but were slower than the Triton kernel at M = 64 (tenth session): not used there.

Why: the CUDA-core GEMV spends ~3 integer/FMA instructions per weight and the Triton tensor-core kernels
send the dequantized tile through shared memory to reach the MMA's operand layout. Here each thread loads
16-byte runs of packed words in a layout chosen so that, after the bf16 magic-number dequant (one LOP3
per two weights), its values already sit where `mma.sync m16n8k16`'s B operand wants them: the K order
inside the MMA is a permutation of the checkpoint's K order (a dot product does not care, as long as x
is permuted the same way), and the conversion to the operand layout is a renaming of registers
(`convert_layout(..., assert_trivial=True)` checks this when the kernel compiles).

Word (kw, n) of a step holds physical K = 8 kw + i, i its nibble. A thread holds kw = 4 t + r (r its four
registers, one 16-byte load; t = lane % 4) for column n = lane / 4 + 8 warp + ... . The MMA reads K index
l = i0 + 2 t + 8 i1 + 16 i2 + 32 r: lanes t on K bits 1-2, as `mma.sync`'s operands have them.
One step = one quantization group of 128 (group size 128 only), so each group's partial product is
scaled once: acc += dot(x, q) * scale, q = u - 8 made exactly in bf16 (the magic number 128 + u, then one
bf16x2 FMA per two weights). x is loaded as each thread's 32 contiguous K per row (16-byte loads) and
permuted in registers to the MMA's K order, so neither operand goes through shared memory.

A variant that streamed the words through a TMA ring in shared memory (4-16 groups in flight per program)
was slower at every size (tenth session, bench/RESULTS.md: M = 1 best 17.1 us against the GEMV's 14.0) and
was removed; it is in git history at e2f453b (`w4a16_mma_tma`).
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # the CPU install has no triton
    gluon = None

__all__ = ["w4a16_mma", "mma_ok", "mma_config", "repack_tiles", "repack_width", "unpack_tiles"]

GROUP = 128
MAX_ROWS = 64


def mma_ok(x: torch.Tensor, packed: torch.Tensor, group_size: int) -> bool:
    """The kernel applies: CUDA bf16, M <= 64, group 128, K a multiple of 128, sm_80 or newer."""
    return (
        gluon is not None
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and x.shape[0] <= MAX_ROWS
        and group_size == GROUP
        and x.shape[1] % GROUP == 0
        and torch.cuda.get_device_capability(x.device)[0] >= 8
    )


def _bm(m: int) -> int:
    # rows per program: one 16-row MMA tile, or 2-4 of them sharing each dequantized weight tile
    assert 1 <= m <= MAX_ROWS, f"w4a16_mma takes 1-{MAX_ROWS} rows, got {m}"
    return 16 if m <= 16 else 32 if m <= 32 else 64


def repack_width(n: int) -> int:
    """The column tile to repack an N-row weight in (`repack_tiles`), for the tensor-core kernel's programs:
    64 where N gives >= 128 such tiles, else 32 (sixteenth session, H200, 4096 x 14336 at 16 rows: 19.7 us on
    tiles of 32, 1 warp, split 8, against 21.1 on tiles of 64; 14336 x 4096: 18.5 on 64 against 22.3)."""
    return 64 if -(-n // 64) >= 128 else 32


def mma_config(n: int, k: int, m: int = 16, bn: int = 64) -> dict:
    """Tiles for N x K at M rows (2-32), from `bench/exp_w4a16_gemv.py --mma` on an H200 (bench/RESULTS.md).
    2-16 rows (ninth session): 64 columns per program, one warp where N gives >= 128 column tiles (14336 x 4096
    at M = 16: 19.7 us, split 4) and two otherwise (4096 x 14336: 21.6 us, split 8), against bf16 31.0 / 33.0.
    17-32 rows (tenth session): 64 columns and two warps, split-K to about 512 programs (M = 32: 34.4 / 32.8 us
    against the Triton kernel's 41.6 / 41.0). More warps per program or more programs (split-K partials cost
    M x N x 4 bytes each way) were slower. bn 32 (weights on `repack_tiles(., 32)`, sixteenth session): one warp,
    split-K to about 1,024 programs at 2-32 rows (4096 x 14336: 17.8-19.7 us at 2-16 rows, 26.5 at 24)."""
    from miles_core.kernels.fp8_gemm import _cdiv, split_for

    if bn == 32:
        return {"bn": 32, "num_warps": 1, "split_k": split_for(_cdiv(n, 32), k // GROUP, 1024)}
    tiles = _cdiv(n, 64)
    nw = 1 if tiles >= 128 and m <= 16 else 2
    return {"bn": 64, "num_warps": nw, "split_k": split_for(tiles, k // GROUP, 1024 if nw == 1 else 512)}


if gluon is not None:
    # q = u - 8 as bf16 pairs: (w >> 4s) & 0x000F000F | 0x43004300 holds 128 + u (exact) for nibbles s and
    # s + 4 in its two halves, and one bf16x2 FMA (x 1 - 136, exact: small integers) makes them q
    _Q_PAIRS = gl.constexpr("""{ .reg .b32 t, u, one, off;
mov.b32 one, 0x3F803F80; mov.b32 off, 0xC308C308;
lop3.b32 t, $8, 0x000F000F, 0x43004300, 0xea; fma.rn.bf16x2 t, t, one, off; mov.b32 {$0, $4}, t;
shr.b32 u, $8, 4; lop3.b32 t, u, 0x000F000F, 0x43004300, 0xea; fma.rn.bf16x2 t, t, one, off; mov.b32 {$1, $5}, t;
shr.b32 u, $8, 8; lop3.b32 t, u, 0x000F000F, 0x43004300, 0xea; fma.rn.bf16x2 t, t, one, off; mov.b32 {$2, $6}, t;
shr.b32 u, $8, 12; lop3.b32 t, u, 0x000F000F, 0x43004300, 0xea; fma.rn.bf16x2 t, t, one, off; mov.b32 {$3, $7}, t;
}""")

    @gluon.constexpr_function
    def _x_layout(bm, nw):
        # [BM, 128] x of one group: each thread the 32 contiguous K of its lane t (t = lane % 4) for rows g and
        # g + 8 (g = lane / 4) of every 16-row tile, every warp the same (the MMA's A operand is shared by the
        # warps along N)
        tiles = [[16 * (1 << j), 0] for j in range((bm // 16).bit_length() - 1)]
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16], [8, 0]] + tiles,
            lane_bases=[[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[0, 0]] * (nw.bit_length() - 1),
            block_bases=[],
            shape=[bm, 128],
        )

    @gluon.constexpr_function
    def _words_layout(bn, nw):
        # [16, BN] int32 words of one group: registers kw 0-1 (16 bytes), lanes kw 2-3 and n 0-2, warps n 3..,
        # registers again for the columns past 8 * NW
        reps = [[0, 8 * nw * (1 << j)] for j in range((bn // (8 * nw)).bit_length() - 1)]
        warps = [[0, 8 * (1 << j)] for j in range(nw.bit_length() - 1)]
        return gl.DistributedLinearLayout(
            reg_bases=[[1, 0], [2, 0]] + reps,
            lane_bases=[[4, 0], [8, 0], [0, 1], [0, 2], [0, 4]],
            warp_bases=warps,
            block_bases=[],
            shape=[16, bn],
        )

    @gluon.jit
    def _planes(wp):
        h = gl.inline_asm_elementwise(_Q_PAIRS, "=h,=h,=h,=h,=h,=h,=h,=h,r", [wp], (gl.int16,) * 8, True, 1)
        p0 = h[0].to(gl.bfloat16, bitcast=True)
        p1 = h[1].to(gl.bfloat16, bitcast=True)
        p2 = h[2].to(gl.bfloat16, bitcast=True)
        p3 = h[3].to(gl.bfloat16, bitcast=True)
        p4 = h[4].to(gl.bfloat16, bitcast=True)
        p5 = h[5].to(gl.bfloat16, bitcast=True)
        p6 = h[6].to(gl.bfloat16, bitcast=True)
        p7 = h[7].to(gl.bfloat16, bitcast=True)
        # plane i = 4 i2 + 2 i1 + i0; join appends its new dimension last
        lo = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [.., i0, i1]: planes 0-3
        hi = gl.join(gl.join(p4, p5), gl.join(p6, p7))  # planes 4-7
        return gl.join(lo, hi)  # [16(kw), BN, i0, i1, i2]

    @gluon.jit
    def _group_dot(xt, wp, zero, a_l: gl.constexpr, b_l: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
        """x [BM, 128] (physical K, `_x_layout`) . q [16 words, BN] (`_words_layout`) of one group, fp32."""
        # physical k = 32 t + 8 r + 4 i2 + 2 i1 + i0 -> l = 32 r + 16 i1 + 8 i0 + 2 t + i2 (registers only)
        xl = xt.reshape([BM, 4, 4, 2, 2, 2]).permute(0, 2, 4, 5, 1, 3).reshape([BM, 128])
        a = gl.convert_layout(xl, a_l, assert_trivial=True)
        w5 = _planes(wp)  # [16(kw), BN, i0, i1, i2] = q, kw = 4 t + r
        w6 = w5.reshape([4, 4, BN, 2, 2, 2])  # [t, r, n, i0, i1, i2]
        bl = w6.permute(1, 4, 3, 0, 5, 2).reshape([128, BN])  # [r, i1, i0, t, i2, n] -> [l, n]
        b = gl.convert_layout(bl, b_l, assert_trivial=True)
        return mma_v2(a, b, zero)

    @gluon.jit
    def _store(acc, Y, P, LOCKS, M, N, stride_ym, pid_n, pid_k, rows, cols, mma: gl.constexpr, BM: gl.constexpr,
               BN: gl.constexpr, SPLIT_K: gl.constexpr):  # fmt: skip
        """y = acc (bf16); split-K: the partial to P, and the last split of the column tile sums them."""
        out_mask = (rows[:, None] < M) & (cols[None, :] < N)
        y_ptrs = Y + rows[:, None] * stride_ym + cols[None, :]
        if SPLIT_K == 1:
            gl.store(y_ptrs, acc.to(gl.bfloat16), mask=out_mask)
        else:
            offs = rows[:, None] * N + cols[None, :]
            gl.store(P + pid_k * M * N + offs, acc, mask=out_mask)
            gl.thread_barrier()
            arrived = gl.atomic_add(LOCKS + pid_n, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                tot = gl.zeros([BM, BN], gl.float32, mma)
                for i in gl.static_range(SPLIT_K):
                    tot += gl.load(P + i * M * N + offs, mask=out_mask, other=0.0, cache_modifier=".cg")
                gl.store(y_ptrs, tot.to(gl.bfloat16), mask=out_mask)
                gl.atomic_xchg(LOCKS + pid_n, 0)

    @gluon.jit
    def w4a16_mma_kernel(
        X,
        W,
        S,
        Y,
        P,
        LOCKS,
        M,
        N,
        K,
        groups_per_split,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_sg,
        stride_ym,
        stride_wt,
        stride_wg,
        BM: gl.constexpr,
        BN: gl.constexpr,
        SPLIT_K: gl.constexpr,
        NW: gl.constexpr,
    ):
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        b_l: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        w_l: gl.constexpr = _words_layout(BN, NW)
        x_l: gl.constexpr = _x_layout(BM, NW)

        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        g0 = pid_k * groups_per_split
        g1 = gl.minimum(g0 + groups_per_split, K // 128)

        kw = gl.arange(0, 16, layout=gl.SliceLayout(1, w_l))
        local = gl.arange(0, BN, layout=gl.SliceLayout(0, w_l))
        cols_w = pid_n * BN + local
        # word kw of group g for column tile pid_n, column `local`: W + pid_n * stride_wt + local * stride_wn
        # + g * stride_wg + kw (rows layout: stride_wt = BN * stride_wn, stride_wg = 16; `repack_tiles`: one
        # contiguous [BN, 16]-word block per column tile and group)
        w_ptrs = W + pid_n.to(gl.int64) * stride_wt + local[None, :] * stride_wn + kw[:, None]
        w_mask = (cols_w[None, :] < N) & (kw[:, None] >= 0)
        rows_x = gl.arange(0, BM, layout=gl.SliceLayout(1, x_l))
        ks = gl.arange(0, 128, layout=gl.SliceLayout(0, x_l))
        x_ptrs = X + rows_x[:, None] * stride_xm + ks[None, :]
        x_mask = (rows_x[:, None] < M) & (ks[None, :] >= 0)
        cols = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        rows = gl.arange(0, BM, layout=gl.SliceLayout(1, mma))

        acc = gl.zeros([BM, BN], gl.float32, mma)
        zero = gl.zeros([BM, BN], gl.float32, mma)
        # group g + 1's words (and at 16 rows its x) are loaded while group g is multiplied (a second group
        # of words in flight measured within noise: bench/RESULTS.md, ninth session); at 32-64 rows x is
        # 64-128 registers a copy, so it is loaded in the step that uses it
        nxt = gl.load(w_ptrs + g0 * stride_wg, mask=w_mask & (g0 < g1), other=0)
        if BM == 16:
            x_nxt = gl.load(x_ptrs + g0 * 128, mask=x_mask & (g0 < g1), other=0.0)  # [BM, 128] bf16, physical K
        for g in range(g0, g1):
            wp = nxt
            if BM == 16:
                xt = x_nxt
            else:
                xt = gl.load(x_ptrs + g * 128, mask=x_mask, other=0.0)
            s = gl.load(S + cols * stride_sn + g * stride_sg, mask=cols < N, other=0.0)  # used last
            nxt = gl.load(w_ptrs + (g + 1) * stride_wg, mask=w_mask & (g + 1 < g1), other=0)
            if BM == 16:
                x_nxt = gl.load(x_ptrs + (g + 1) * 128, mask=x_mask & (g + 1 < g1), other=0.0)
            part = _group_dot(xt, wp, zero, a_l, b_l, BM, BN)
            acc += part * s.to(gl.float32)[None, :]

        _store(acc, Y, P, LOCKS, M, N, stride_ym, pid_n, pid_k, rows, cols, mma, BM, BN, SPLIT_K)


def _outputs(x2: torch.Tensor, n: int, bn: int, split_k: int | None, target: int):
    """The grid (column tiles, splits; split-K to about `target` programs unless given), groups per split,
    y, and for split-K the fp32 partials and the column tiles' arrival counters."""
    from miles_core.kernels.fp8_gemm import _cdiv, split_for, tile_locks

    m, k = x2.shape
    groups = k // GROUP
    if split_k is None:
        split_k = split_for(_cdiv(n, bn), groups, target)
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x2.device)
    grid = (_cdiv(n, bn), split_k)
    if split_k == 1:
        return grid, groups, y, y, y
    partials = torch.empty(split_k, m, n, dtype=torch.float32, device=x2.device)
    return grid, _cdiv(groups, split_k), y, partials, tile_locks(x2.device, grid[0])


def repack_tiles(packed: torch.Tensor, bn: int) -> torch.Tensor:
    """packed [N, K/8] int32 (compressed-tensors: row n's words in K order) -> [N/bn, K/128, bn, 16]: the
    words a program of `w4a16_mma(..., bn)` reads per group, one contiguous bn x 64-byte block (in the rows
    layout they are bn runs of 64 bytes, one per weight row). A permutation of the words: no value changes."""
    n, kw = packed.shape
    if n % bn or kw % 16:
        raise ValueError(f"repack_tiles needs N a multiple of bn={bn} and K a multiple of {GROUP}; got {n} x {kw * 8}")
    return packed.reshape(n // bn, bn, kw // 16, 16).permute(0, 2, 1, 3).contiguous()


def unpack_tiles(tiled: torch.Tensor) -> torch.Tensor:
    """`repack_tiles`' inverse: [N/bn, K/128, bn, 16] -> the rows layout [N, K/8] (a new tensor)."""
    nt, groups, bn, words = tiled.shape
    return tiled.permute(0, 2, 1, 3).reshape(nt * bn, groups * words).contiguous()


def w4a16_mma(
    x2: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bn: int = 64,
    num_warps: int = 4,
    split_k: int | None = None,
    target: int = 1024,
) -> torch.Tensor:
    """x2: [M <= 64, K] bf16, packed [N, K/8] int32 (compressed-tensors) or its `repack_tiles(packed, bn)`
    [N/bn, K/128, bn, 16], scale [N, K/128] -> [M, N] bf16 (the same bits for both layouts).
    Above 16 rows a program runs 2 or 4 MMA row tiles over each dequantized weight tile (`_bm`)."""
    if packed.dim() == 4:  # repack_tiles' layout: (column, column tile, group) strides of its words
        if packed.shape[2] != bn:
            raise ValueError(f"weights repacked for bn={packed.shape[2]}, kernel asked for bn={bn}")
        n, (s_n, s_tile, s_group) = packed.shape[0] * bn, (packed.stride(2), packed.stride(0), packed.stride(1))
    else:
        n, (s_n, s_tile, s_group) = packed.shape[0], (packed.stride(0), bn * packed.stride(0), 16)
    m, k = x2.shape
    grid, per_split, y, partials, locks = _outputs(x2, n, bn, split_k, target)
    w4a16_mma_kernel[grid](
        x2, packed, scale, y, partials, locks, m, n, k, per_split,
        x2.stride(0), s_n, scale.stride(0), scale.stride(1), y.stride(0), s_tile, s_group,
        BM=_bm(m), BN=bn, SPLIT_K=grid[1], NW=num_warps, num_warps=num_warps,
    )  # fmt: skip
    return y
