"""The decode-size grouped Gluon FP8 GEMM (`fp8_wgmma_decode.grouped_fp8_decode_gemm`: weights on wgmma's M side,
a few rows per expert on its N side) held to the grouped kernels' pure-torch reference.

CPU: every sweep config fits shared memory (per SM, with its CTAs) and bad tiles are refused; bad operands are
refused before a GPU is touched. Ahead of time, for sm_90: e4m3 wgmma m64n16k32 / m64n32k32 (4 per K block
and consumer), the rows and weights by 2-D TMA on mbarriers, 16-byte predicated stores, no spills.

GPU (`-m gpu`): ragged counts with empty experts and experts larger than a row tile, N a multiple of neither
the tile nor 128 (the weight slices past N read the next expert's rows: masked), one expert holding every row,
Qwen3-30B-A3B's expert shapes at the decode batches' 512 and 2,048 rows, and a CUDA graph replayed after the
device counts changed; the output poisoned first, bound 5e-3 as for the other FP8 kernels.
"""

from __future__ import annotations

import re

import pytest
import torch

from miles_core.kernels import fp8_wgmma_decode
from miles_core.kernels.fp8_wgmma_decode import DecodeConfig
from miles_core.quant.fp8 import tile_fp8_weights, untile_fp8_weights
from tests.test_kernels_fp8_wgmma import BOUND, _rel, cuda
from tests.test_kernels_fp8_wgmma_grouped import _operands, _reference, _routed, graph_follows_device_counts
from tests.test_kernels_quant import _poison, _resources

triton = pytest.importorskip("triton")


# ---- CPU ----------------------------------------------------------------------------------------------------


def test_decode_configs_fit_shared_memory_and_bad_tiles_are_refused():
    for cfg in fp8_wgmma_decode.decode_configs():
        cfg.check()
    bad_tiles = (DecodeConfig(3), DecodeConfig(block_r=64), DecodeConfig(2, 32, 12, ctas=1), DecodeConfig(2, 16, 4))
    for bad in bad_tiles:  # 3 consumers; 64 rows; 12 stages of 20 KB; 3 CTAs of 4 stages
        with pytest.raises(ValueError):
            bad.check()


def test_decode_gemm_rejects_bad_operands():
    e4m3 = torch.float8_e4m3fn
    a, counts = torch.zeros(4, 200, dtype=e4m3), torch.tensor([4, 0])
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_wgmma_decode.grouped_fp8_decode_gemm(
            a, torch.ones(4, 2), torch.zeros(2, 8, 200, dtype=e4m3), torch.ones(2, 1, 2), counts
        )
    a, w = torch.zeros(4, 256, dtype=e4m3), torch.zeros(2, 8, 256, dtype=e4m3)
    with pytest.raises(ValueError, match="counts"):
        fp8_wgmma_decode.grouped_fp8_decode_gemm(a, torch.ones(4, 2), w, torch.ones(2, 1, 2), torch.tensor([4, 0, 0]))
    with pytest.raises(ValueError, match="fit"):
        fp8_wgmma_decode.grouped_fp8_decode_gemm(a, torch.ones(4, 2), w, torch.ones(1, 1, 2), counts)
    with pytest.raises(ValueError, match="e4m3"):
        fp8_wgmma_decode.grouped_fp8_decode_gemm(a.float(), torch.ones(4, 2), w, torch.ones(2, 1, 2), counts)


def _compile(cfg: DecodeConfig, e_p2: int, counts: str, tiled: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = fp8_wgmma_decode.fp8_wgmma_decode_kernel
    blocks = fp8_wgmma_decode.decode_descriptor_blocks(cfg)
    types = {name: f"tensordesc<fp8e4nv{list(block)},{layout!r}>" for name, (block, layout) in blocks.items()}
    types |= {"SA": "*fp32", "Y": "*bf16", "SB": "*fp32", "COUNTS": counts}
    maxnreg, consumer, producer = cfg.registers()
    consts = {"BR": cfg.block_r, "STAGES": cfg.stages, "CONSUMERS": cfg.consumers, "GROUP_M": cfg.group_m}
    consts |= {"E_P2": e_p2, "CONSUMER_REGS": consumer, "PRODUCER_REGS": producer, "TILED": tiled}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    aligned = ("SA", "Y", "SB", "COUNTS", "stride_ym", "stride_se", "stride_sbn", "M", "N", "K", "E")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": 4, "num_stages": 1, "maxnreg": maxnreg}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


COMPILED = [(DecodeConfig(2, 16, 3, ctas=3), 256, "*i64"), (DecodeConfig(1, 16, 3, ctas=4), 128, "*i32")]
COMPILED += [(DecodeConfig(2, 32, 4, ctas=2), 256, "*i32")]


@pytest.mark.parametrize("cfg,e_p2,counts", COMPILED, ids=["2x16s3c3-E256-i64", "1x16s3c4-E128-i32", "2x32s4c2-E256"])
def test_decode_kernel_compiles_for_hopper_with_small_wgmma_tma_and_no_spills(cfg, e_p2, counts):
    kernel = _compile(cfg, e_p2, counts)
    ptx = kernel.asm["ptx"]
    wgmma = ptx.count(f"wgmma.mma_async.sync.aligned.m64n{cfg.block_r}k32.f32.e4m3.e4m3")
    assert wgmma == 8 * cfg.consumers, wgmma  # 4 k32 steps for the first K block, 4 in the loop
    assert "wgmma.mma_async.sync.aligned.m64n128k32" not in ptx
    assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx
    assert "mbarrier.try_wait.parity" in ptx and "mbarrier.arrive.expect_tx" in ptx
    stores = len(re.findall(r"@%p\d+ st\.global\.v4\.b32", ptx))  # 8 bf16 of a y row per thread, predicated
    assert stores == cfg.consumers * cfg.block_r // 16, stores
    res = _resources(kernel)
    assert "STACK:0" in res and "LOCAL:0" in res, res
    assert kernel.metadata.shared <= cfg.smem_bytes()


# ---- GPU ----------------------------------------------------------------------------------------------------


def _check(a, sa, w, ws, counts, cfg, case) -> torch.Tensor:
    ref = _reference(a, sa, w, ws, counts)
    _poison()
    y = fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa, w, ws, counts, config=cfg)
    assert y.shape == (a.shape[0], w.shape[1]) and y.dtype == torch.bfloat16, case
    assert not y.isnan().any(), case
    assert _rel(y, ref) < BOUND, (case, _rel(y, ref))
    return y


@cuda
@pytest.mark.gpu
def test_gpu_decode_gemm_matches_reference_on_ragged_counts_every_config():
    """Empty experts first, between and last; experts of 1-3 rows and of 16, 17, 33 and 70 rows (one past a row
    tile, several tiles); N = 640 (5 slices of 128), 200 (a slice past N and a partial scale block), 1004."""
    g = torch.Generator().manual_seed(1)
    counts = [0, 17, 1, 0, 16, 70, 0, 3, 33, 2, 0]
    for n, k in [(640, 512), (200, 128), (1004, 384)]:
        a, sa, w, ws, c = _operands(counts, n, k, g)
        for cfg in fp8_wgmma_decode.decode_configs():
            _check(a, sa, w, ws, c, cfg, (n, k, cfg))


@cuda
@pytest.mark.gpu
def test_gpu_decode_gemm_matches_reference_when_one_expert_holds_every_row():
    g = torch.Generator().manual_seed(2)
    for e, hot, rows in [(16, 7, 100), (16, 15, 77), (8, 0, 300)]:
        counts = [rows if i == hot else 0 for i in range(e)]
        a, sa, w, ws, c = _operands(counts, 640, 512, g)
        _check(a, sa, w, ws, c, None, (e, hot, rows))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [512, 2048])
@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768)], ids=["gate_up", "down"])
def test_gpu_decode_gemm_matches_reference_on_qwen3_30b_experts(rows, n, k):
    g = torch.Generator().manual_seed(3)
    a, sa, w, ws, c = _operands(_routed(128, rows, g), n, k, g)
    y = _check(a, sa, w, ws, c, None, (rows, n, k))
    # int64 counts (what the router's bincount gives) schedule the same tiles, and row-major scales (what the
    # SwiGLU's act-quant gives) are read in place: the same bits
    assert torch.equal(fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa, w, ws, c.long()), y)
    assert torch.equal(fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa.contiguous(), w, ws, c), y)


def test_tile_fp8_weights_is_a_permutation_into_8kb_boxes_and_untiles():
    w = torch.randint(-100, 100, (3, 192, 384), dtype=torch.int8).view(torch.float8_e4m3fn)
    t = tile_fp8_weights(w).view(torch.int8).view(-1, 128)
    wi = w.view(torch.int8)
    for e, n, kb in [(0, 0, 0), (1, 70, 2), (2, 191, 1), (2, 64, 0)]:
        row = ((e * 192 + n) // 64 * 3 + kb) * 64 + n % 64
        assert torch.equal(t[row], wi[e, n, kb * 128 : (kb + 1) * 128])
    assert torch.equal(untile_fp8_weights(tile_fp8_weights(w)).view(torch.int8), wi)
    with pytest.raises(ValueError, match="multiple of 64"):
        tile_fp8_weights(w[:, :100])


@cuda
@pytest.mark.gpu
def test_gpu_decode_gemm_on_tiled_weights_gives_the_same_bits():
    g = torch.Generator().manual_seed(5)
    for counts, n, k in [([0, 17, 1, 0, 16, 70, 0, 3], 640, 512), (_routed(128, 512, g), 1536, 2048)]:
        a, sa, w, ws, c = _operands(counts, n, k, g)
        wt = tile_fp8_weights(w)
        for cfg in fp8_wgmma_decode.decode_configs():
            y = fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa, w, ws, c, config=cfg)
            _poison()
            yt = fp8_wgmma_decode.grouped_fp8_decode_gemm(a, sa, wt, ws, c, config=cfg, tiled=True)
            assert torch.equal(yt, y), (n, k, cfg)


@cuda
@pytest.mark.gpu
def test_gpu_decode_gemm_in_a_cuda_graph_follows_the_device_counts_between_replays():
    graph_follows_device_counts(fp8_wgmma_decode.grouped_fp8_decode_gemm, 256)


@cuda
@pytest.mark.gpu
def test_gpu_fp8_experts_take_the_decode_gemm_from_batch_256_and_agree_with_triton(monkeypatch):
    """`fp8_gemm.grouped_fp8_experts` at 256 tokens x top-8 of Qwen3-30B-A3B's 128 experts (2,048 rows,
    DECODE_GLUON_MIN_M; one expert empty) runs both GEMMs on the decode kernel, as close to the fp32 reference
    chain as the Triton path (`kernels.FP8_GLUON` off); the norm's quantized token rows, gathered, give the same
    bits; one row below the threshold it is the Triton path, bit for bit."""
    from miles_core import kernels
    from miles_core.kernels import fp8_gemm, swiglu
    from miles_core.quant import fp8_block_quantize
    from tests.test_kernels_expert_fusion import _decode_plan

    g = torch.Generator().manual_seed(6)
    src, _, counts = _decode_plan(256, g)
    assert src.shape[0] == fp8_gemm.DECODE_GLUON_MIN_M
    x = (torch.randn(256, 2048, generator=g) * 3).bfloat16().cuda()
    w1, s1 = fp8_block_quantize(torch.randn(128, 1536, 2048, device="cuda") * 0.05)  # gate_up [E, 2I, H]
    w2, s2 = fp8_block_quantize(torch.randn(128, 2048, 768, device="cuda") * 0.05)  # down [E, H, I]
    calls = []
    real = fp8_wgmma_decode.grouped_fp8_decode_gemm
    monkeypatch.setattr(fp8_wgmma_decode, "grouped_fp8_decode_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.inference_mode():
        _poison()
        y = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        assert len(calls) == 2 and not fp8_gemm._GLUON_GROUPED_FAILED and not y.isnan().any()
        pre = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src, xq=fp8_gemm.fp8_act_quant(x))
        assert len(calls) == 4 and torch.equal(pre, y)
        monkeypatch.setattr(fp8_gemm, "DECODE_GLUON_MIN_M", src.shape[0] + 1)
        below = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        monkeypatch.setattr(kernels, "FP8_GLUON", False)
        triton_y = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        assert len(calls) == 4 and torch.equal(triton_y, below)
        h = fp8_gemm.grouped_fp8_linear_reference(x.index_select(0, src).float(), w1, s1, counts)
        ref = fp8_gemm.grouped_fp8_linear_reference(swiglu.torch_swiglu(h), w2, s2, counts)
    err, triton_err = _rel(y, ref), _rel(triton_y, ref)
    assert err < 2e-2 and err < 1.5 * triton_err + 2e-3, (err, triton_err)
