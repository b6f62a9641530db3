"""FP8 block-scaled GEMM for Hopper (sm_90a) in Gluon: y = (a * sa) @ (w * sw)^T with bf16 output.

The operands are the ones `fp8_gemm._fp8_linear_cublas` hands to cuBLAS: a [M, K] e4m3 from the act-quant
kernel with 1x128 scales sa [M4, K/128] fp32 (column-major, M padded to 4: strides (1, M4)), and the weight
w [N, K] e4m3 with 128x128 block scales `weight_scale_inv` [ceil(N/128), K/128] (or the transposed view of
`prepare_weight_scale`'s cuBLAS layout: any strides). K must be a multiple of 128; M and N are arbitrary.

Why: cuBLAS's block-scaled FP8 GEMM reaches ~1,000-1,120 TFLOP/s on an H200 and refuses fast accumulation.
This kernel follows the recipe DeepSeek published for DeepGEMM (the idea, not its code): a 128-wide K block
is one scale block of both operands, so each K block's product goes into a fresh fp32 register tile (wgmma
e4m3 x e4m3 -> fp32, 4 instructions of k32; the tensor cores' limited-precision fp8 accumulation then spans
only 128 products), folded into the main accumulator with one FMA per element:
acc += part * (sa[row, kb] * sw[n_block, kb]).

Structure (warp-specialized with `gl.warp_specialize`, persistent):
- a producer warp issues the TMA loads of each K block into a STAGES-deep shared-memory ring: A and its
  scales in one 64-row box per consumer, the W tile [BN, 128]; each slot has a `ready` mbarrier (TMA bytes
  landed) and an `empty` one (every consumer done reading it);
- BM / 64 consumer warpgroups (1-3; consumer 0 is the default partition) each own 64 rows of the tile:
  wait `ready`, wgmma into a fresh accumulator, wait for it, release the slot, promote. One warpgroup's
  promotion FMAs run while another's wgmma keeps the tensor cores busy. BN = 256 is two 128-column halves
  (two weight scale blocks) multiplied and promoted one after the other, so that only one 64 x 128 partial is
  live (64 x 256 accumulator + one partial: ~210 registers; two partials spill);
- the weight scales (a scalar per 128-column half, the same address for every thread) are loaded from global
  memory a K block ahead, the activation scales read from the ring;
- a persistent grid of min(#SMs, #tiles) programs walks the output tiles in grouped order (GROUP_M row
  tiles sweep the column tiles together, so that their A rows and W tiles stay in L2);
- the epilogue writes each consumer's bf16 tile to shared memory and stores it by TMA (which clips rows and
  columns past M and N); the store drains while the next tile's main loop runs.

`fp8_block_gemm_reference` is the pure-torch definition (dequantize both operands in fp32, then matmul).
Compile-checked for sm_90 on the CPU (tests/test_kernels_fp8_wgmma.py: wgmma e4m3, TMA, mbarriers, no spills)
and tested on an H200 against the fp32 reference; there its outputs equalled cuBLAS's bit for bit on the four
large benchmark shapes. `fp8_gemm.fp8_linear` runs it from `fp8_gemm.GLUON_MIN_TILES` output tiles on sm_90
(`kernels.FP8_GLUON`). Timings and the config sweep: bench/exp_fp8_wgmma.py.

The grouped (MoE experts) version is in `fp8_wgmma_grouped`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # the CPU install has no triton
    gluon = None

__all__ = [
    "GemmConfig",
    "configs",
    "default_config",
    "descriptor_blocks",
    "fp8_block_gemm",
    "fp8_block_gemm_reference",
]

BK = 128  # one scale block of K per pipeline stage
WG_ROWS = 64  # rows per consumer warpgroup (one m64 wgmma)
SMEM_BYTES = 232448  # the H100/H200 per-block shared-memory limit (227 KiB)


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of `fp8_block_gemm`: block_m = 64 x consumer warpgroups (64, 128 or 192); block_n 128 or 256 (one
    or two weight scale blocks; 256 with at most two consumers); stages: K blocks in flight; group_m: row tiles
    per rasterization group."""

    block_m: int = 128
    block_n: int = 128
    stages: int = 5
    group_m: int = 8
    fence: bool = True  # a proxy fence before each slot release (the activation scales were read generically)
    epi_half: bool = False  # the bf16 epilogue through a 64 x 128 tile per consumer, one half at a time

    @property
    def consumers(self) -> int:
        return self.block_m // WG_ROWS

    def registers(self) -> tuple[int, int, int]:
        """(maxnreg at launch, consumer, producer) registers per thread. The 64K registers are split over the
        consumer warpgroups and the producer's (one warp, padded to a warpgroup, which `setmaxnreg` shrinks to
        40); Triton gives the default partition (consumer 0) what the others leave. Consumers hold a 64 x BN
        fp32 accumulator and one 64 x 128 partial: ~150 registers at BN = 128, ~210 at 256."""
        warps = 4 * self.consumers + 4
        maxnreg = min(65536 // (32 * warps) // 8 * 8, 248)  # ptxas ignores a cap above 255
        consumer = {1: maxnreg, 2: 232, 3: 152}[self.consumers]  # 2: 232 x 2 + 40 = 3 x 168; 3: 152 x 2 + 168 + 40
        return maxnreg, consumer, 40

    def smem_bytes(self) -> int:
        stage = self.block_m * BK + self.block_n * BK + self.block_m * 4  # A, W (e4m3), activation scales (fp32)
        # + two mbarriers per stage, the bf16 epilogue tile, and what Triton's allocator adds (<= 192 B measured)
        epilogue = self.block_m * (128 if self.epi_half else self.block_n) * 2
        return self.stages * (stage + 16) + epilogue + 256

    def check(self) -> None:
        """Raise ValueError for tiles the kernel does not take or shared memory cannot hold."""
        if self.block_m not in (64, 128, 192) or self.block_n not in (128, 256) or self.block_m * self.block_n > 32768:
            raise ValueError(f"tiles must be 64/128/192 x 128 or 64/128 x 256, got {self.block_m}x{self.block_n}")
        if self.stages < 2 or self.smem_bytes() > SMEM_BYTES:
            raise ValueError(f"{self}: needs {self.smem_bytes()} bytes of shared memory (limit {SMEM_BYTES})")


def configs() -> list[GemmConfig]:
    """The candidates `bench/exp_fp8_wgmma.py` sweeps (all fit the 227 KiB of shared memory). On an H200 (tenth
    session) 128 x 256 led (1.02-1.04x of cuBLAS) over 128 x 128 / 192 x 128 (0.83-1.00x) and 64-row tiles
    (0.66-0.80x); here it is varied in stages (4 with a half-width epilogue tile), the release fence and the
    rasterization group, with 192 x 128 and 128 x 128 for reference."""
    return [
        GemmConfig(128, 256, 3, 8),
        GemmConfig(128, 256, 3, 8, fence=False),
        GemmConfig(128, 256, 3, 16, fence=False),
        GemmConfig(128, 256, 3, 8, fence=False, epi_half=True),
        GemmConfig(128, 256, 4, 8, fence=False, epi_half=True),
        GemmConfig(128, 256, 4, 8, epi_half=True),
        GemmConfig(128, 256, 4, 16, fence=False, epi_half=True),
        GemmConfig(192, 128, 4, 8),
        GemmConfig(192, 128, 4, 8, fence=False),
        GemmConfig(128, 128, 5, 8, fence=False),
    ]


def default_config(m: int, n: int, k: int) -> GemmConfig:
    """128 x 256 tiles, 3 stages, groups of 8 row tiles: the fastest candidate on all four large shapes of
    `bench/exp_fp8_wgmma.py` on an H200 in its first run (tenth session: 1.02-1.04x of cuBLAS's block-scaled
    call, 1,058-1,155 TFLOP/s); in a second run 0.98-1.05x, where variants without the release fence or with
    groups of 16 led on some shapes by 1-4%, within the runs' spread (bench/RESULTS.md)."""
    return GemmConfig(128, 256, 3, 8)


def fp8_block_gemm_reference(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype=torch.bfloat16
) -> torch.Tensor:
    """a [M, K] e4m3, a_scale [>= M, K/128], w [N, K] e4m3, w_scale [ceil(N/128), >= K/128] -> [M, N]:
    both operands dequantized in fp32, then one fp32 matmul."""
    m, k = a.shape
    n, kb = w.shape[0], k // BK
    af = a.float() * a_scale[:m, :kb].float().repeat_interleave(BK, 1)  # [M, K]
    sw = w_scale[:, :kb].float().repeat_interleave(BK, 0).repeat_interleave(BK, 1)[:n]  # [N, K]
    return (af @ (w.float() * sw).t()).to(out_dtype)


if gluon is not None:
    _BK = gl.constexpr(BK)
    _ROWS = gl.constexpr(WG_ROWS)

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, GROUP_M: gl.constexpr):
        # grouped order: GROUP_M row tiles walk the column tiles together (their A rows and W tiles stay in L2)
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        rows = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @gluon.jit
    def _load_kblock(descs, ring, step, m0, w_row0, pid_n, kb, sa_stride, SA_TMA: gl.constexpr = True,
                     TILED: gl.constexpr = False, kbs=0):  # fmt: skip
        """The TMA loads of one K block into ring slot `step % STAGES`, once the consumers have released it: the A
        rows [m0, m0 + BM) and their scales (one 64-row box per consumer, slot `stage * CONSUMERS + consumer` of
        a_ring / sa_ring) and the W rows from w_row0 + pid_n * BN (slot `stage` of w_ring), on its ready barrier.
        TILED: w in `quant.fp8.tile_fp8_weights`' layout (the descriptor over [*, 128] in 64-row boxes, kbs K
        blocks per row): the tile's rows as BN / 64 boxes of 8 KB."""
        a_desc, w_desc, sa_desc = descs
        a_ring, w_ring, sa_ring, ready, empty = ring
        STAGES: gl.constexpr = w_ring.shape[0]
        CONSUMERS: gl.constexpr = a_ring.shape[0] // STAGES
        BM: gl.constexpr = CONSUMERS * _ROWS
        BN: gl.constexpr = w_ring.shape[1]
        NBYTES: gl.constexpr = BM * _BK + BN * _BK + (BM * 4 if SA_TMA else 0)
        slot = step % STAGES
        # a fresh mbarrier counts as having completed the phase before phase 0: the first pass is free
        mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, NBYTES)
        for i in gl.static_range(CONSUMERS):
            row = m0 + i * _ROWS
            tma.async_copy_global_to_shared(a_desc, [row, kb * _BK], bar, a_ring.index(slot * CONSUMERS + i))
            if SA_TMA:
                tma.async_copy_global_to_shared(sa_desc, [kb * sa_stride + row], bar,
                                                sa_ring.index(slot * CONSUMERS + i))  # fmt: skip
        if TILED:
            for j in gl.static_range(BN // _ROWS):
                box = ((w_row0 + pid_n * BN + j * _ROWS) // _ROWS * kbs + kb) * _ROWS
                tma.async_copy_global_to_shared(w_desc, [box, 0], bar, w_ring.index(slot).slice(j * _ROWS, _ROWS))
        else:
            tma.async_copy_global_to_shared(w_desc, [w_row0 + pid_n * BN, kb * _BK], bar, w_ring.index(slot))

    @gluon.jit
    def _producer(descs, smem, shape, sa_stride, GROUP_M: gl.constexpr):
        """One warp: the TMA loads of each tile's K blocks into the ring (`_load_kblock`)."""
        a_desc, w_desc, sa_desc, c_desc = descs
        a_ring, w_ring, sa_ring, c_smem, ready, empty = smem
        M, N, K = shape
        STAGES: gl.constexpr = w_ring.shape[0]
        CONSUMERS: gl.constexpr = a_ring.shape[0] // STAGES
        BM: gl.constexpr = CONSUMERS * _ROWS
        BN: gl.constexpr = w_desc.block_type.shape[0]
        ring = (a_ring, w_ring, sa_ring, ready, empty)
        num_m = gl.cdiv(M, BM)
        num_n = gl.cdiv(N, BN)
        kbs = K // _BK
        step = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            for kb in range(kbs):
                _load_kblock((a_desc, w_desc, sa_desc), ring, step, pid_m * BM, 0, pid_n, kb, sa_stride)
                step += 1

    @gluon.jit
    def _mma(a, w, zero, use_acc=False):
        """One K block's a @ w into a fresh fp32 accumulator (4 wgmma k32 steps), waited for."""
        part = warpgroup_mma(a, w, zero, use_acc=use_acc, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(part, a, w))[0]

    @gluon.jit
    def _release(bar, FENCE: gl.constexpr):
        # the scales were read through the generic proxy, the next TMA into this slot writes through the async one
        if FENCE:
            fence_async_shared()
        mbarrier.arrive(bar)

    @gluon.jit
    def _kblock(ring, slot, step, WG: gl.constexpr, acc, sb, sb_rows, nxt, zero, K, FENCE: gl.constexpr, sa_regs=None,
                SA_TMA: gl.constexpr = True):  # fmt: skip
        """One K block of one consumer: wait for the slot, wgmma its A rows against each 128-column half of the W
        tile, release the slot, promote into the accumulators; the next K block's weight scales (sb_rows + nxt)
        are loaded on the way. SA_TMA False: the A rows' scales are `sa_regs` ([64] fp32 in the accumulator's
        row layout), not the ring's. -> (acc0, acc1, sb0, sb1)."""
        a_ring, w_ring, sa_ring, ready, empty = ring
        acc0, acc1 = acc
        sb0, sb1 = sb
        sb_row0, sb_row1 = sb_rows
        STAGES: gl.constexpr = w_ring.shape[0]
        CONSUMERS: gl.constexpr = a_ring.shape[0] // STAGES
        HALVES: gl.constexpr = w_ring.shape[1] // 128
        row_l: gl.constexpr = gl.SliceLayout(1, zero.type.layout)
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        a = a_ring.index(slot * CONSUMERS + WG)  # [64, 128] e4m3, K-major
        w = w_ring.index(slot)  # [BN, 128] e4m3, K-major
        if SA_TMA:
            sa = sa_ring.index(slot * CONSUMERS + WG).load(row_l)  # [64] fp32
        else:
            sa = sa_regs
        part0 = _mma(a, w.slice(0, 128).permute((1, 0)), zero)
        if HALVES == 1:
            # the slot is free once the wgmma reading it is done; the next scales are loaded after the
            # release's fence (which waits for this thread's outstanding loads) and land during the next wait
            _release(empty.index(slot), FENCE)
            sb0_next = gl.load(sb_row0 + nxt)
            acc0 += part0 * (sa * sb0)[:, None]
            sb0 = sb0_next
        else:
            acc0 += part0 * (sa * sb0)[:, None]
            # Only one 64 x 128 partial may be live (64 x 256 accumulator + 2 partials > 255 registers), but
            # ptxas hoists the second wgmma above acc0's FMAs when it writes fresh registers. So: acc0 is
            # pinned before it (an empty wgmma wait taking acc0), and the second wgmma accumulates in place
            # on part0's registers under a predicate ptxas cannot prove false (K < 0), which orders it
            # after the FMAs that read them.
            acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0,))
            part1 = _mma(a, w.slice(128, 128).permute((1, 0)), part0, K < 0)
            _release(empty.index(slot), FENCE)
            sb0_next = gl.load(sb_row0 + nxt)
            sb1_next = gl.load(sb_row1 + nxt)
            acc1 += part1 * (sa * sb1)[:, None]
            sb0 = sb0_next
            sb1 = sb1_next
        return acc0, acc1, sb0, sb1

    @gluon.jit
    def _consumer(descs, smem, shape, w_scales, WG: gl.constexpr, BM: gl.constexpr, GROUP_M: gl.constexpr,
                  FENCE: gl.constexpr):  # fmt: skip
        """One warpgroup: rows [64 WG, 64 WG + 64) of each tile; BN / 128 column halves, each its own scale."""
        a_desc, w_desc, sa_desc, c_desc = descs
        a_ring, w_ring, sa_ring, c_smem, ready, empty = smem
        M, N, K = shape
        SB, stride_sbn, stride_sbk = w_scales  # [ceil(N/128), >= K/128] fp32
        BN: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = w_ring.shape[0]
        HALVES: gl.constexpr = BN // 128
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
        zero = gl.zeros([_ROWS, 128], gl.float32, mma)
        my_c = c_smem.index(WG)  # [64, BN] bf16, or [64, 128] (one half at a time)
        ring = (a_ring, w_ring, sa_ring, ready, empty)
        EPI_N: gl.constexpr = c_desc.block_type.shape[1]
        num_m = gl.cdiv(M, BM)
        num_n = gl.cdiv(N, BN)
        kbs = K // _BK
        step = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
            # the weight scale rows of the tile's column halves (a half past N reads the last row; it is clipped)
            sb_row0 = SB + pid_n * HALVES * stride_sbn
            sb_row1 = SB + gl.minimum(pid_n * HALVES + 1, gl.cdiv(N, 128) - 1) * stride_sbn
            sb0 = gl.load(sb_row0)
            sb1 = gl.load(sb_row1)
            acc0 = gl.zeros([_ROWS, 128], gl.float32, mma)
            acc1 = gl.zeros([_ROWS, 128], gl.float32, mma)
            for kb in range(kbs):
                slot = step % STAGES
                nxt = gl.minimum(kb + 1, kbs - 1) * stride_sbk  # the next K block's weight scales
                acc0, acc1, sb0, sb1 = _kblock(ring, slot, step, WG, (acc0, acc1), (sb0, sb1), (sb_row0, sb_row1), nxt,
                                               zero, K, FENCE)  # fmt: skip
                step += 1
            c_row = pid_m * BM + WG * _ROWS
            tma.store_wait(0)  # the previous tile's store has read my_c
            my_c.slice(0, 128, dim=1).store(acc0.to(c_desc.dtype))
            if HALVES == 2 and EPI_N == BN:
                my_c.slice(128, 128, dim=1).store(acc1.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [c_row, pid_n * BN], my_c)
            if HALVES == 2 and EPI_N < BN:
                tma.store_wait(0)
                my_c.store(acc1.to(c_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(c_desc, [c_row, pid_n * BN + 128], my_c)
        tma.store_wait(0)

    @gluon.jit
    def fp8_wgmma_kernel(a_desc, w_desc, sa_desc, c_desc, SB, stride_sbn, stride_sbk, M, N, K, sa_stride,
                         BM: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         PRODUCER_REGS: gl.constexpr, FENCE: gl.constexpr = True):  # fmt: skip
        """y = (A * sa) @ (W * sw)^T over a persistent grid of BM x BN tiles (module docstring)."""
        BN: gl.constexpr = w_desc.block_type.shape[0]
        CONSUMERS: gl.constexpr = BM // _ROWS
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES * CONSUMERS, _ROWS, _BK], a_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN, _BK], w_desc.layout)
        sa_ring = gl.allocate_shared_memory(sa_desc.dtype, [STAGES * CONSUMERS, _ROWS], sa_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, [CONSUMERS, _ROWS, c_desc.block_type.shape[1]], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        descs = (a_desc, w_desc, sa_desc, c_desc)
        smem = (a_ring, w_ring, sa_ring, c_smem, ready, empty)
        shape = (M, N, K)
        w_scales = (SB, stride_sbn, stride_sbk)
        # consumer 0 is the default partition (the kernel's num_warps = 4); the others and the producer are workers
        if CONSUMERS == 3:
            gl.warp_specialize(
                [
                    (_consumer, (descs, smem, shape, w_scales, 0, BM, GROUP_M, FENCE)),
                    (_consumer, (descs, smem, shape, w_scales, 1, BM, GROUP_M, FENCE)),
                    (_consumer, (descs, smem, shape, w_scales, 2, BM, GROUP_M, FENCE)),
                    (_producer, (descs, smem, shape, sa_stride, GROUP_M)),
                ],
                [4, 4, 1],
                [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
            )
        elif CONSUMERS == 2:
            gl.warp_specialize(
                [
                    (_consumer, (descs, smem, shape, w_scales, 0, BM, GROUP_M, FENCE)),
                    (_consumer, (descs, smem, shape, w_scales, 1, BM, GROUP_M, FENCE)),
                    (_producer, (descs, smem, shape, sa_stride, GROUP_M)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_consumer, (descs, smem, shape, w_scales, 0, BM, GROUP_M, FENCE)),
                    (_producer, (descs, smem, shape, sa_stride, GROUP_M)),
                ],
                [1],
                [PRODUCER_REGS],
            )


def descriptor_blocks(cfg: GemmConfig) -> dict:
    """Kernel argument -> (block shape, shared layout) of its TMA descriptor: A in [64, 128] boxes (a consumer's
    rows; boxes must be powers of two, so a 192-row tile is three), W [block_n, 128], the activation scales as a
    flat [KB x M4] array in [64] boxes, y [64, block_n]. 128 e4m3 of K are one 128-byte swizzled row."""
    op = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    epi_n = 128 if cfg.epi_half else cfg.block_n
    return {
        "a_desc": ([WG_ROWS, BK], op),
        "w_desc": ([cfg.block_n, BK], op),
        "sa_desc": ([WG_ROWS], gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)),
        "c_desc": ([WG_ROWS, epi_n], gl.NVMMASharedLayout.get_default_for([WG_ROWS, epi_n], gl.bfloat16)),
    }


def _scale_rows(a_scale: torch.Tensor, m: int, kb: int) -> torch.Tensor:
    """The activation scales as the kernel reads them: [KB, M4] contiguous fp32 (M4 >= M a multiple of 4, so
    each K block's row of scales starts 16-byte aligned). That is the storage of the act-quant's column-major
    [M4, KB] output (used in place); other layouts are copied."""
    t = a_scale[:, :kb].t()  # [KB, M']
    if t.dtype == torch.float32 and t.is_contiguous() and t.shape[1] % 4 == 0 and t.data_ptr() % 16 == 0:
        return t
    out = torch.zeros(kb, -(-m // 4) * 4, dtype=torch.float32, device=a_scale.device)  # [KB, M4]
    out[:, :m] = t[:, :m]
    return out


def fp8_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """y [M, N] bf16 = (a * a_scale) @ (w * w_scale)^T with fp32 accumulation, on sm_90.

    a [M, K] e4m3 row-major; a_scale [>= M, K/128] fp32, best column-major with M padded to 4 (what
    `fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)` returns: read in place, other layouts are copied);
    w [N, K] e4m3 row-major; w_scale [ceil(N/128), >= K/128] fp32, any strides (`weight_scale_inv`, or
    `prepare_weight_scale(...).t()`). Raises ValueError when K is not a multiple of 128 or the shapes disagree.
    Where N is not a multiple of 8 (TMA's 16-byte row stride), y is a view of a wider buffer."""
    m, k = a.shape
    n = w.shape[0]
    if k % BK:
        raise ValueError(f"fp8_block_gemm needs K a multiple of {BK} (one scale block per K step), got K={k}")
    if w.shape[1] != k or a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"need e4m3 a [M, K] and w [N, K]; got {a.dtype} {tuple(a.shape)}, {w.dtype} {tuple(w.shape)}")
    if out_dtype != torch.bfloat16:
        raise ValueError(f"fp8_block_gemm writes bf16, got out_dtype={out_dtype}")
    kb = k // BK
    if a_scale.shape[0] < m or a_scale.shape[1] < kb or w_scale.shape[0] != -(-n // BK) or w_scale.shape[1] < kb:
        raise ValueError(f"scales {tuple(a_scale.shape)}, {tuple(w_scale.shape)} do not fit a {m}x{k} @ {n}x{k} GEMM")
    cfg = config or default_config(m, n, k)
    cfg.check()
    y = torch.empty(m, -(-n // 8) * 8, dtype=torch.bfloat16, device=a.device)[:, :n]  # [M, N], 16-byte rows
    if m == 0 or n == 0:
        return y
    a = a if a.stride(1) == 1 and a.stride(0) % 16 == 0 else a.contiguous()
    w = w if w.stride(1) == 1 and w.stride(0) % 16 == 0 else w.contiguous()
    sa = _scale_rows(a_scale, m, kb)  # [KB, M4]
    ws = w_scale.float()  # [NB, >= KB]
    blocks = descriptor_blocks(cfg)
    descs = [
        TensorDescriptor.from_tensor(t, *blocks[name])
        for name, t in zip(blocks, (a, w, sa.reshape(-1), y), strict=True)
    ]
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    grid = (min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count),)
    maxnreg, consumer, producer = cfg.registers()
    fp8_wgmma_kernel[grid](
        *descs, ws, ws.stride(0), ws.stride(1), m, n, k, sa.stride(0),
        BM=cfg.block_m, STAGES=cfg.stages, GROUP_M=cfg.group_m, CONSUMER_REGS=consumer, PRODUCER_REGS=producer,
        FENCE=cfg.fence,
        num_warps=4, maxnreg=maxnreg,
    )  # fmt: skip
    return y
