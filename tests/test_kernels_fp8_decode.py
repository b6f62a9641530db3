"""Decode-size FP8 GEMMs: activation quantization fused into the GEMM, the grouped kernels' in-kernel
tile map, and the dense small-M kernel, held to the two-kernel path (bit for bit) and to the reference.

CPU: under the Triton interpreter (subprocess), exactly representable FP8 inputs (see
tests/test_kernels_quant.py: the interpreter rounds to fp8 wrongly and has no bf16). GPU (`-m gpu`):
bf16 at the Qwen3-30B-A3B decode shapes, outputs poisoned with NaN first; bounds as in
test_kernels_quant.py (FP8 5e-3 against the reference).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from miles_core.kernels import fp8_gemm, w4a16_gemm
from miles_core.kernels.fp8_gemm import Fp8Config
from miles_core.kernels.w4a16_gemm import W4A16Config
from miles_core.quant import fp8_block_quantize, int4_group_quantize, pack_int4
from miles_core.quant.fp8 import tile_fp8_weights
from tests.test_kernels_quant import _exact_fp8_input, _poison, _rel, _run_interpreted

pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# ---- interpreter (CPU) -------------------------------------------------------------------------

# rows per expert: zero experts in the middle and at the end, an expert over one 16-row tile, M = 1,
# one expert holding every row; int64 (as the MoE's bincount gives) and int32
_COUNTS = [
    torch.tensor([3, 0, 17, 1, 0]),
    torch.tensor([0, 0, 1], dtype=torch.int32),
    torch.tensor([0, 33, 0, 0]),
]


def interp_grouped_fp8_fused() -> None:
    g = torch.Generator().manual_seed(20)
    cfgs = [Fp8Config(bm=16, bn=64), Fp8Config(bm=16, bn=128, swap=True), Fp8Config(bm=32, bn=32, swap=True)]
    shapes = [(256, 128, torch.float32), (200, 64, torch.float16), (384, 160, torch.float32)]  # K = 200: partial block
    for counts, (k, n, dtype) in zip(_COUNTS, shapes, strict=True):
        m, e = int(counts.sum()), counts.numel()
        wq, ws = fp8_block_quantize(torch.randn(e, n, k, generator=g))
        xs = _exact_fp8_input(m, k, g).to(dtype)
        ref = fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, ws, counts)
        for c in cfgs:
            args = (xs, wq, ws, counts, c.bm, c.bn)
            two = fp8_gemm.grouped_fp8_linear_triton(*args, swap=c.swap)
            fused = fp8_gemm.grouped_fp8_linear_triton(*args, swap=c.swap, fuse=True)
            prep = fp8_gemm.grouped_fp8_linear_triton(*args, swap=c.swap, fuse=True, prep=True)
            nfast = fp8_gemm.grouped_fp8_linear_triton(*args, swap=c.swap, nfast=True)  # grid axes swapped
            assert torch.equal(fused, two) and torch.equal(fused, prep) and torch.equal(nfast, two), (counts, c)
            assert _rel(fused, ref) < (1e-5 if dtype == torch.float32 else 1e-3), (counts, c, _rel(fused, ref))
            if k % 128 == 0 and n % 64 == 0:  # weights in 8 KB boxes: the same bits
                wt = tile_fp8_weights(wq)
                tiled = fp8_gemm.grouped_fp8_linear_triton(xs, wt, ws, counts, c.bm, c.bn, swap=c.swap, tiled=True)
                assert torch.equal(tiled, two), (counts, c)


def interp_dense_fp8_fused() -> None:
    g = torch.Generator().manual_seed(21)
    for m, n, k, cfg in [
        (1, 96, 256, Fp8Config(bm=16, bn=64, swap=True)),
        (5, 160, 200, Fp8Config(bm=16, bn=128, swap=True, split_k=2)),  # ragged N and K
        (33, 96, 640, Fp8Config(bm=16, bn=64, split_k=4)),  # 5 K blocks in splits of 2: the last is empty
        (20, 200, 384, Fp8Config(bm=32, bn=64, split_k=3)),
        (17, 64, 256, Fp8Config(bm=16, bn=32)),
    ]:
        x = _exact_fp8_input(m, k, g)
        wq, ws = fp8_block_quantize(torch.randn(n, k, generator=g))
        ref = fp8_gemm.fp8_linear_reference(x, wq, ws)
        fused = fp8_gemm.fp8_dense_triton(x, wq, ws, replace(cfg, fuse=True))
        two = fp8_gemm.fp8_dense_triton(x, wq, ws, replace(cfg, fuse=False))
        assert torch.equal(fused, two), (m, n, k, cfg)
        assert _rel(fused, ref) < 1e-5, (m, n, k, cfg, _rel(fused, ref))
        # two K blocks per loop iteration, and rows quantized before (as a norm that quantizes leaves them):
        # the same bits
        xq = fp8_gemm.fp8_act_quant_triton(x)
        assert torch.equal(fp8_gemm.fp8_dense_triton(x, wq, ws, replace(cfg, ku=2)), two), (m, n, k, cfg)
        assert torch.equal(fp8_gemm.fp8_dense_triton(xq[0], wq, ws, cfg, xq=xq, out_dtype=x.dtype), two)
        if cfg.split_k == 1 and not cfg.swap:  # the same tiles as the grouped kernel with one expert
            counts = torch.tensor([m])
            grouped = fp8_gemm.grouped_fp8_linear_triton(x, wq[None], ws[None], counts, cfg.bm, cfg.bn)
            assert torch.equal(fused, grouped), (m, n, k, cfg)


def interp_grouped_w4a16_tile_map() -> None:
    g = torch.Generator().manual_seed(22)
    for counts in _COUNTS:
        m, e = int(counts.sum()), counts.numel()
        xs = torch.randn(m, 96, generator=g)
        q, s = int4_group_quantize(torch.randn(e, 40, 96, generator=g), 32, torch.float32)
        p, s = pack_int4(q), w4a16_gemm.group_major(s)
        ref = w4a16_gemm.grouped_w4a16_linear_reference(xs, p, s, counts, 32)
        cfg = W4A16Config(bm=16, bn=32, bk=32, unpack=0)
        y = w4a16_gemm.grouped_w4a16_linear_triton(xs, p, s, counts, 32, cfg)
        y_prep = w4a16_gemm.grouped_w4a16_linear_triton(xs, p, s, counts, 32, cfg, prep=True)
        assert torch.equal(y, y_prep) and _rel(y, ref) < 1e-5, (counts, _rel(y, ref))


_INTERP = ["interp_grouped_fp8_fused", "interp_dense_fp8_fused", "interp_grouped_w4a16_tile_map"]


@pytest.mark.parametrize("check", _INTERP)
def test_fused_fp8_and_tile_map_match_two_kernel_path_in_interpreter(check):
    _run_interpreted(check, "tests.test_kernels_fp8_decode")


def test_dense_decode_configs_spread_the_weights_over_one_wave_of_programs():
    for m, n, k in [(64, 4096, 2048), (64, 2048, 4096), (64, 512, 2048), (1, 4096, 2048)]:
        c = fp8_gemm.dense_fp8_config(m, n, k)
        programs = -(-m // c.bm) * -(-n // c.bn) * c.split_k
        assert not c.fuse and 128 % c.bn == 0 and 64 <= programs <= 160, (m, n, k, c)  # fused: slower (H200)
        assert -(-k // 128) >= 2 * c.split_k, (m, n, k, c)  # every split has K blocks to pipeline
    # the fused grouped tiles are off (FUSED_QUANT_MAX_M = 0: slower on an H200); act-quant first, then
    # 16-row swapped tiles at decode sizes, 64 x 128 above
    decode, big = fp8_gemm.grouped_fp8_config(512, 128), fp8_gemm.grouped_fp8_config(8192, 128)
    assert not decode.fuse and decode.swap and decode.bm == 16 and big.bm == 64 and not big.swap
    assert not fp8_gemm.grouped_fp8_config(fp8_gemm.FUSED_QUANT_MAX_M + 1, 1024).fuse
    assert not fp8_gemm.grouped_fp8_config(512, 8).fuse  # 64 rows per expert: act-quant first


# ---- GPU ----------------------------------------------------------------------------------------


def _decode_counts(e: int, rows: int, g: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    counts = torch.bincount(torch.randint(0, e, (rows,), generator=g), minlength=e)
    counts[0], counts[1] = 0, counts[0] + counts[1]  # an expert with no rows
    return counts.to(dtype).cuda()


@cuda
@pytest.mark.gpu
def test_gpu_grouped_fp8_fused_is_bitwise_the_two_kernel_path_at_decode_shapes():
    g = torch.Generator().manual_seed(30)
    for (e, n, k, rows), dtype in zip(
        [(128, 1536, 2048, 512), (128, 2048, 768, 512), (128, 1536, 2048, 64), (8, 1536, 2048, 512)],
        [torch.int64, torch.int32, torch.int64, torch.int32],
        strict=True,
    ):
        counts = _decode_counts(e, rows, g, dtype)
        xs = torch.randn(rows, k, generator=g).bfloat16().cuda()
        wq, ws = fp8_block_quantize(torch.randn(e, n, k, device="cuda") * 0.05)
        ref = fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, ws, counts)
        cfg = replace(fp8_gemm.grouped_fp8_config(rows, e), fuse=True)  # 8 experts x 64 rows: not fused by default
        for c in (cfg, replace(cfg, bm=64, swap=False, num_warps=4, num_stages=3)):
            args = (xs, wq, ws, counts, c.bm, c.bn, c.num_warps, c.num_stages)
            _poison()
            fused = fp8_gemm.grouped_fp8_linear(*args, fuse=True, swap=c.swap)
            _poison()
            two = fp8_gemm.grouped_fp8_linear_triton(*args, fuse=False, swap=c.swap)
            _poison()
            prep = fp8_gemm.grouped_fp8_linear_triton(*args, fuse=False, swap=c.swap, prep=True)
            assert not fused.isnan().any() and torch.equal(fused, two) and torch.equal(two, prep), (e, n, k, c)
            assert _rel(fused, ref) < 5e-3, (e, n, k, c, _rel(fused, ref))


@cuda
@pytest.mark.gpu
def test_gpu_dense_fp8_small_m_is_bitwise_the_two_kernel_path_and_near_cublas():
    g = torch.Generator().manual_seed(31)
    shapes = [(64, 4096, 2048), (64, 2048, 4096), (64, 512, 2048), (1, 4096, 2048), (16, 2048, 4096)]
    shapes += [(5, 384, 512), (100, 1000, 896), (128, 256, 200)]  # ragged N, K; K off the 128 grid
    for m, n, k in shapes:
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        wq, ws = fp8_block_quantize(torch.randn(n, k, device="cuda") * 0.05)
        ref = fp8_gemm.fp8_linear_reference(x.float(), wq, ws)
        cfg = fp8_gemm.dense_fp8_config(m, n, k)
        _poison()
        y = fp8_gemm.fp8_linear(x, wq, ws)  # default backend: the fused kernel at these M
        _poison()
        two = fp8_gemm.fp8_dense_triton(x, wq, ws, replace(cfg, fuse=False))
        assert y.shape == (m, n) and not y.isnan().any() and torch.equal(y, two), (m, n, k, cfg)
        assert _rel(y, ref) < 5e-3, (m, n, k, _rel(y, ref))
        if n % 128 == 0 and k % 128 == 0:
            blas = fp8_gemm.fp8_linear(x, wq, ws, backend="cublas")
            assert _rel(y, blas) < 5e-3, (m, n, k, _rel(y, blas))


@cuda
@pytest.mark.gpu
def test_gpu_grouped_w4a16_tile_map_is_bitwise_the_prep_path():
    g = torch.Generator().manual_seed(32)
    for e, n, k, rows in [(128, 1536, 2048, 512), (128, 2048, 768, 512), (128, 1536, 2048, 64)]:
        counts = _decode_counts(e, rows, g)
        xs = torch.randn(rows, k, generator=g).bfloat16().cuda()
        q, s = int4_group_quantize(torch.randn(e, n, k, device="cuda") * 0.05, 128)
        p, s = pack_int4(q), w4a16_gemm.group_major(s)
        ref = w4a16_gemm.grouped_w4a16_linear_reference(xs.float(), p, s, counts, 128)
        cfg = W4A16Config(bm=16, bn=64, bk=128)  # grouped_w4a16_linear's decode tiles
        _poison()
        y = w4a16_gemm.grouped_w4a16_linear(xs, p, s, counts, 128)
        _poison()
        prep = w4a16_gemm.grouped_w4a16_linear_triton(xs, p, s, counts, 128, cfg, prep=True)
        assert not y.isnan().any() and torch.equal(y, prep) and _rel(y, ref) < 5e-3, (e, n, k, _rel(y, ref))


@cuda
@pytest.mark.gpu
def test_gpu_grouped_kernels_follow_counts_changed_between_cuda_graph_replays():
    # The tile map is read from `counts` on the device at every replay: new counts, same graph.
    g = torch.Generator().manual_seed(33)
    e, n, k, rows = 16, 256, 384, 40
    xs = torch.randn(rows, k, generator=g).bfloat16().cuda()
    wq, ws = fp8_block_quantize(torch.randn(e, n, k, device="cuda") * 0.05)
    q, s = int4_group_quantize(torch.randn(e, n, k, device="cuda") * 0.05, 128)
    p = pack_int4(q)
    counts = _decode_counts(e, rows, g)

    def step():
        return fp8_gemm.grouped_fp8_linear(xs, wq, ws, counts), w4a16_gemm.grouped_w4a16_linear(xs, p, s, counts, 128)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        counts.copy_(_decode_counts(e, rows, g))
        graph.replay()
        torch.cuda.synchronize()
        want = (
            fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, ws, counts),
            w4a16_gemm.grouped_w4a16_linear_reference(xs.float(), p, s, counts, 128),
        )
        for y, ref in zip(out, want, strict=True):
            assert _rel(y, ref) < 5e-3, _rel(y, ref)
