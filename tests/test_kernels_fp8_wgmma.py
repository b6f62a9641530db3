"""The Gluon FP8 block-scaled GEMM (miles_core/kernels/fp8_wgmma.py) held to its pure-torch reference.

CPU: the reference agrees with `fp8_linear_reference` (the FP8 recipe's definition), the wrapper rejects K not
a multiple of 128 before touching a GPU, and every sweep config fits shared memory.

CPU, ahead of time: every config of `configs()` compiles for sm_90 (Triton's bundled ptxas): e4m3 wgmma,
TMA bulk tensor copies on mbarriers, `setmaxnreg` per partition, no register spills, and the shared memory the
config budgets for.

GPU (`-m gpu`): random shapes (M, N not multiples of the tile, N not a multiple of 8, a single K block) and the
four large benchmark shapes against the reference computed on the GPU in fp32, outputs poisoned with NaN first.
Bound, as ||y - ref|| / ||ref||: 5e-3, as for the other FP8 GEMMs (tests/test_kernels_quant.py): the same
quantized operands as the reference, fp32 accumulation, bf16 output (2^-9 relative rounding, ~1.1e-3 RMS); a
wrong scale, tile or K block gives O(1).
"""

from __future__ import annotations

import re

import pytest
import torch

from miles_core.kernels import fp8_gemm, fp8_wgmma
from miles_core.kernels.fp8_wgmma import GemmConfig
from miles_core.quant import fp8_act_quantize_reference, fp8_block_quantize
from tests.test_kernels_quant import _poison, _resources  # NaN-filled free memory; cuobjdump's resource report

triton = pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BOUND = 5e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---- CPU ----------------------------------------------------------------------------------------------------


def test_reference_matches_the_fp8_linear_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 384, generator=g)
    wq, ws = fp8_block_quantize(torch.randn(200, 384, generator=g) * 0.05)
    a, sa = fp8_act_quantize_reference(x)
    y = fp8_wgmma.fp8_block_gemm_reference(a, sa, wq, ws, torch.float32)
    assert torch.allclose(y, fp8_gemm.fp8_linear_reference(x, wq, ws), rtol=1e-5, atol=1e-5)
    # the cuBLAS layouts (column-major activation scales, padded and transposed weight scales) give the same
    a4, sa4 = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
    y4 = fp8_wgmma.fp8_block_gemm_reference(a4[:37], sa4, wq, fp8_gemm.prepare_weight_scale(ws).t(), torch.float32)
    assert torch.equal(y4, y)


def test_fp8_block_gemm_rejects_k_not_a_multiple_of_128():
    a = torch.zeros(4, 200, dtype=torch.float8_e4m3fn)
    w = torch.zeros(8, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_wgmma.fp8_block_gemm(a, torch.ones(4, 2), w, torch.ones(1, 2))


def test_configs_fit_shared_memory_and_bad_tiles_are_refused():
    for cfg in fp8_wgmma.configs():
        cfg.check()
    for bad in (GemmConfig(192, 256, 2), GemmConfig(96, 128), GemmConfig(128, 128, 6), GemmConfig(128, 64)):
        with pytest.raises(ValueError):
            bad.check()


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ---------------------------------------------------


def _desc_type(dtype: str, block: list[int], layout) -> str:
    return f"tensordesc<{dtype}{list(block)},{layout!r}>"


def _compile(cfg: GemmConfig):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = fp8_wgmma.fp8_wgmma_kernel
    dtypes = {"a_desc": "fp8e4nv", "w_desc": "fp8e4nv", "sa_desc": "fp32", "c_desc": "bf16"}
    types = {name: _desc_type(dtypes[name], *spec) for name, spec in fp8_wgmma.descriptor_blocks(cfg).items()}
    types["SB"] = "*fp32"
    maxnreg, consumer, producer = cfg.registers()
    consts = {"BM": cfg.block_m, "STAGES": cfg.stages, "GROUP_M": cfg.group_m, "FENCE": cfg.fence}
    consts |= {"CONSUMER_REGS": consumer, "PRODUCER_REGS": producer}
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in ("SB", "K", "sa_stride")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": 4, "num_stages": 1, "maxnreg": maxnreg}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _label(c: GemmConfig) -> str:
    return f"{c.block_m}x{c.block_n}s{c.stages}g{c.group_m}{'' if c.fence else 'nf'}{'h' if c.epi_half else ''}"


@pytest.mark.parametrize("cfg", fp8_wgmma.configs(), ids=_label)
def test_kernel_compiles_for_hopper_with_wgmma_tma_and_no_spills(cfg):
    """Each sweep config compiles for sm_90: e4m3 wgmma (m64n128k32, 4 per K block and column half), A / W by
    2-D TMA and the activation scales by 1-D TMA on mbarriers, bf16 tiles out by TMA store, the partitions'
    register budgets set by setmaxnreg, no spills, and the shared memory `smem_bytes` budgets."""
    kernel = _compile(cfg)
    ptx = kernel.asm["ptx"]
    assert_pipeline(kernel, cfg)
    assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx  # the epilogue's TMA store
    stores = ptx.count("cp.async.bulk.tensor.2d.global.shared::cta")
    assert stores == cfg.consumers * (2 if cfg.epi_half and cfg.block_n == 256 else 1)  # one per half
    # proxy fences: one per epilogue store, plus one per K block's release unless `fence` is off
    fences = ptx.count("fence.proxy.async.shared::cta")
    assert fences == stores + (cfg.consumers if cfg.fence else 0), (fences, stores)


def assert_pipeline(kernel, cfg, sa_tma: bool = True) -> None:
    """What the dense and grouped kernels share: e4m3 wgmma m64n128k32 (4 per K block and column half in each
    consumer partition), A / W by 2-D TMA on mbarriers, setmaxnreg budgets (40 for the producer, `registers()`
    for worker consumers), no spills, shared memory within `smem_bytes`; the activation scales by 1-D TMA if
    `sa_tma` (the dense kernel), else by no 1-D TMA at all (the grouped kernel's consumers load them)."""
    ptx = kernel.asm["ptx"]
    wgmma = ptx.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3")
    assert wgmma == 4 * (cfg.block_n // 128) * cfg.consumers, wgmma
    assert "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx
    assert ("cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx) == sa_tma
    assert "mbarrier.try_wait.parity" in ptx and "mbarrier.arrive.expect_tx" in ptx
    regs = {int(r) for r in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+);", ptx)}
    assert 40 in regs and (cfg.consumers == 1 or cfg.registers()[1] in regs), regs  # producer, worker consumers
    res = _resources(kernel)
    assert "STACK:0" in res and "LOCAL:0" in res, res  # no register spills
    assert kernel.metadata.shared <= cfg.smem_bytes() <= fp8_wgmma.SMEM_BYTES


# ---- GPU ----------------------------------------------------------------------------------------------------


def _operands(m: int, n: int, k: int, g: torch.Generator):
    """bf16 activations through the real act-quant kernel (M padded to 4, column-major scales) and an e4m3
    weight with 128x128 scales, all on the GPU: (a [M4, K], sa [M4, K/128], w [N, K], ws [N/128, K/128])."""
    x = torch.randn(m, k, generator=g).bfloat16().cuda()
    wq, ws = fp8_block_quantize(torch.randn(n, k, generator=g).cuda() * 0.05)
    a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
    return a, sa, wq, ws


def _check(a, sa, w, ws, cfg, case) -> None:
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true fp32
    try:
        ref = fp8_wgmma.fp8_block_gemm_reference(a, sa, w, ws, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _poison()
    y = fp8_wgmma.fp8_block_gemm(a, sa, w, ws, config=cfg)
    assert y.shape == (a.shape[0], w.shape[0]) and y.dtype == torch.bfloat16, case
    assert not y.isnan().any(), case
    assert _rel(y, ref) < BOUND, (case, _rel(y, ref))


@cuda
@pytest.mark.gpu
def test_gpu_fp8_block_gemm_matches_reference_on_ragged_shapes_every_config():
    g = torch.Generator().manual_seed(1)
    shapes = [(200, 1000, 512), (1, 384, 128), (130, 260, 1024), (333, 1100, 896), (64, 1004, 256), (700, 520, 384)]
    for m, n, k in shapes:
        a, sa, w, ws = _operands(m, n, k, g)
        for cfg in fp8_wgmma.configs():
            _check(a, sa, w, ws, cfg, (m, n, k, cfg))


@cuda
@pytest.mark.gpu
def test_gpu_fp8_block_gemm_takes_the_cublas_scale_layouts_and_plain_ones():
    """The weight scales as `prepare_weight_scale` lays them out for cuBLAS (transposed view) and row-major
    activation scales without row padding (copied by the wrapper) give the same bits as the usual layouts."""
    g = torch.Generator().manual_seed(2)
    a, sa, w, ws = _operands(301, 640, 768, g)
    want = fp8_wgmma.fp8_block_gemm(a, sa, w, ws)
    got = fp8_wgmma.fp8_block_gemm(a[:301], sa[:301].contiguous(), w, fp8_gemm.prepare_weight_scale(ws).t())
    assert torch.equal(got, want[:301])


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(8192, 8192, 8192), (4096, 14336, 4096), (4096, 4096, 14336), (16384, 7168, 2048)])
def test_gpu_fp8_block_gemm_matches_reference_on_the_benchmark_shapes(m, n, k):
    g = torch.Generator().manual_seed(3)
    a, sa, w, ws = _operands(m, n, k, g)
    _check(a, sa, w, ws, None, (m, n, k))
