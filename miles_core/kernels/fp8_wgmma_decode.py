"""FP8 block-scaled grouped GEMM for MoE experts at decode sizes on Hopper (sm_90a) in Gluon: the weights on
wgmma's M side, a few rows per expert on its N side, a TMA ring per SM that does not drain between tiles.

At decode the experts' rows are few (batch 64 x top-8 over 128 experts: ~4 rows each) and the GEMM is a
stream of weight bytes. `fp8_wgmma_grouped` puts the rows on wgmma's M side (64-row tiles, mostly padding),
so its consumer runs a 64 x 128 wgmma and promotes a 64 x 128 partial per K block for 4 useful rows. Here a
tile is 64 x C weight rows (one 64-row slice per consumer warpgroup) by BR rows of one expert (BR = 16 or 32,
wgmma m64nBRk32): y^T[slice, rows] = (W[e] * sw)[slice] @ (A * sa)[rows]^T, so a K block costs each consumer
one small wgmma and BR / 4 promotion FMAs per thread, and the weight stream is what is left.

- the schedule comes from the counts on the GPU (`fp8_wgmma_grouped._grouped_tile`: tiles go expert by expert,
  ceil(count / BR) row tiles x ceil(N / (64 C)) weight tiles each); a persistent grid walks them;
- a producer warp TMA-loads each K block into a STAGES-deep ring: the BR rows from the tile's first row (rows
  past the expert's end are multiplied, never stored; past M, zeros) and one [64, 128] weight box per
  consumer from row e * N + the slice's first (rows past N belong to the next expert: masked on store);
- the consumers read the ring only through wgmma (the async proxy), so a slot is released without a fence;
  the weight scale (one per K block: a 64-row slice lies in one 128-row scale block) and the rows' scales (by
  their strides: the act-quant's row- or column-major layout, no copy) are loaded from global memory a K block
  ahead; one wgmma stays in flight behind the partial being promoted;
- the epilogue stores the transposed [64, BR] tile as bf16 rows of y, 16 bytes per thread, masked to the
  expert's rows and to N.

`grouped_fp8_decode_gemm` takes the operands of `fp8_wgmma_grouped.grouped_fp8_block_gemm` and gives the same
values (its reference is the same); measured by `bench/decode_kernels.py --only gluon`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_core.kernels.fp8_wgmma import BK, SMEM_BYTES, WG_ROWS, gluon
from miles_core.kernels.fp8_wgmma_grouped import check_grouped_operands

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from miles_core.kernels.fp8_wgmma import _BK, _ROWS
    from miles_core.kernels.fp8_wgmma_grouped import _grouped_tile, _total_tiles

__all__ = ["DecodeConfig", "decode_configs", "decode_descriptor_blocks", "grouped_fp8_decode_gemm"]


@dataclass(frozen=True)
class DecodeConfig:
    """Tiles of `grouped_fp8_decode_gemm`: consumers (warpgroups of 64 weight rows each: 1 or 2), block_r rows of
    an expert per tile (16 or 32: wgmma's N), stages (K blocks in flight), group_m (an expert's row tiles that
    walk its weight tiles together) and ctas per SM of the persistent grid."""

    consumers: int = 2
    block_r: int = 16
    stages: int = 3
    group_m: int = 8
    ctas: int = 3

    @property
    def block_w(self) -> int:
        return WG_ROWS * self.consumers

    def registers(self) -> tuple[int, int, int]:
        """(maxnreg at launch, worker consumer, producer) registers per thread: an SM's register file split over
        its CTAs and their warps (the producer warp padded to a warpgroup); the producer shrinks to 40 and the
        consumers share the rest (Triton gives the default partition what the workers leave)."""
        warps = 4 * self.consumers + 4
        maxnreg = min(65536 // (32 * warps * self.ctas) // 8 * 8, 248)
        consumer = min((32 * warps * maxnreg - 128 * 40) // (128 * self.consumers) // 8 * 8, 248)
        return maxnreg, consumer, 40

    def smem_bytes(self) -> int:
        stage = self.block_w * BK + self.block_r * BK + 16  # weight boxes, rows (e4m3), two mbarriers
        scratch = self.consumers * WG_ROWS * self.block_r * 2  # each consumer's bf16 tile re-laid out for stores
        return self.stages * stage + scratch + 256

    def check(self) -> None:
        """Raise ValueError for tiles the kernel does not take or shared memory cannot hold."""
        if self.consumers not in (1, 2) or self.block_r not in (8, 16, 32) or self.ctas not in (1, 2, 3, 4):
            raise ValueError(f"{self}: consumers 1-2, block_r 8/16/32, ctas 1-4")
        if self.stages < 2 or self.smem_bytes() * self.ctas > SMEM_BYTES:
            raise ValueError(f"{self}: needs {self.smem_bytes()} x {self.ctas} bytes of shared memory")


def decode_configs() -> list[DecodeConfig]:
    """The candidates `bench/decode_kernels.py --only gluon` sweeps."""
    return [
        DecodeConfig(2, 16, 3, ctas=3),
        DecodeConfig(2, 16, 5, ctas=2),
        DecodeConfig(1, 16, 3, ctas=4),
        DecodeConfig(1, 16, 5, ctas=3),
        DecodeConfig(2, 32, 4, ctas=2),
    ]


def default_decode_config(m: int, e: int) -> DecodeConfig:
    """Up to 16 rows per expert on average, 16-row tiles, two consumers, 3 stages, 3 CTAs per SM; else 32-row
    tiles, 4 stages, 2 CTAs. On an H200 at 2,048 rows of Qwen3-30B-A3B's experts (bench/RESULTS.md, seventeenth
    session) a CTA per SM streamed at 0.59-0.62x of the copy rate, 2 CTAs at 0.76-0.84x, 3 at 0.84-0.92x."""
    return DecodeConfig(2, 16, 3, ctas=3) if m <= 16 * e else DecodeConfig(2, 32, 4, ctas=2)


if gluon is not None:

    @gluon.jit
    def _decode_producer(descs, ring, sched, K, BR: gl.constexpr, GROUP_M: gl.constexpr, E_P2: gl.constexpr,
                         TILED: gl.constexpr):  # fmt: skip
        """One warp: each tile's K blocks into the ring, once every consumer has released the slot."""
        a_desc, w_desc = descs
        a_ring, w_ring, ready, empty = ring
        COUNTS, E, M, N = sched
        STAGES: gl.constexpr = a_ring.shape[0]
        CONSUMERS: gl.constexpr = w_ring.shape[0] // STAGES
        BW: gl.constexpr = CONSUMERS * _ROWS
        NBYTES: gl.constexpr = BW * _BK + BR * _BK
        kbs = K // _BK
        total = _total_tiles(sched, BR, BW, E_P2, 1)
        step = 0
        for tile in range(gl.program_id(0), total, gl.num_programs(0)):
            e, m0, row_end, pid_n = _grouped_tile(sched, tile, BR, BW, GROUP_M, E_P2, 1)
            w_row = e * N + pid_n * BW
            for kb in range(kbs):
                slot = step % STAGES
                # a fresh mbarrier counts as having completed the phase before phase 0: the first pass is free
                mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                mbarrier.expect(bar, NBYTES)
                tma.async_copy_global_to_shared(a_desc, [m0, kb * _BK], bar, a_ring.index(slot))
                for i in gl.static_range(CONSUMERS):
                    if TILED:  # `tile_fp8_weights` layout: box (64-row slice, K block) is one contiguous 8 KB run
                        coord = [((w_row + i * _ROWS) // _ROWS * kbs + kb) * _ROWS, 0]
                    else:
                        coord = [w_row + i * _ROWS, kb * _BK]
                    tma.async_copy_global_to_shared(w_desc, coord, bar, w_ring.index(slot * CONSUMERS + i))
                step += 1

    @gluon.jit
    def _decode_consumer(ring, sched, out, scales, K, WG: gl.constexpr, BR: gl.constexpr, GROUP_M: gl.constexpr,
                         E_P2: gl.constexpr):  # fmt: skip
        """One warpgroup: weight rows [64 WG, 64 WG + 64) of each tile against its BR rows."""
        a_ring, w_ring, ready, empty = ring
        COUNTS, E, M, N = sched
        Y, stride_ym = out
        SA, stride_sam, stride_sak, sa_rows, SB, stride_se, stride_sbn, stride_sbk = scales
        STAGES: gl.constexpr = a_ring.shape[0]
        CONSUMERS: gl.constexpr = w_ring.shape[0] // STAGES
        BW: gl.constexpr = CONSUMERS * _ROWS
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BR, 32])
        row_l: gl.constexpr = gl.SliceLayout(0, mma)  # along the tile's rows (wgmma's N)
        # bf16 out: 8 weight columns (16 bytes of a y row) per thread
        store_l: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
        zero = gl.zeros([_ROWS, BR], gl.float32, mma)
        kbs = K // _BK
        total = _total_tiles(sched, BR, BW, E_P2, 4)
        step = 0
        for tile in range(gl.program_id(0), total, gl.num_programs(0)):
            e, m0, row_end, pid_n = _grouped_tile(sched, tile, BR, BW, GROUP_M, E_P2, 4)
            n0 = pid_n * BW + WG * _ROWS
            # the slice's weight scales (one 128-row block; a slice past N reads the last block: masked on store)
            sb_row = SB + e.to(gl.int64) * stride_se + gl.minimum(n0 // 128, gl.cdiv(N, 128) - 1) * stride_sbn
            sb = gl.load(sb_row)
            rows = m0 + gl.arange(0, BR, row_l)
            sa_ok = rows < sa_rows
            sa_ptrs = SA + rows.to(gl.int64) * stride_sam
            sa = gl.load(sa_ptrs, mask=sa_ok, other=0.0)  # [BR] fp32, K block 0
            acc = gl.zeros([_ROWS, BR], gl.float32, mma)
            # one wgmma in flight behind the one being promoted: K block kb's is issued, then kb - 1's awaited,
            # its slot released and its partial promoted (with its scales, loaded an iteration before)
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            a_t = a_ring.index(slot).permute((1, 0))  # [128, BR] e4m3, K-major
            part = warpgroup_mma(w_ring.index(slot * CONSUMERS + WG), a_t, zero, use_acc=False, is_async=True)
            sc = sa * sb
            for kb in range(1, kbs):
                s = step + kb
                slot = s % STAGES
                sb_k = gl.load(sb_row + kb * stride_sbk)
                sa_k = gl.load(sa_ptrs + kb * stride_sak, mask=sa_ok, other=0.0)
                mbarrier.wait(ready.index(slot), (s // STAGES) & 1)
                a_t = a_ring.index(slot).permute((1, 0))
                nxt = warpgroup_mma(w_ring.index(slot * CONSUMERS + WG), a_t, zero, use_acc=False, is_async=True)
                part = warpgroup_mma_wait(num_outstanding=1, deps=(part,))
                mbarrier.arrive(empty.index((s - 1) % STAGES))
                acc += part * sc[None, :]
                part = nxt
                sc = sa_k * sb_k
            part = warpgroup_mma_wait(num_outstanding=0, deps=(part,))
            mbarrier.arrive(empty.index((step + kbs - 1) % STAGES))
            acc += part * sc[None, :]
            step += kbs
            out_t = gl.convert_layout(acc.to(gl.bfloat16), store_l)  # [64 weight rows, BR rows]
            cols = n0 + gl.arange(0, _ROWS, gl.SliceLayout(1, store_l))
            rws = m0 + gl.arange(0, BR, gl.SliceLayout(0, store_l))
            ptrs = Y + rws.to(gl.int64)[None, :] * stride_ym + cols[:, None]
            gl.store(ptrs, out_t, mask=(rws < row_end)[None, :] & (cols < N)[:, None])

    @gluon.jit
    def fp8_wgmma_decode_kernel(a_desc, w_desc, SA, Y, SB, COUNTS, stride_ym, stride_sam, stride_sak, sa_rows,
                                stride_se, stride_sbn, stride_sbk, M, N, K, E, BR: gl.constexpr, STAGES: gl.constexpr,
                                CONSUMERS: gl.constexpr, GROUP_M: gl.constexpr, E_P2: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                TILED: gl.constexpr = False):  # fmt: skip
        """y[rows of expert e] = (A * sa)[those rows] @ (W[e] * sw[e])^T, tiles of 64 CONSUMERS weight rows by BR
        rows over a persistent grid (module docstring)."""
        a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BR, _BK], a_desc.layout)
        w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES * CONSUMERS, _ROWS, _BK], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        ring = (a_ring, w_ring, ready, empty)
        sched = (COUNTS, E, M, N)
        out = (Y, stride_ym)
        scales = (SA, stride_sam, stride_sak, sa_rows, SB, stride_se, stride_sbn, stride_sbk)
        descs = (a_desc, w_desc)
        if CONSUMERS == 2:
            gl.warp_specialize(
                [
                    (_decode_consumer, (ring, sched, out, scales, K, 0, BR, GROUP_M, E_P2)),
                    (_decode_consumer, (ring, sched, out, scales, K, 1, BR, GROUP_M, E_P2)),
                    (_decode_producer, (descs, ring, sched, K, BR, GROUP_M, E_P2, TILED)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                    (_decode_consumer, (ring, sched, out, scales, K, 0, BR, GROUP_M, E_P2)),
                    (_decode_producer, (descs, ring, sched, K, BR, GROUP_M, E_P2, TILED)),
                ],
                [1],
                [PRODUCER_REGS],
            )


def decode_descriptor_blocks(cfg: DecodeConfig) -> dict:
    """Kernel argument -> (block shape, shared layout) of its TMA descriptor: the rows in [BR, 128] boxes, the
    weights in [64, 128] boxes (one per consumer); 128 e4m3 of K are one 128-byte swizzled row."""
    op = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    return {"a_desc": ([cfg.block_r, BK], op), "w_desc": ([WG_ROWS, BK], op)}


def grouped_fp8_decode_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    counts: torch.Tensor,
    config: DecodeConfig | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """y [M, N] bf16: expert e's rows of a (sorted by expert, counts [E] on a's device, never read on the host)
    times w[e]^T, both block-scaled; the operands of `fp8_wgmma_grouped.grouped_fp8_block_gemm`, on sm_90.
    Rows from sum(counts) to M are not written. Raises ValueError when K is not a multiple of 128 or the shapes
    disagree."""
    m, k = a.shape
    e, n = w.shape[:2]
    check_grouped_operands("grouped_fp8_decode_gemm", a, a_scale, w, w_scale, counts)
    cfg = config or default_decode_config(m, e)
    cfg.check()
    y = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)  # [M, N]
    if m == 0 or n == 0 or e == 0:
        return y
    a = a if a.stride(1) == 1 and a.stride(0) % 16 == 0 else a.contiguous()
    w = w.contiguous()
    sa = a_scale if a_scale.dtype == torch.float32 else a_scale.float()  # [>= M, KB], read by its strides
    ws = w_scale.float()
    blocks = decode_descriptor_blocks(cfg)
    a_desc = TensorDescriptor.from_tensor(a, *blocks["a_desc"])
    if tiled and n % WG_ROWS:
        raise ValueError(f"tiled weights need N a multiple of {WG_ROWS}, got {n}")
    w2d = w.view(-1, BK) if tiled else w.view(e * n, k)
    w_desc = TensorDescriptor.from_tensor(w2d, *blocks["w_desc"])
    bound = (-(-m // cfg.block_r) + min(e, m)) * -(-n // cfg.block_w)  # tiles, from the shapes alone
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (min(bound, sms * cfg.ctas),)
    maxnreg, consumer, producer = cfg.registers()
    fp8_wgmma_decode_kernel[grid](
        a_desc, w_desc, sa, y, ws, counts, y.stride(0), sa.stride(0), sa.stride(1), sa.shape[0],
        ws.stride(0), ws.stride(1), ws.stride(2), m, n, k, e,
        BR=cfg.block_r, STAGES=cfg.stages, CONSUMERS=cfg.consumers, GROUP_M=cfg.group_m,
        E_P2=max(32, 1 << (e - 1).bit_length()), CONSUMER_REGS=consumer, PRODUCER_REGS=producer, TILED=tiled,
        num_warps=4,
        maxnreg=maxnreg,
    )  # fmt: skip
    return y
