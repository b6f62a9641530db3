"""FP8 block-scaled grouped GEMM for MoE experts on Hopper (sm_90a) in Gluon: `fp8_wgmma`'s pipeline with the
rows sorted by expert.

`grouped_fp8_block_gemm` is `fp8_wgmma.fp8_block_gemm`'s pipeline for MoE experts at prefill sizes (rows
sorted by expert, w [E, N, K], counts [E] on the GPU, never read on the host, so it runs inside CUDA graphs):
- the schedule comes from the counts in the kernel (`_grouped_tile`, called by the producer and the consumers
  alike): tiles go expert by expert, ceil(count / BM) row tiles x ceil(N / BN) column tiles each, every
  program scanning the E counts per tile; the grid is min(#SMs, a bound from the shapes alone);
- a tile's A rows start at its expert's rows and run on into the next expert's (loaded and multiplied, never
  stored); its W rows are e * N + the tile's columns of w viewed as [E * N, K];
- the epilogue stores from registers with row and column masks (a TMA store would write the next expert's
  rows); a consumer whose 64 rows all lie past its expert's end skips the wgmma and only releases the slots,
  so an expert's last row tile costs 64-row granularity.
GPU-tested on an H200 against the fp32 reference (tests/test_kernels_fp8_wgmma_grouped.py) and measured by
`bench/exp_fp8_wgmma.py --grouped` (bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_core.kernels.fp8_wgmma import (
    BK,
    SMEM_BYTES,
    WG_ROWS,
    GemmConfig,
    _scale_rows,
    descriptor_blocks,
    fp8_block_gemm_reference,
    gluon,
)

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from miles_core.kernels.fp8_wgmma import _BK, _ROWS, _kblock, _load_kblock, _tile_coords

__all__ = [
    "GroupedConfig",
    "check_grouped_operands",
    "grouped_configs",
    "grouped_default_config",
    "grouped_descriptor_blocks",
    "grouped_fp8_block_gemm",
    "grouped_fp8_block_gemm_reference",
]

MAX_EXPERTS = 256  # each partition holds the E counts in registers per tile: 512 spills (sm_90 compile)


@dataclass(frozen=True)
class GroupedConfig:
    """Tiles of `grouped_fp8_block_gemm`, as in GemmConfig. Its epilogue stores from registers (masked rows; no
    bf16 tile waits in shared memory for a TMA store), so a 128 x 256 tile fits 4 stages. coalesce (default): the
    bf16 tile is re-laid out through a small shared scratch (`gl.convert_layout`) into row-contiguous 16-byte
    stores; else each thread stores its wgmma fragment as 4-byte column pairs, 1.15-1.40x slower on an H200
    (bench/RESULTS.md)."""

    block_m: int = 128
    block_n: int = 256
    stages: int = 4
    group_m: int = 8
    fence: bool = True
    coalesce: bool = True

    @property
    def consumers(self) -> int:
        return self.block_m // WG_ROWS

    def registers(self) -> tuple[int, int, int]:
        """(maxnreg at launch, consumer, producer) registers per thread, as GemmConfig.registers."""
        return GemmConfig(self.block_m, self.block_n, self.stages).registers()

    def smem_bytes(self) -> int:
        stage = self.block_m * BK + self.block_n * BK + self.block_m * 4  # A, W (e4m3), activation scales (fp32)
        # coalesce: each consumer's convert_layout scratch (Triton moves the bf16 64 x 128 tile in two halves)
        scratch = self.consumers * WG_ROWS * 64 * 2 if self.coalesce else 0
        return self.stages * (stage + 16) + scratch + 256

    def check(self) -> None:
        """Raise ValueError for tiles the kernel does not take or shared memory cannot hold."""
        GemmConfig(self.block_m, self.block_n, 2).check()  # the tile shapes
        if self.stages < 2 or self.smem_bytes() > SMEM_BYTES:
            raise ValueError(f"{self}: needs {self.smem_bytes()} bytes of shared memory (limit {SMEM_BYTES})")


def grouped_configs() -> list[GroupedConfig]:
    """The candidates `bench/exp_fp8_wgmma.py --grouped` sweeps: the dense kernel's best tile (128 x 256) at 3
    and 4 stages, with either epilogue and without the wgmma fence, 64-row tiles (a 32-row expert wastes half as
    much), and 192 x 128 / 128 x 128."""
    return [
        GroupedConfig(128, 256, 4, 8),
        GroupedConfig(128, 256, 3, 8),
        GroupedConfig(128, 256, 4, 8, coalesce=False),
        GroupedConfig(128, 256, 4, 8, fence=False),
        GroupedConfig(64, 256, 5, 8),
        GroupedConfig(192, 128, 4, 8),
        GroupedConfig(128, 128, 6, 8),
    ]


def grouped_default_config(m: int, n: int, k: int, e: int) -> GroupedConfig:
    """128 x 256 tiles, 4 stages, coalesced stores: the fastest of `grouped_configs()` on an H200 at every size
    from 32k rows (Qwen3-30B-A3B experts, 262,144 rows: gate_up 1.60-1.67x of bf16 `_grouped_mm`, down
    1.48-1.53x; the next config 1.43x / 1.13x; bench/RESULTS.md, twelfth session); at 4,096 rows within 1% of
    64 x 256 tiles and at 16,384 rows 1.13-1.20x faster (seventeenth session)."""
    return GroupedConfig()


def grouped_fp8_block_gemm_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    counts: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """a [M, K] e4m3 rows sorted by expert, a_scale [>= M, K/128], w [E, N, K] e4m3, w_scale [E, ceil(N/128),
    >= K/128], counts [E] -> [M, N]: expert e's rows [sum(counts[:e]), sum(counts[:e + 1])) through
    `fp8_block_gemm_reference` with w[e]; rows past sum(counts) are zeros."""
    out = torch.zeros(a.shape[0], w.shape[1], dtype=out_dtype, device=a.device)  # [M, N]
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            rows = slice(start, start + c)
            out[rows] = fp8_block_gemm_reference(a[rows], a_scale[rows], w[e], w_scale[e], out_dtype)
        start += c
    return out


if gluon is not None:

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _expert_tiles(sched, BM: gl.constexpr, BN: gl.constexpr, E_P2: gl.constexpr, WARPS: gl.constexpr):
        """(experts [E_P2], rows per expert [E_P2] (zeros past E), output tiles per expert [E_P2]), each vector
        held whole by every warp of the partition (a reduction over it needs no shared memory)."""
        COUNTS, E, M, N = sched
        layout: gl.constexpr = gl.BlockedLayout([E_P2 // 32], [32], [WARPS], [0])
        es = gl.arange(0, E_P2, layout)
        c = gl.load(COUNTS + es, mask=es < E, other=0).to(gl.int32)  # [E_P2]
        return es, c, (c + BM - 1) // BM * gl.cdiv(N, BN)

    @gluon.jit
    def _total_tiles(sched, BM: gl.constexpr, BN: gl.constexpr, E_P2: gl.constexpr, WARPS: gl.constexpr):
        """The output tiles of all experts."""
        return gl.sum(_expert_tiles(sched, BM, BN, E_P2, WARPS)[2], 0)

    @gluon.jit
    def _grouped_tile(sched, tile, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr, E_P2: gl.constexpr,
                      WARPS: gl.constexpr):  # fmt: skip
        """Output tile `tile` of the grouped GEMM -> (expert e, first row m0, the expert's row end, column tile).
        Tiles go expert by expert, ceil(count / BM) row tiles x ceil(N / BN) column tiles each, in GROUP_M order
        within the expert; every program scans the E counts (a few hundred bytes, from L1 after the first tile)
        instead of reading a table that a launch before it made. The producer and the consumers call this."""
        COUNTS, E, M, N = sched
        es, c, tiles = _expert_tiles(sched, BM, BN, E_P2, WARPS)
        ends = gl.associative_scan(tiles, 0, _add)  # [E_P2] inclusive
        e = gl.sum((ends <= tile).to(gl.int32), 0)  # experts whose tiles end at or before this one
        before = es < e
        first = gl.sum(gl.where(before, tiles, 0), 0)  # e's first tile
        row0 = gl.sum(gl.where(before, c, 0), 0)  # e's first row
        count = gl.sum(gl.where(es == e, c, 0), 0)
        pid_m, pid_n = _tile_coords(tile - first, gl.cdiv(count, BM), gl.cdiv(N, BN), GROUP_M)
        return e, row0 + pid_m * BM, gl.minimum(row0 + count, M), pid_n

    @gluon.jit
    def _grouped_producer(descs, ring, sched, K, sa_stride, GROUP_M: gl.constexpr, E_P2: gl.constexpr,
                          TILED: gl.constexpr):  # fmt: skip
        """One warp: each tile's K blocks into the ring (`_load_kblock`): A from the tile's first row (rows past
        the expert's end are loaded and multiplied, never stored), W from row e * N + the tile's columns of w
        viewed as [E * N, K]."""
        a_desc, w_desc, sa_desc = descs
        a_ring, w_ring, sa_ring, ready, empty = ring
        COUNTS, E, M, N = sched
        STAGES: gl.constexpr = w_ring.shape[0]
        BM: gl.constexpr = a_ring.shape[0] // STAGES * _ROWS
        BN: gl.constexpr = w_ring.shape[1]
        kbs = K // _BK
        total = _total_tiles(sched, BM, BN, E_P2, 1)
        step = 0
        for tile in range(gl.program_id(0), total, gl.num_programs(0)):
            e, m0, row_end, pid_n = _grouped_tile(sched, tile, BM, BN, GROUP_M, E_P2, 1)
            for kb in range(kbs):
                _load_kblock(descs, ring, step, m0, e * N, pid_n, kb, sa_stride, False, TILED, kbs)
                step += 1

    @gluon.jit
    def _store_rows(Y, stride_ym, acc, r0, row_end, n0, N, COALESCE: gl.constexpr):
        """acc [64, 128] fp32 -> bf16 Y[r0 + i, n0 + j] where r0 + i < row_end and n0 + j < N."""
        if COALESCE:  # through shared memory: 8 columns (16 bytes) per thread, 16 threads per 256-byte row
            layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
            out = gl.convert_layout(acc.to(gl.bfloat16), layout)
        else:
            layout: gl.constexpr = acc.type.layout
            out = acc.to(gl.bfloat16)
        # offsets from the tile's rows and columns (not from aranges alone, which the compiler would hoist out of
        # the tile loop and keep live across the K loop, where registers are short)
        rows = r0 + gl.arange(0, _ROWS, gl.SliceLayout(1, layout))
        cols = n0 + gl.arange(0, 128, gl.SliceLayout(0, layout))
        ptrs = Y + rows.to(gl.int64)[:, None] * stride_ym + cols[None, :]
        gl.store(ptrs, out, mask=(rows < row_end)[:, None] & (cols < N)[None, :])

    @gluon.jit
    def _grouped_consumer(common, WG: gl.constexpr, GROUP_M: gl.constexpr, E_P2: gl.constexpr, FENCE: gl.constexpr,
                          COALESCE: gl.constexpr):  # fmt: skip
        """One warpgroup: rows [64 WG, 64 WG + 64) of each tile, as the dense `_consumer`, with the expert's
        weight scales and a masked store of the rows before the expert's end. Where all its 64 rows lie past
        the end (the last row tile of an expert) it skips the wgmma and only releases the slots."""
        ring, sched, out, w_scales, K, SA, sa_stride = common
        a_ring, w_ring, sa_ring, ready, empty = ring
        COUNTS, E, M, N = sched
        Y, stride_ym = out
        SB, stride_se, stride_sbn, stride_sbk = w_scales  # [E, ceil(N/128), >= K/128] fp32
        STAGES: gl.constexpr = w_ring.shape[0]
        BN: gl.constexpr = w_ring.shape[1]
        BM: gl.constexpr = a_ring.shape[0] // STAGES * _ROWS
        HALVES: gl.constexpr = BN // 128
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
        zero = gl.zeros([_ROWS, 128], gl.float32, mma)
        kbs = K // _BK
        total = _total_tiles(sched, BM, BN, E_P2, 4)
        step = 0
        for tile in range(gl.program_id(0), total, gl.num_programs(0)):
            e, m0, row_end, pid_n = _grouped_tile(sched, tile, BM, BN, GROUP_M, E_P2, 4)
            r0 = m0 + WG * _ROWS
            if r0 < row_end:
                # the expert's weight scale rows of the tile's column halves (a half past N reads the last row)
                sb_e = SB + e.to(gl.int64) * stride_se
                sb_row0 = sb_e + pid_n * HALVES * stride_sbn
                sb_row1 = sb_e + gl.minimum(pid_n * HALVES + 1, gl.cdiv(N, 128) - 1) * stride_sbn
                sb0 = gl.load(sb_row0)
                sb1 = gl.load(sb_row1)
                # the rows' activation scales ([KB, M4] fp32), loaded a K block ahead: rows past the expert's end
                # (or the scales' row) are multiplied, never stored
                sa_rows = r0 + gl.arange(0, _ROWS, gl.SliceLayout(1, mma))
                sa_ptrs = SA + sa_rows
                sa_ok = sa_rows < sa_stride
                sa_cur = gl.load(sa_ptrs, mask=sa_ok, other=0.0)
                acc0 = gl.zeros([_ROWS, 128], gl.float32, mma)
                acc1 = gl.zeros([_ROWS, 128], gl.float32, mma)
                for kb in range(kbs):
                    slot = (step + kb) % STAGES
                    nxt = gl.minimum(kb + 1, kbs - 1) * stride_sbk  # the next K block's weight scales
                    sa_next = gl.load(sa_ptrs + gl.minimum(kb + 1, kbs - 1) * sa_stride, mask=sa_ok, other=0.0)
                    acc0, acc1, sb0, sb1 = _kblock(ring, slot, step + kb, WG, (acc0, acc1), (sb0, sb1),
                                                   (sb_row0, sb_row1), nxt, zero, K, FENCE, sa_cur, False)  # fmt: skip
                    sa_cur = sa_next
                n0 = pid_n * BN
                _store_rows(Y, stride_ym, acc0, r0, row_end, n0, N, COALESCE)
                if HALVES == 2:
                    _store_rows(Y, stride_ym, acc1, r0, row_end, n0 + 128, N, COALESCE)
            else:
                for kb in range(kbs):  # wait for each slot too: an early arrive would count toward its current phase
                    slot = (step + kb) % STAGES
                    mbarrier.wait(ready.index(slot), ((step + kb) // STAGES) & 1)
                    mbarrier.arrive(empty.index(slot))
            step += kbs

    @gluon.jit
    def fp8_wgmma_grouped_kernel(a_desc, w_desc, sa_desc, SA, Y, SB, COUNTS, stride_ym, stride_se, stride_sbn,
                                 stride_sbk, M, N, K, E, sa_stride, BM: gl.constexpr, STAGES: gl.constexpr,
                                 GROUP_M: gl.constexpr, E_P2: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                 PRODUCER_REGS: gl.constexpr, FENCE: gl.constexpr = True,
                                 COALESCE: gl.constexpr = False, TILED_BN: gl.constexpr = 0):  # fmt: skip
        """y[rows of expert e] = (A * sa)[those rows] @ (W[e] * sw[e])^T over a persistent grid of BM x BN tiles,
        scheduled from the device's counts (`_grouped_tile`); the ring and partitions of `fp8_wgmma_kernel`.
        TILED_BN > 0: w in `quant.fp8.tile_fp8_weights`' layout, tiles of TILED_BN weight rows (64-row boxes)."""
        CONSUMERS: gl.constexpr = BM // _ROWS
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES * CONSUMERS, _ROWS, _BK], a_desc.layout)
        BOX: gl.constexpr = w_desc.block_type.shape[0]
        if TILED_BN > 0:
            w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, TILED_BN, _BK], w_desc.layout)
        else:
            w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BOX, _BK], w_desc.layout)
        sa_ring = gl.allocate_shared_memory(sa_desc.dtype, [STAGES * CONSUMERS, _ROWS], sa_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        ring = (a_ring, w_ring, sa_ring, ready, empty)
        sched = (COUNTS, E, M, N)
        out = (Y, stride_ym)
        w_scales = (SB, stride_se, stride_sbn, stride_sbk)
        descs = (a_desc, w_desc, sa_desc)
        common = (ring, sched, out, w_scales, K, SA, sa_stride)
        # consumer 0 is the default partition (the kernel's num_warps = 4); the others and the producer are workers
        if CONSUMERS == 3:
            gl.warp_specialize(
                [
                    (_grouped_consumer, (common, 0, GROUP_M, E_P2, FENCE, COALESCE)),
                    (_grouped_consumer, (common, 1, GROUP_M, E_P2, FENCE, COALESCE)),
                    (_grouped_consumer, (common, 2, GROUP_M, E_P2, FENCE, COALESCE)),
                    (_grouped_producer, (descs, ring, sched, K, sa_stride, GROUP_M, E_P2, TILED_BN > 0)),
                ],
                [4, 4, 1],
                [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
            )
        elif CONSUMERS == 2:
            gl.warp_specialize(
                [
                    (_grouped_consumer, (common, 0, GROUP_M, E_P2, FENCE, COALESCE)),
                    (_grouped_consumer, (common, 1, GROUP_M, E_P2, FENCE, COALESCE)),
                    (_grouped_producer, (descs, ring, sched, K, sa_stride, GROUP_M, E_P2, TILED_BN > 0)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_grouped_consumer, (common, 0, GROUP_M, E_P2, FENCE, COALESCE)),
                    (_grouped_producer, (descs, ring, sched, K, sa_stride, GROUP_M, E_P2, TILED_BN > 0)),
                ],
                [1],
                [PRODUCER_REGS],
            )


def grouped_descriptor_blocks(cfg: GroupedConfig) -> dict:
    """Kernel argument -> (block shape, shared layout) of its TMA descriptor, as `descriptor_blocks` (no y)."""
    blocks = descriptor_blocks(GemmConfig(cfg.block_m, cfg.block_n))
    return {name: blocks[name] for name in ("a_desc", "w_desc", "sa_desc")}


def check_grouped_operands(name: str, a, a_scale, w, w_scale, counts) -> int:
    """Raise ValueError where the grouped GEMM `name` cannot take these operands (K not a multiple of 128, not
    e4m3, shapes or devices that disagree, more than MAX_EXPERTS experts); -> K / 128."""
    m, k = a.shape
    e, n = w.shape[:2]
    if k % BK:
        raise ValueError(f"{name} needs K a multiple of {BK} (one scale block per K step), got K={k}")
    if w.dim() != 3 or w.shape[2] != k or a.dtype != torch.float8_e4m3fn or w.dtype != torch.float8_e4m3fn:
        raise ValueError(f"need e4m3 a [M, K], w [E, N, K]; got {a.dtype} {tuple(a.shape)}, {w.dtype} {tuple(w.shape)}")
    kb = k // BK
    if a_scale.shape[0] < m or a_scale.shape[1] < kb or tuple(w_scale.shape[:2]) != (e, -(-n // BK)):
        raise ValueError(
            f"scales {tuple(a_scale.shape)}, {tuple(w_scale.shape)} don't fit a {m}x{k} @ {e}x{n}x{k} GEMM"
        )
    if w_scale.shape[2] < kb or tuple(counts.shape) != (e,) or counts.device != a.device:
        got = f"{tuple(w_scale.shape)}, {tuple(counts.shape)} on {counts.device}"
        raise ValueError(f"need w_scale [E, N/128, >= {kb}] and counts [{e}] on {a.device}, got {got}")
    if e > MAX_EXPERTS:
        raise ValueError(f"{name} schedules up to {MAX_EXPERTS} experts in the kernel, got {e}")
    return kb


def grouped_fp8_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    counts: torch.Tensor,
    config: GroupedConfig | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """y [M, N] bf16: expert e's rows of a (rows sorted by expert, counts [E] rows each) times w[e]^T, both
    block-scaled as in `fp8_block_gemm`, on sm_90. `tiled`: w in `quant.fp8.tile_fp8_weights`' layout (N a
    multiple of 64): the same bits.

    a [M, K] e4m3 and a_scale [>= M, K/128] as `fp8_block_gemm` takes them; w [E, N, K] e4m3 with w_scale
    [E, ceil(N/128), >= K/128] fp32 (`fp8_block_quantize` of the 3-D weight); counts [E] int32 / int64 on a's
    device, never read on the host (the call can be captured in a CUDA graph and replayed with other counts).
    Rows from sum(counts) to M are not written. Raises ValueError when K is not a multiple of 128 or the shapes
    disagree."""
    m, k = a.shape
    e, n = w.shape[:2]
    kb = check_grouped_operands("grouped_fp8_block_gemm", a, a_scale, w, w_scale, counts)
    cfg = config or grouped_default_config(m, n, k, e)
    cfg.check()
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)  # [M, N]
    if m == 0 or n == 0 or e == 0:
        return y
    a = a if a.stride(1) == 1 and a.stride(0) % 16 == 0 else a.contiguous()
    w = w.contiguous()
    sa = _scale_rows(a_scale, m, kb)  # [KB, M4]
    ws = w_scale.float()  # [E, NB, >= KB]
    blocks = grouped_descriptor_blocks(cfg)
    if tiled:
        if n % WG_ROWS:
            raise ValueError(f"tiled weights need N a multiple of {WG_ROWS}, got {n}")
        blocks["w_desc"] = ([WG_ROWS, BK], blocks["w_desc"][1])  # one 8 KB box per load
    w2d = w.view(-1, BK) if tiled else w.view(e * n, k)
    descs = [
        TensorDescriptor.from_tensor(t, *blocks[name]) for name, t in zip(blocks, (a, w2d, sa.reshape(-1)), strict=True)
    ]
    # an upper bound on the tiles from the shapes alone: sum_e ceil(c_e / BM) <= ceil(M / BM) + (experts with rows)
    bound = (-(-m // cfg.block_m) + min(e, m)) * -(-n // cfg.block_n)
    grid = (min(bound, torch.cuda.get_device_properties(a.device).multi_processor_count),)
    maxnreg, consumer, producer = cfg.registers()
    fp8_wgmma_grouped_kernel[grid](
        *descs, sa, y, ws, counts, y.stride(0), ws.stride(0), ws.stride(1), ws.stride(2), m, n, k, e, sa.stride(0),
        BM=cfg.block_m, STAGES=cfg.stages, GROUP_M=cfg.group_m, E_P2=max(32, 1 << (e - 1).bit_length()),
        CONSUMER_REGS=consumer, PRODUCER_REGS=producer, FENCE=cfg.fence, COALESCE=cfg.coalesce,
        TILED_BN=cfg.block_n if tiled else 0, num_warps=4, maxnreg=maxnreg,
    )  # fmt: skip
    return y
