"""The grouped (MoE experts) Gluon FP8 GEMM (`fp8_wgmma_grouped.grouped_fp8_block_gemm`) held to its pure-torch
reference.

CPU: the reference agrees with `fp8_gemm.grouped_fp8_linear_reference` (the grouped FP8 recipe's definition,
which quantizes the activations itself), in either activation-scale layout; the wrapper rejects K not a
multiple of 128 and mismatched shapes before touching a GPU; every sweep config fits shared memory.

CPU, ahead of time: three configs (two consumers with either epilogue, one consumer) compile for sm_90 with
E up to 256 and int32 / int64 counts: e4m3 wgmma, TMA loads on mbarriers, masked register stores (no TMA
store: it would write the next expert's rows), `setmaxnreg`, no spills, the shared memory budgeted.

GPU (`-m gpu`): ragged counts with empty experts, one expert holding every row, E = 128 with Qwen3-30B-A3B's
expert shapes at 4,096 and 32,768 rows, E = 256, N not a multiple of the tile (nor of 8), each against the
reference in fp32 with the output poisoned by NaN first; and a CUDA graph replayed after the device counts
changed (the schedule is read from them in the kernel). Bound 5e-3 as for the dense kernel
(tests/test_kernels_fp8_wgmma.py): the same quantized operands, fp32 accumulation, bf16 output; a wrong
expert, scale or row gives O(1).
"""

from __future__ import annotations

import re

import pytest
import torch

from miles_core.kernels import fp8_gemm, fp8_wgmma_grouped
from miles_core.kernels.fp8_wgmma_grouped import GroupedConfig
from miles_core.quant import fp8_act_quantize_reference, fp8_block_quantize
from tests.test_kernels_fp8_wgmma import (  # the dense kernel's bound, error and GPU marker
    BOUND,
    _rel,
    assert_pipeline,
    cuda,
)
from tests.test_kernels_quant import _poison  # NaN-filled free memory; cuobjdump's resource report

triton = pytest.importorskip("triton")


# ---- CPU ----------------------------------------------------------------------------------------------------


def test_grouped_reference_matches_the_grouped_fp8_linear_definition():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 40, 1, 0, 17])  # empty experts between and at the end of the others
    m, n, k = int(counts.sum()), 200, 384
    x = torch.randn(m, k, generator=g)
    wq, ws = fp8_block_quantize(torch.randn(6, n, k, generator=g) * 0.05)  # [E, N, K], [E, 2, 3]
    a, sa = fp8_act_quantize_reference(x)
    y = fp8_wgmma_grouped.grouped_fp8_block_gemm_reference(a, sa, wq, ws, counts, torch.float32)
    want = fp8_gemm.grouped_fp8_linear_reference(x, wq, ws, counts)
    assert torch.allclose(y, want, rtol=1e-5, atol=1e-5)
    # the act-quant's column-major scales with rows padded to 4 (what the kernel reads in place) give the same
    a4, sa4 = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
    assert torch.equal(
        fp8_wgmma_grouped.grouped_fp8_block_gemm_reference(a4[:m], sa4, wq, ws, counts, torch.float32), y
    )
    # rows past sum(counts) are not any expert's: zeros
    pad = fp8_wgmma_grouped.grouped_fp8_block_gemm_reference(a4, sa4, wq, ws, counts, torch.float32)
    assert torch.equal(pad[:m], y) and not pad[m:].any()


def test_grouped_rejects_k_not_a_multiple_of_128_and_mismatched_shapes():
    e4m3 = torch.float8_e4m3fn
    a, counts = torch.zeros(4, 200, dtype=e4m3), torch.tensor([4, 0])
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_wgmma_grouped.grouped_fp8_block_gemm(
            a, torch.ones(4, 2), torch.zeros(2, 8, 200, dtype=e4m3), torch.ones(2, 1, 2), counts
        )
    a, w = torch.zeros(4, 256, dtype=e4m3), torch.zeros(2, 8, 256, dtype=e4m3)
    with pytest.raises(ValueError, match="w_scale"):  # the weight scales of one expert only
        fp8_wgmma_grouped.grouped_fp8_block_gemm(a, torch.ones(4, 2), w, torch.ones(2, 1, 1), counts)
    with pytest.raises(ValueError, match="counts"):  # counts for 3 experts
        fp8_wgmma_grouped.grouped_fp8_block_gemm(a, torch.ones(4, 2), w, torch.ones(2, 1, 2), torch.tensor([4, 0, 0]))
    with pytest.raises(ValueError, match="fit"):  # one expert's scale rows
        fp8_wgmma_grouped.grouped_fp8_block_gemm(a, torch.ones(4, 2), w, torch.ones(1, 1, 2), counts)


def test_grouped_configs_fit_shared_memory_and_bad_tiles_are_refused():
    for cfg in fp8_wgmma_grouped.grouped_configs():
        cfg.check()
    for bad in (GroupedConfig(192, 256), GroupedConfig(128, 256, 5), GroupedConfig(96, 128), GroupedConfig(128, 64)):
        with pytest.raises(ValueError):
            bad.check()


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ---------------------------------------------------


def _compile(cfg: GroupedConfig, e_p2: int, counts: str = "*i32", tiled: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = fp8_wgmma_grouped.fp8_wgmma_grouped_kernel
    dtypes = {"a_desc": "fp8e4nv", "w_desc": "fp8e4nv", "sa_desc": "fp32"}
    blocks = fp8_wgmma_grouped.grouped_descriptor_blocks(cfg)
    if tiled:  # `tile_fp8_weights`' layout: the weights in 64-row boxes
        blocks["w_desc"] = ([64, 128], blocks["w_desc"][1])
    types = {name: f"tensordesc<{dtypes[name]}{list(block)},{layout!r}>" for name, (block, layout) in blocks.items()}
    types |= {"SA": "*fp32", "Y": "*bf16", "SB": "*fp32", "COUNTS": counts}
    maxnreg, consumer, producer = cfg.registers()
    consts = {"BM": cfg.block_m, "STAGES": cfg.stages, "GROUP_M": cfg.group_m, "E_P2": e_p2, "FENCE": cfg.fence}
    consts |= {"COALESCE": cfg.coalesce, "CONSUMER_REGS": consumer, "PRODUCER_REGS": producer}
    consts |= {"TILED_BN": cfg.block_n if tiled else 0}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    # what the launcher specializes for the Qwen3-30B-A3B shapes (pointers and sizes divisible by 16)
    aligned = ("SA", "Y", "SB", "COUNTS", "stride_ym", "stride_se", "stride_sbn", "M", "N", "K", "E", "sa_stride")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": 4, "num_stages": 1, "maxnreg": maxnreg}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _label(c: GroupedConfig) -> str:
    return f"{c.block_m}x{c.block_n}s{c.stages}g{c.group_m}{'' if c.fence else 'nf'}{'c' if c.coalesce else ''}"


COMPILED = [
    (GroupedConfig(128, 256, 4, 8, coalesce=False), 256, "*i32"),
    (GroupedConfig(128, 256, 4, 8), 128, "*i64"),
    (GroupedConfig(64, 256, 5, 8), 32, "*i64"),
]


@pytest.mark.parametrize("cfg,e_p2,counts", COMPILED, ids=[f"{_label(c)}-E{e}-{t[1:]}" for c, e, t in COMPILED])
def test_grouped_kernel_compiles_for_hopper_with_wgmma_tma_masked_stores_and_no_spills(cfg, e_p2, counts):
    """e4m3 wgmma (m64n128k32, 4 per K block and column half in each consumer, whose copy for a dead 64-row half
    has none), A / W by 2-D TMA on mbarriers and the activation scales by the consumers' loads (no 1-D TMA),
    the output by predicated register stores and never by a TMA store, the partitions' register budgets set
    by setmaxnreg, no spills with E up to 256, and the shared memory `smem_bytes` budgets."""
    kernel = _compile(cfg, e_p2, counts)
    ptx = kernel.asm["ptx"]
    assert_pipeline(kernel, cfg, sa_tma=False)
    assert "cp.async.bulk.tensor.2d.global.shared::cta" not in ptx  # no TMA store
    store = r"@%p\d+ st\.global\.v4\.b32" if cfg.coalesce else r"@%p\d+ st\.global\.b32"  # 16 B rows / 4 B pairs
    stores = len(re.findall(store, ptx))
    assert stores == cfg.consumers * (cfg.block_n // 128) * (8 if cfg.coalesce else 32), stores  # all predicated


@pytest.mark.parametrize("cfg", [GroupedConfig(128, 256, 4, 8), GroupedConfig(64, 256, 3, 8)], ids=_label)
def test_grouped_kernel_on_tiled_weights_loads_64_row_boxes(cfg):
    """`tile_fp8_weights`' layout: a tile's weight rows come as block_n / 64 TMA loads of one 8 KB box each (the
    plain layout: one [block_n, 128] box), the rest of the pipeline unchanged and no spills."""
    plain, tiled = _compile(cfg, 128, "*i32").asm["ptx"], _compile(cfg, 128, "*i32", tiled=True)
    load = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
    assert tiled.asm["ptx"].count(load) == plain.count(load) + cfg.block_n // 64 - 1
    assert_pipeline(tiled, cfg, sa_tma=False)


# ---- GPU ----------------------------------------------------------------------------------------------------


def _operands(counts: list[int], n: int, k: int, g: torch.Generator):
    """Rows through the real act-quant kernel (column-major scales, rows padded to 4), an [E, N, K] e4m3 weight
    with its [E, N/128, K/128] scales, counts on the GPU: (a [M, K], sa [M4, K/128], w, ws, counts)."""
    m = sum(counts)
    x = torch.randn(m, k, generator=g).bfloat16().cuda()
    wq, ws = fp8_block_quantize(torch.randn(len(counts), n, k, generator=g).cuda() * 0.05)
    a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
    return a[:m], sa, wq, ws, torch.tensor(counts, dtype=torch.int32, device="cuda")


def _reference(a, sa, w, ws, counts) -> torch.Tensor:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true fp32
    try:
        return fp8_wgmma_grouped.grouped_fp8_block_gemm_reference(a, sa, w, ws, counts, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _check(a, sa, w, ws, counts, cfg, case) -> None:
    ref = _reference(a, sa, w, ws, counts)
    _poison()
    y = fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, w, ws, counts, config=cfg)
    assert y.shape == (a.shape[0], w.shape[1]) and y.dtype == torch.bfloat16, case
    assert not y.isnan().any(), case  # every row belongs to an expert: all written
    assert _rel(y, ref) < BOUND, (case, _rel(y, ref))


def _routed(e: int, rows: int, g: torch.Generator) -> list[int]:
    """Rows per expert of `rows` rows routed uniformly at random (as the benchmark routes them)."""
    return torch.bincount(torch.randint(0, e, (rows,), generator=g), minlength=e).tolist()


@cuda
@pytest.mark.gpu
def test_gpu_grouped_on_tiled_weights_gives_the_same_bits():
    from miles_core.quant.fp8 import tile_fp8_weights

    g = torch.Generator().manual_seed(9)
    for counts, n, k in [([0, 130, 1, 0, 64, 257, 0, 3], 640, 512), (_routed(128, 4096, g), 1536, 2048)]:
        a, sa, w, ws, c = _operands(counts, n, k, g)
        wt = tile_fp8_weights(w)
        for cfg in fp8_wgmma_grouped.grouped_configs():
            y = fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, w, ws, c, config=cfg)
            _poison()
            yt = fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, wt, ws, c, config=cfg, tiled=True)
            assert torch.equal(yt, y), (n, k, cfg)


@cuda
@pytest.mark.gpu
def test_gpu_grouped_matches_reference_on_ragged_counts_every_config():
    """Empty experts first, between and last; experts of 1-3 rows, of exactly a 64/128-row tile and one past
    it; N a multiple of neither tile (640, 200: one partial column tile) nor 8 (1004); one and several K blocks."""
    g = torch.Generator().manual_seed(1)
    counts = [0, 130, 1, 0, 64, 257, 0, 3, 128, 2, 0]
    for n, k in [(640, 512), (200, 128), (1004, 384)]:
        a, sa, w, ws, c = _operands(counts, n, k, g)
        for cfg in fp8_wgmma_grouped.grouped_configs():
            _check(a, sa, w, ws, c, cfg, (n, k, cfg))


@cuda
@pytest.mark.gpu
def test_gpu_grouped_matches_reference_when_one_expert_holds_every_row():
    """The first, a middle and the last expert; N = 640 is 2.5 column tiles, so the last expert's last column
    tile reads W rows past E * N (zeros from TMA, masked columns)."""
    g = torch.Generator().manual_seed(2)
    for e, hot, rows in [(16, 7, 1000), (16, 15, 777), (8, 0, 4096)]:
        counts = [rows if i == hot else 0 for i in range(e)]
        a, sa, w, ws, c = _operands(counts, 640, 512, g)
        _check(a, sa, w, ws, c, None, (e, hot, rows))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [4096, 32768])
@pytest.mark.parametrize("n,k", [(1536, 2048), (2048, 768)], ids=["gate_up", "down"])
def test_gpu_grouped_matches_reference_on_qwen3_30b_experts(rows, n, k):
    """E = 128 experts of Qwen3-30B-A3B (gate_up 1536 x 2048, down 2048 x 768), rows routed at random."""
    g = torch.Generator().manual_seed(3)
    a, sa, w, ws, c = _operands(_routed(128, rows, g), n, k, g)
    _check(a, sa, w, ws, c, None, (rows, n, k))


@cuda
@pytest.mark.gpu
def test_gpu_grouped_takes_256_experts_and_int64_counts():
    g = torch.Generator().manual_seed(4)
    counts = _routed(256, 3000, g)
    counts[:5] = [0, 0, 0, 0, 0]  # the first experts empty
    a, sa, w, ws, c = _operands(counts, 512, 256, g)
    _check(a, sa, w, ws, c, None, "E=256")
    y32 = fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, w, ws, c)
    assert torch.equal(fp8_wgmma_grouped.grouped_fp8_block_gemm(a, sa, w, ws, c.long()), y32)


@cuda
@pytest.mark.gpu
def test_gpu_grouped_in_a_cuda_graph_follows_the_device_counts_between_replays():
    """Captured once; the counts tensor is overwritten in place before each replay (the same rows, other
    experts): each replay's output is the reference for the counts it found on the device."""
    graph_follows_device_counts(fp8_wgmma_grouped.grouped_fp8_block_gemm, 2048)


def graph_follows_device_counts(gemm, m: int, e: int = 16, n: int = 768, k: int = 512) -> None:
    """`gemm` (a grouped GEMM taking (a, sa, w, ws, counts)) captured in a CUDA graph, replayed after the counts
    were overwritten with random, one-expert, skewed and even routings: each output against its reference."""
    g = torch.Generator().manual_seed(5)
    a, sa, w, ws, c = _operands(_routed(e, m, g), n, k, g)
    gemm(a, sa, w, ws, c)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemm(a, sa, w, ws, c)
    skewed = [m - 3 * (e - 1)] + [3] * (e - 1)
    for counts in (_routed(e, m, g), [0] * (e - 1) + [m], skewed, [m // e] * e):
        c.copy_(torch.tensor(counts, dtype=torch.int32))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(a, sa, w, ws, c)
        assert not y.isnan().any() and _rel(y, ref) < BOUND, (counts, _rel(y, ref))


@cuda
@pytest.mark.gpu
def test_gpu_fp8_experts_take_the_grouped_gluon_gemm_at_prefill_sizes_and_agree_with_triton(monkeypatch):
    """`fp8_gemm.grouped_fp8_experts` from GLUON_GROUPED_MIN_M rows (lowered here to keep the test small) runs both
    GEMMs on the grouped Gluon kernel (1,024 tokens x top-8 of Qwen3-30B-A3B's 128 experts, one expert empty),
    and below it the Triton kernel (the bits of the switch-off path): as close to the fp32 reference chain as the
    Triton path it replaces, and the norm's quantized token rows, gathered, give the same bits as quantizing the
    gathered rows."""
    from miles_core import kernels
    from miles_core.kernels import swiglu
    from tests.test_kernels_expert_fusion import _decode_plan

    g = torch.Generator().manual_seed(6)
    src, _, counts = _decode_plan(1024, g)  # 8,192 rows
    monkeypatch.setattr(fp8_gemm, "GLUON_GROUPED_MIN_M", src.shape[0])
    x = (torch.randn(1024, 2048, generator=g) * 3).bfloat16().cuda()
    w1, s1 = fp8_block_quantize(torch.randn(128, 1536, 2048, device="cuda") * 0.05)  # gate_up [E, 2I, H]
    w2, s2 = fp8_block_quantize(torch.randn(128, 2048, 768, device="cuda") * 0.05)  # down [E, H, I]
    calls = []
    real = fp8_wgmma_grouped.grouped_fp8_block_gemm
    monkeypatch.setattr(fp8_wgmma_grouped, "grouped_fp8_block_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.inference_mode():
        _poison()
        y = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        assert len(calls) == 2 and not fp8_gemm._GLUON_GROUPED_FAILED and not y.isnan().any()
        pre = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src, xq=fp8_gemm.fp8_act_quant(x))
        assert len(calls) == 4 and torch.equal(pre, y)
        monkeypatch.setattr(fp8_gemm, "GLUON_GROUPED_MIN_M", src.shape[0] + 1)
        monkeypatch.setattr(fp8_gemm, "DECODE_GLUON_MIN_M", src.shape[0] + 1)  # the decode kernel's range too
        below = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        assert len(calls) == 4  # one row below the threshold: the Triton kernel
        monkeypatch.setattr(kernels, "FP8_GLUON", False)
        triton_y = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        assert len(calls) == 4 and torch.equal(triton_y, below)
        h = fp8_gemm.grouped_fp8_linear_reference(x.index_select(0, src).float(), w1, s1, counts)
        ref = fp8_gemm.grouped_fp8_linear_reference(swiglu.torch_swiglu(h), w2, s2, counts)
    err, triton_err = _rel(y, ref), _rel(triton_y, ref)
    assert err < 2e-2 and err < 1.5 * triton_err + 2e-3, (err, triton_err)
