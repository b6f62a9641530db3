"""Quantized-GEMM kernels held to their pure-torch references.

CPU: each Triton kernel runs under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess so
that no other test sees interpreted kernels) on tiny shapes. The interpreter cannot do bf16 or
round to fp8 correctly (a value that rounds up to the next power of two comes out halved), so
there the GEMMs run in fp16/fp32 and the FP8 inputs are built exactly representable; the GPU
tests cover bf16 and rounding.

CPU, ahead of time: each kernel compiles for sm_90 (Triton's bundled ptxas), and the resource
report shows no register spills, 16-byte loads of the big operands and wgmma on the large tiles.

GPU (`-m gpu`): many random shapes against the CPU reference, outputs poisoned (the caching
allocator's free memory filled with 0xFF = NaN) before every run so that an unwritten element
fails. Bounds, as ||out - ref|| / ||ref||: act-quant bit-exact; W4A16 5e-3 (bf16 output rounding,
2^-9, on fp32 sums of exactly dequantized weights); FP8 GEMMs 5e-3 (same quantized operands as the
reference, fp32 accumulation, bf16 output).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from miles_core.kernels import fp8_gemm, w4a16_gemm
from miles_core.kernels.w4a16_gemm import W4A16Config
from miles_core.quant import fp8_act_quantize_reference, fp8_block_quantize, int4_group_quantize, pack_int4

triton = pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ---- interpreter (CPU) -------------------------------------------------------------------------


def _fix_interpreter_for_numpy2() -> None:
    # Triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them for
    # `range(n)`, which NumPy >= 2.4 refuses; index through the one element instead.
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _exact_fp8_input(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    # x whose 1x128 tiles quantize without rounding: e4m3 values times a power-of-two tile scale,
    # with one element of each tile at +-448 so that the tile's scale is exactly that power of two.
    q = torch.randn(m, k, generator=gen).clamp(-400, 400).to(torch.float8_e4m3fn).float()
    q[:, ::128] = 448.0
    tile_scale = torch.exp2(torch.randint(-8, 4, (m, -(-k // 128)), generator=gen).float())
    return q * tile_scale.repeat_interleave(128, 1)[:, :k]


def interp_act_quant() -> None:
    g = torch.Generator().manual_seed(1)
    for m, k, pad, col in [(5, 200, 4, True), (16, 128, 1, False), (33, 384, 4, True)]:
        x = _exact_fp8_input(m, k, g)
        rq, rs = fp8_act_quantize_reference(x)
        for tiles in (None, (32, 4, True), (16, 4, True)):  # the default, and the K-fast grid order
            q, s = fp8_gemm.fp8_act_quant_triton(x, pad, col, tiles=tiles)
            assert torch.equal(q[:m].float(), rq.float()) and torch.equal(s[:m], rs), (m, k, tiles)
            assert q.shape[0] % pad == 0 and torch.equal(q[m:].float(), torch.zeros(q.shape[0] - m, k))
            assert s.shape[1] == 1 or (s.stride(0) == 1) == col


def interp_w4a16() -> None:
    g = torch.Generator().manual_seed(2)
    for m, n, k, group, cfg in [
        (1, 96, 256, 64, W4A16Config(bm=16, bn=32, bk=64)),
        (3, 40, 200, 32, W4A16Config(bm=16, bn=32, bk=32, split_k=3)),
        (17, 64, 128, 128, W4A16Config(bm=16, bn=64, bk=64, split_k=2)),
        (5, 96, 256, 64, W4A16Config(bm=16, bn=32, bk=64, unpack=1)),
        (5, 96, 200, 64, W4A16Config(bm=16, bn=32, bk=64, split_k=2, unpack=2)),
        (1, 96, 256, 64, W4A16Config(bm=1, bn=32, bk=64, split_k=2, unpack=1)),
        (2, 40, 200, 32, W4A16Config(bm=1, bn=32, bk=32, unpack=2)),
        (2, 48, 640, 128, W4A16Config(bm=16, bn=16, bk=128, split_k=4)),  # splits past the end of K
        (1, 96, 256, 64, W4A16Config(bm=1, bn=32, bk=64, split_k=2, unpack=4)),  # magic + join
        (3, 40, 200, 32, W4A16Config(bm=16, bn=32, bk=32, split_k=3, unpack=4)),
        (2, 48, 640, 128, W4A16Config(bm=1, bn=16, bk=128, split_k=4, unpack=4)),
        (2, 48, 640, 64, W4A16Config(bm=1, bn=16, bk=256, split_k=2, unpack=4, prefetch=True)),  # 4 groups/step
        (1, 40, 200, 32, W4A16Config(bm=1, bn=32, bk=64, split_k=2, unpack=4, prefetch=True)),
        # wide-N GEMV tiles: 16 columns x a K step longer than K (masked), 4 warps; and a pipelined K loop
        (1, 40, 640, 128, W4A16Config(bm=1, bn=16, bk=1024, num_warps=4, num_stages=1, unpack=4)),
        (1, 40, 640, 32, W4A16Config(bm=1, bn=16, bk=128, num_warps=1, num_stages=3, unpack=4)),
        (5, 96, 256, 64, W4A16Config(bm=16, bn=32, bk=64, split_k=2, unpack=4, swap=True)),
        (17, 64, 200, 32, W4A16Config(bm=16, bn=32, bk=32, swap=True)),
    ]:
        x = torch.randn(m, k, generator=g)
        q, s = int4_group_quantize(torch.randn(n, k, generator=g), group, torch.float32)
        ref = w4a16_gemm.w4a16_linear_reference(x, pack_int4(q), s, group)
        for scales in (s, w4a16_gemm.group_major(s)):
            y = w4a16_gemm.w4a16_linear_triton(x, pack_int4(q), scales, group, cfg)
            assert _rel(y, ref) < 1e-5, (m, n, k, _rel(y, ref))
    # the kernels on `repack_tiles`' layout (one [bt, 16]-word block per column tile and group): the rows' bits
    from miles_core.kernels.w4a16_mma import repack_tiles

    for m, n, k, cfg, tiles in [
        (1, 96, 512, W4A16Config(bm=1, bn=32, bk=256, split_k=2, num_warps=1, unpack=4, prefetch=True), (32, 96)),
        (1, 48, 640, W4A16Config(bm=1, bn=16, bk=128, split_k=4, unpack=4), (16, 48)),  # splits past K's end
        (1, 40, 640, W4A16Config(bm=1, bn=16, bk=1024, num_warps=4, unpack=4), (8, 40)),  # a step longer than K
        (2, 64, 384, W4A16Config(bm=1, bn=16, bk=128, num_warps=1, num_stages=3, unpack=4), (16, 64)),
        # the tensor-core tiles (M > 1), each unpacking
        (17, 64, 384, W4A16Config(bm=16, bn=32, bk=128, split_k=2), (32, 64)),
        (5, 96, 256, W4A16Config(bm=16, bn=32, bk=128, unpack=4), (32,)),
        (20, 64, 640, W4A16Config(bm=16, bn=64, bk=128, split_k=4, unpack=0), (16, 64)),  # splits past K's end
        (17, 64, 256, W4A16Config(bm=16, bn=32, bk=128, swap=True), (64,)),
    ]:
        x = torch.randn(m, k, generator=g)
        q, s = int4_group_quantize(torch.randn(n, k, generator=g), 128, torch.float32)
        p, sg = pack_int4(q), w4a16_gemm.group_major(s)
        rows = w4a16_gemm.w4a16_linear_triton(x, p, sg, 128, cfg)
        assert _rel(rows, w4a16_gemm.w4a16_linear_reference(x, p, s, 128)) < 1e-5
        for bt in tiles:
            y = w4a16_gemm.w4a16_linear_triton(x, repack_tiles(p, bt), sg, 128, cfg)
            assert y.shape == rows.shape and torch.equal(y, rows), (m, n, k, cfg, bt)
    with pytest.raises(ValueError, match="unpack 0, 2 or 4"):
        w4a16_gemm.w4a16_linear_triton(x, repack_tiles(p, 16), sg, 128, W4A16Config(bm=16, bn=32, bk=128, unpack=1))
    with pytest.raises(ValueError, match="across groups"):  # the tensor-core kernel scales once per K step
        w4a16_gemm.w4a16_linear_triton(x, p, sg, 128, W4A16Config(bm=16, bn=32, bk=256))


def interp_int4_dequant() -> None:
    # the dequantize kernel (the > MAX_M rows' path): `dequantize_packed`'s bits, fp32, bf16-rounded (fp16
    # here: the interpreter has no bf16) and on repacked tiles, with N and K past the tile edges
    from miles_core.kernels.w4a16_mma import repack_tiles

    g = torch.Generator().manual_seed(19)
    for n, k, group, tiles in [(96, 640, 128, (32, 96)), (40, 300, 64, ()), (33, 1000, 32, ())]:
        q, s = int4_group_quantize(torch.randn(n, k, generator=g), group, torch.float32)
        p = pack_int4(q)
        for dtype in (torch.float32, torch.float16):
            want = w4a16_gemm.dequantize_packed(p, s, k, group, dtype)
            for sc in (s, w4a16_gemm.group_major(s)):
                got = w4a16_gemm.dequantize_packed_triton(p, sc, k, group, dtype)
                assert got.dtype == dtype and torch.equal(got, want), (n, k, group, dtype)
            for bt in tiles:
                got = w4a16_gemm.dequantize_packed_triton(repack_tiles(p, bt), s, k, group, dtype)
                assert torch.equal(got, want), (n, k, bt, dtype)
    p = pack_int4(torch.zeros(64, 256, dtype=torch.int8))
    with pytest.raises(ValueError, match="need group 128"):
        w4a16_gemm.dequantize_packed_triton(repack_tiles(p, 32), torch.ones(64, 8), 256, 32)


def interp_grouped() -> None:
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 17, 1, 0])
    m = int(counts.sum())
    xs = torch.randn(m, 96, generator=g)
    q, s = int4_group_quantize(torch.randn(5, 40, 96, generator=g), 32, torch.float32)
    ref = w4a16_gemm.grouped_w4a16_linear_reference(xs, pack_int4(q), s, counts, 32)
    for cfg in (W4A16Config(bm=16, bn=32, bk=32, unpack=0), W4A16Config(bm=16, bn=32, bk=32, unpack=4)):
        y = w4a16_gemm.grouped_w4a16_linear_triton(xs, pack_int4(q), w4a16_gemm.group_major(s), counts, 32, cfg)
        assert _rel(y, ref) < 1e-5, _rel(y, ref)
    xs = _exact_fp8_input(m, 256, g)
    wq, ws = fp8_block_quantize(torch.randn(5, 192, 256, generator=g))
    y = fp8_gemm.grouped_fp8_linear_triton(xs, wq, ws, counts, bm=16, bn=64)
    ref = fp8_gemm.grouped_fp8_linear_reference(xs, wq, ws, counts)
    assert _rel(y, ref) < 1e-5, _rel(y, ref)
    for k in (256, 384):  # two K blocks per iteration, with an even and an odd number of blocks: the same bits
        xs = _exact_fp8_input(m, k, g)
        wq, ws = fp8_block_quantize(torch.randn(5, 192, k, generator=g))
        y1 = fp8_gemm.grouped_fp8_linear_triton(xs, wq, ws, counts, bm=16, bn=64)
        y2 = fp8_gemm.grouped_fp8_linear_triton(xs, wq, ws, counts, bm=16, bn=64, ku=2)
        assert torch.equal(y1, y2) and _rel(y2, fp8_gemm.grouped_fp8_linear_reference(xs, wq, ws, counts)) < 1e-5
    # token rows quantized once, gathered by the kernel (src): the bits of gathering the quantized rows first
    tokens = _exact_fp8_input(7, 256, g)
    src = torch.randint(0, 7, (m,), generator=g)
    q, sq = fp8_act_quantize_reference(tokens)
    wq, ws = fp8_block_quantize(torch.randn(5, 192, 256, generator=g))
    want = fp8_gemm.grouped_fp8_linear_triton(
        q[src], wq, ws, counts, bm=16, bn=64, x_scale=sq[src], out_dtype=torch.float32
    )
    for ku in (1, 2):
        got = fp8_gemm.grouped_fp8_linear_triton(
            q, wq, ws, counts, bm=16, bn=64, x_scale=sq, out_dtype=torch.float32, src=src, ku=ku
        )
        assert torch.equal(got, want), ku
    assert _rel(want, fp8_gemm.grouped_fp8_linear_reference(tokens[src], wq, ws, counts)) < 1e-5
    # SwiGLU + act-quant in the gate_up epilogue (fp16: the interpreter has no bf16): the bits of the
    # GEMM's fp16 output then the swiglu-quant kernel, with the gather, swapped or not, one or two K blocks
    w1, s1 = fp8_block_quantize(torch.randn(5, 512, 256, generator=g))  # [E, 2I, K], I = 256
    gate_up = fp8_gemm.grouped_fp8_linear_triton(
        q[src], w1, s1, counts, bm=16, bn=128, x_scale=sq[src], out_dtype=torch.float16
    )
    want_q, want_s = fp8_gemm.swiglu_fp8_quant_triton(gate_up)
    for swap, ku in ((False, 1), (True, 2)):
        got_q, got_s = fp8_gemm.grouped_fp8_linear_triton(
            q, w1, s1, counts, bm=16, bn=128, x_scale=sq, out_dtype=torch.float16, src=src, swap=swap, ku=ku,
            swiglu_quant=True,
        )  # fmt: skip
        assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(got_s, want_s), swap


def _run_interpreted(check: str, module: str = "tests.test_kernels_quant") -> None:
    code = f"import {module} as t, tests.test_kernels_quant as q; q._fix_interpreter_for_numpy2(); t.{check}()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("check", ["interp_act_quant", "interp_w4a16", "interp_grouped", "interp_int4_dequant"])
def test_triton_kernels_match_reference_in_interpreter(check):
    _run_interpreted(check)


# ---- GPU ----------------------------------------------------------------------------------------


def _poison() -> None:
    # Fill the caching allocator's free blocks with 0xFF (NaN in fp32/bf16/e4m3) so that outputs
    # allocated next start as NaN: an element a kernel forgets to write fails the comparison.
    free = torch.cuda.mem_get_info()[0]
    buf = torch.empty(min(1 << 30, free // 4), dtype=torch.uint8, device="cuda")
    buf.fill_(0xFF)
    del buf


@cuda
@pytest.mark.gpu
def test_gpu_fp8_act_quant_bit_exact():
    g = torch.Generator().manual_seed(10)
    for m, k in [(1, 128), (3, 200), (64, 4096), (257, 1000), (4096, 7168)]:
        x = (torch.randn(m, k, generator=g) * 3).bfloat16()
        for pad, col in [(1, False), (4, True)]:
            rq, rs = fp8_act_quantize_reference(x)
            for tiles in (None, (64, 8, True), (32, 4, False)):  # the size's default and other tiles
                _poison()
                q, s = fp8_gemm.fp8_act_quant_triton(x.cuda(), pad, col, tiles=tiles)
                assert torch.equal(q[:m].cpu().float(), rq.float()) and torch.equal(s[:m].cpu(), rs), (m, k, tiles)
                assert not q.float().isnan().any() and not s.isnan().any()


@cuda
@pytest.mark.gpu
def test_gpu_fp8_linear_matches_reference():
    g = torch.Generator().manual_seed(11)
    for m, n, k in [(1, 256, 128), (5, 384, 512), (128, 1024, 896), (300, 2048, 4096), (1100, 4096, 2048)]:
        x = torch.randn(m, k, generator=g).bfloat16()
        wq, ws = fp8_block_quantize(torch.randn(n, k, generator=g) * 0.05)
        ref = fp8_gemm.fp8_linear_reference(x.float(), wq, ws)
        for backend in ("auto", "cublas", "triton"):
            _poison()
            y = fp8_gemm.fp8_linear(x.cuda(), wq.cuda(), ws.cuda(), backend=backend)
            assert y.shape == (m, n) and not y.isnan().any()
            assert _rel(y.cpu(), ref) < 5e-3, (backend, m, n, k, _rel(y.cpu(), ref))


@cuda
@pytest.mark.gpu
def test_gpu_fp8_linear_takes_the_gluon_gemm_on_large_gemms_and_the_switch_turns_it_off(monkeypatch):
    from miles_core import kernels
    from miles_core.kernels import fp8_wgmma

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon FP8 GEMM is sm_90 only")
    g = torch.Generator().manual_seed(16)
    m = 4100  # 33 x 16 = 528 output tiles of 128 x 256: the Gluon GEMM's range (GLUON_MIN_TILES)
    x = torch.randn(m, 256, generator=g).bfloat16().cuda()
    wq, ws = (t.cuda() for t in fp8_block_quantize(torch.randn(4096, 256, generator=g) * 0.05))
    a, sa = fp8_gemm.fp8_act_quant(x, pad_rows_to=4, col_major_scale=True)
    want = fp8_wgmma.fp8_block_gemm(a, sa, wq, ws)[:m]
    assert torch.equal(fp8_gemm.fp8_linear(x, wq, ws), want)  # 'auto': act-quant + the Gluon GEMM
    monkeypatch.setattr(kernels, "FP8_GLUON", False)
    _poison()
    y = fp8_gemm.fp8_linear(x, wq, ws)  # cuBLAS
    assert torch.equal(y, fp8_gemm.fp8_linear(x, wq, ws, backend="cublas"))
    assert (
        _rel(y, want) < 5e-3
        and _rel(want.cpu(), fp8_gemm.fp8_linear_reference(x.float().cpu(), wq.cpu(), ws.cpu())) < 5e-3
    )


@cuda
@pytest.mark.gpu
def test_gpu_w4a16_matches_reference_many_shapes_and_configs():
    g = torch.Generator().manual_seed(12)
    cfgs = [
        None,
        W4A16Config(bm=16, bn=32, bk=128, split_k=4),
        W4A16Config(bm=64, bn=128, bk=64, num_warps=8),
        W4A16Config(bm=1, bn=64, bk=128, split_k=2, num_warps=1, unpack=4),
        W4A16Config(bm=16, bn=64, bk=128, split_k=4, unpack=4),
        W4A16Config(bm=16, bn=64, bk=128, split_k=2, swap=True),
        W4A16Config(bm=1, bn=64, bk=256, split_k=4, num_warps=1, unpack=4, prefetch=True),
    ]
    for m, n, k, group in [
        (1, 4096, 4096, 128),
        (7, 1000, 1024, 128),
        (12, 4096, 1408, 128),
        (16, 14336, 512, 64),
        (64, 512, 1408, 128),
        (100, 768, 2048, 32),
        (256, 2048, 768, 128),
        (300, 256, 256, 128),
    ]:
        x = torch.randn(m, k, generator=g).bfloat16()
        q, s = int4_group_quantize(torch.randn(n, k, generator=g) * 0.05, group)
        p = pack_int4(q)
        ref = w4a16_gemm.w4a16_linear_reference(x.float(), p, s, group)
        for cfg, scales in itertools.product(cfgs, (s, w4a16_gemm.group_major(s))):
            _poison()
            y = w4a16_gemm.w4a16_linear(x.cuda(), p.cuda(), scales.cuda(), group, config=cfg)
            assert not y.isnan().any()
            assert _rel(y.cpu(), ref) < 5e-3, (m, n, k, group, cfg, _rel(y.cpu(), ref))


@cuda
@pytest.mark.gpu
def test_gpu_grouped_kernels_match_reference():
    g = torch.Generator().manual_seed(13)
    for e, n, k, total in [(4, 256, 128, 10), (8, 1536, 2048, 512), (128, 768, 2048, 4096), (16, 2048, 768, 3)]:
        counts = torch.multinomial(torch.rand(e, generator=g), total, replacement=True, generator=g)
        counts = torch.bincount(counts, minlength=e)
        counts[0] = 0  # an expert with no rows
        m = int(counts.sum())
        xs = torch.randn(m, k, generator=g).bfloat16()
        q, s = int4_group_quantize(torch.randn(e, n, k, generator=g) * 0.05, 128)
        p = pack_int4(q)
        ref = w4a16_gemm.grouped_w4a16_linear_reference(xs.float(), p, s, counts, 128)
        _poison()
        for scales in (s, w4a16_gemm.group_major(s)):
            y = w4a16_gemm.grouped_w4a16_linear(xs.cuda(), p.cuda(), scales.cuda(), counts.cuda(), 128)
            assert not y.isnan().any() and _rel(y.cpu(), ref) < 5e-3, ("int4", e, n, k, _rel(y.cpu(), ref))
        wq, ws = fp8_block_quantize(torch.randn(e, n, k, generator=g) * 0.05)
        ref = fp8_gemm.grouped_fp8_linear_reference(xs.float(), wq, ws, counts)
        _poison()
        y = fp8_gemm.grouped_fp8_linear(xs.cuda(), wq.cuda(), ws.cuda(), counts.cuda())
        assert not y.isnan().any() and _rel(y.cpu(), ref) < 5e-3, ("fp8", e, n, k, _rel(y.cpu(), ref))
        args = (xs.cuda(), wq.cuda(), ws.cuda(), counts.cuda())
        for tiles in (dict(bm=16, bn=128, swap=False), dict(bm=16, bn=64, swap=True)):  # decode-size candidates
            _poison()
            y = fp8_gemm.grouped_fp8_linear(*args, **tiles)
            assert not y.isnan().any() and _rel(y.cpu(), ref) < 5e-3, ("fp8", tiles, e, n, k, _rel(y.cpu(), ref))
        outs = []
        for nfast in (False, True):  # the prefill tiles, in both launch orders: the same bits
            _poison()
            outs.append(fp8_gemm.grouped_fp8_linear(*args, bm=128, bn=128, num_warps=8, nfast=nfast))
            assert _rel(outs[-1].cpu(), ref) < 5e-3, ("fp8 128x128", nfast, e, n, k, _rel(outs[-1].cpu(), ref))
        assert torch.equal(outs[0], outs[1]), ("nfast changed bits", e, n, k)
        for tiles in (dict(bm=16, bn=64, swap=True), dict(bm=64, bn=128, nfast=True)):  # two K blocks per step
            one = fp8_gemm.grouped_fp8_linear(*args, **tiles)
            _poison()
            two = fp8_gemm.grouped_fp8_linear(*args, **tiles, ku=2)
            assert torch.equal(one, two), ("ku=2 changed bits", tiles, e, n, k)


@cuda
@pytest.mark.gpu
def test_gpu_quantized_layers_match_cpu_layers():
    from miles_core.quant import Fp8Linear, Int4Linear

    lin = torch.nn.Linear(1024, 512)
    x = torch.randn(9, 1024).bfloat16()
    for layer in (Fp8Linear.from_linear(lin), Int4Linear.from_linear(lin, 128)):
        with torch.no_grad():
            ref = layer(x.float())
            y = layer.cuda()(x.cuda())
        assert _rel(y.cpu(), ref) < 5e-3, type(layer)


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ----------------------------------------


def _compile_sm90(fn, types: dict, consts: dict, num_warps: int = 4, num_stages: int = 3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    # pointers, strides and sizes divisible by 16, as the JIT specializes them on real shapes
    plain = ("EPS", "E", "M", "M_ALLOC", "kb_per_split", "COUNTS")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in consts and n not in plain}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def _resources(kernel) -> str:
    import shutil
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not shutil.which(tool):
        pytest.skip("no cuobjdump in the triton wheel")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout


_PTRS = {
    **{"X": "*bf16", "W": "*i32", "S": "*bf16", "P": "*fp32", "LOCKS": "*i32"},
    **{"TILE_END": "*i32", "ROW_START": "*i32", "COUNTS": "*i32", "SRC": "*i32"},
}


def _w4(**consts) -> dict:
    return {"GROUP": 128, "EVEN_K": True, "UNPACK": 2, "ASM": False, "SWAP": False, "BT": 0, **consts}


_FP8 = {
    **_PTRS,
    "SA": "*fp32",
    "B": "*fp8e4nv",
    "SB": "*fp32",
    "Y": "*bf16",
    "COUNTS": "*i64",
    "EPS": "fp32",
    "YS": "*fp32",
}


def _g8(**consts) -> dict:
    base = {"E_P2": 128, "BN": 128, "BK": 128, "EVEN_K": True, "PREP": False, "NFAST": False, "KU": 1}
    return {**base, "GATHER": False, "SWIGLU_DT": None, "TILED": False, **consts}


def _d8(**consts) -> dict:
    return {"BK": 128, "EVEN_K": True, **consts}


_SM90_CASES = [
    # (kernel name, pointer types, constexprs, num_warps or (num_warps, num_stages), expect wgmma)
    ("fp8_act_quant_kernel", {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "SRC": "*i32", "EPS": "fp32"},
     {"BM": 16, "BLOCK": 128, "GATHER": False, "KFAST": False}, 4, False),
    ("fp8_act_quant_kernel", {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "SRC": "*i64", "EPS": "fp32"},
     {"BM": 16, "BLOCK": 128, "GATHER": True, "KFAST": False}, 4, False),
    ("fp8_act_quant_kernel", {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "SRC": "*i32", "EPS": "fp32"},
     {"BM": 64, "BLOCK": 128, "GATHER": False, "KFAST": True}, 8, False),
    ("w4a16_kernel", {**_PTRS, "Y": "*bf16"}, _w4(BM=16, BN=64, BK=128, SPLIT_K=4), 4, False),
    ("w4a16_kernel", {**_PTRS, "Y": "*bf16"}, _w4(BM=128, BN=128, BK=64, SPLIT_K=1), 8, True),
    ("w4a16_kernel", {**_PTRS, "Y": "*bf16"}, _w4(BM=1, BN=64, BK=128, SPLIT_K=2, UNPACK=4, ASM=True), 1, False),
    ("w4a16_kernel", {**_PTRS, "Y": "*bf16"}, _w4(BM=16, BN=64, BK=128, SPLIT_K=4, SWAP=True), 4, True),
    ("w4a16_kernel", {**_PTRS, "Y": "*bf16"}, _w4(BM=64, BN=64, BK=128, SPLIT_K=1, UNPACK=4, ASM=True), 4, True),
    # on `w4a16_mma.repack_tiles`' layout
    ("w4a16_kernel", {**_PTRS, "Y": "*bf16"}, _w4(BM=64, BN=64, BK=128, SPLIT_K=1, UNPACK=4, ASM=True, BT=64), 4, True),
    ("w4a16_gemv_kernel", {**_PTRS, "Y": "*bf16"},
     {"GROUP": 128, "BN": 64, "BK": 256, "SPLIT_K": 2, "EVEN_K": True, "PREFETCH": True, "ASM": True, "STAGES": 1,
      "BT": 0}, 1, False),
    # the GEMV on `w4a16_mma.repack_tiles`' layout: still 16-byte loads (runs of 16 words), no spills
    ("w4a16_gemv_kernel", {**_PTRS, "Y": "*bf16"},
     {"GROUP": 128, "BN": 16, "BK": 2048, "SPLIT_K": 1, "EVEN_K": True, "PREFETCH": False, "ASM": True, "STAGES": 1,
      "BT": 32}, 4, False),
    # the GEMV tiles on repacked words that w4a16_linear picks for them (default_config(..., tiled=True))
    ("w4a16_gemv_kernel", {**_PTRS, "Y": "*bf16"},
     {"GROUP": 128, "BN": 32, "BK": 512, "SPLIT_K": 4, "EVEN_K": True, "PREFETCH": True, "ASM": True, "STAGES": 1,
      "BT": 32}, 2, False),
    # the dequantize above MAX_M rows, on either layout: 16-byte word loads and stores
    ("int4_dequant_kernel", {"W": "*i32", "S": "*bf16", "OUT": "*bf16"},
     {"GROUP": 128, "BN": 32, "BK": 256, "ASM": True, "EVEN_K": True, "BT": 64}, (4, 1), False),
    ("int4_dequant_kernel", {"W": "*i32", "S": "*bf16", "OUT": "*bf16"},
     {"GROUP": 128, "BN": 32, "BK": 256, "ASM": True, "EVEN_K": True, "BT": 0}, (4, 1), False),
    # the GEMV's K loop pipelined through shared memory (its own num_stages): cp.async copies
    ("w4a16_gemv_kernel", {**_PTRS, "Y": "*bf16"},
     {"GROUP": 128, "BN": 128, "BK": 256, "SPLIT_K": 2, "EVEN_K": True, "PREFETCH": False, "ASM": True, "STAGES": 4,
      "BT": 0}, 4, False),
    ("grouped_w4a16_kernel", {**_PTRS, "Y": "*bf16"},
     {"GROUP": 128, "E_P2": 128, "BM": 16, "BN": 64, "BK": 128, "EVEN_K": True, "UNPACK": 2, "ASM": False,
      "PREP": False}, 4, False),
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"}, _g8(BM=64, SWAP=False, QUANT=False), 4, True),
    # prefill: 128 x 128 tiles, a row tile's N tiles side by side
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"}, _g8(BM=128, SWAP=False, QUANT=False, NFAST=True), 8, True),
    # decode: activations quantized in the GEMM, weights on wgmma's M side (m64n16k32)
    ("grouped_fp8_kernel", {**_FP8, "A": "*bf16"}, _g8(BM=16, SWAP=True, QUANT=True), (4, 4), True),
    # 16-row tiles without the swap: mma.sync (m16n8k32 e4m3), as the bf16 grouped kernel's 16-row tiles
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"}, _g8(BM=16, BN=128, SWAP=False, QUANT=False), 4, False),
    ("grouped_fp8_kernel", {**_FP8, "A": "*bf16"}, _g8(BM=64, SWAP=False, QUANT=True), 4, True),
    # two K blocks per loop iteration (decode swapped tiles and prefill tiles)
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"}, _g8(BM=16, BN=64, SWAP=True, QUANT=False, KU=2), 4, True),
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"}, _g8(BM=64, SWAP=False, QUANT=False, NFAST=True, KU=2), 4, True),
    # the decode tiles reading token rows through SRC (rows quantized by the norm before the MoE)
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"}, _g8(BM=16, BN=64, SWAP=True, QUANT=False, GATHER=True), 4, True),
    # the decode tiles on `tile_fp8_weights`' 8 KB boxes
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv"},
     _g8(BM=16, BN=64, SWAP=True, QUANT=False, GATHER=True, TILED=True), 4, True),
    # gate_up with SwiGLU + act-quant in the epilogue (gate and up accumulators, fp8 output and scales)
    ("grouped_fp8_kernel", {**_FP8, "A": "*fp8e4nv", "Y": "*fp8e4nv", "YS": "*fp32"},
     _g8(BM=16, BN=128, SWAP=True, QUANT=False, GATHER=True, SWIGLU_DT=triton.language.bfloat16), 4, True),
    # dense_fp8_config's decode tiles (M <= 16 and M = 64) and the unfused large-M tiles
    ("fp8_dense_kernel", {**_FP8, "A": "*bf16"}, _d8(BM=16, BN=128, SPLIT_K=4, SWAP=True, QUANT=True), (4, 4), True),
    ("fp8_dense_kernel", {**_FP8, "A": "*bf16"}, _d8(BM=64, BN=128, SPLIT_K=4, SWAP=False, QUANT=True), (8, 4), True),
    ("fp8_dense_kernel", {**_FP8, "A": "*bf16"}, _d8(BM=64, BN=64, SPLIT_K=8, SWAP=False, QUANT=True), (8, 4), True),
    ("fp8_dense_kernel", {**_FP8, "A": "*fp8e4nv"}, _d8(BM=64, BN=128, SPLIT_K=1, SWAP=False, QUANT=False), 4, True),
]  # fmt: skip


@pytest.mark.parametrize("name,types,consts,num_warps,wgmma", _SM90_CASES)
def test_kernels_compile_for_hopper_without_spills_and_with_wide_loads(name, types, consts, num_warps, wgmma):
    from miles_core.kernels import quant_triton

    warps, stages = num_warps if isinstance(num_warps, tuple) else (num_warps, 3)
    kernel = _compile_sm90(getattr(quant_triton, name), types, consts, warps, stages)
    res = _resources(kernel)
    assert "STACK:0" in res and "LOCAL:0" in res, res  # no register spills
    ptx = kernel.asm["ptx"]
    assert "ld.global.v4" in ptx or "cp.async.cg.shared.global" in ptx  # 16-byte loads of the big operands
    assert ("wgmma.mma_async" in ptx) == wgmma  # Hopper tensor-core path for the large tiles


@cuda
@pytest.mark.gpu
def test_gpu_weight_update_reaches_quantized_layers_in_eager_calls_and_in_graphs_captured_before():
    """A weight update (`copy_weights_`, re-quantizing in place) on INT4 and FP8 dense layers after their
    kernels cached scale copies (INT4 group-major, FP8 cuBLAS layout at 256 rows): eager calls and a CUDA
    graph captured before the update give the bits of layers built from the new weights."""
    from miles_core.quant import Fp8Linear, Int4Linear
    from miles_core.rollout.weights import copy_weights_

    g = torch.Generator().manual_seed(17)
    int4 = Int4Linear.from_linear
    for make, rows in ((int4, 1), (int4, 16), (int4, 64), (int4, 200), (Fp8Linear.from_linear, 256)):
        old, new = (torch.nn.Linear(1024, 2048, bias=False) for _ in range(2))
        with torch.no_grad():
            new.weight.copy_(torch.randn(2048, 1024, generator=g) * 0.05)
        new = new.cuda()
        layer, fresh = make(old).cuda(), make(new)  # both updates quantize on the GPU
        x = torch.randn(rows, 1024, generator=g).bfloat16().cuda()
        with torch.no_grad():
            layer(x)  # the cached scale copies
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                layer(x)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                captured = layer(x)
            copy_weights_(torch.nn.ModuleDict({"p": layer}), {"p.weight": new.weight})
            want = fresh(x)
            assert torch.equal(layer(x), want), (make, rows)
            graph.replay()
            assert torch.equal(captured, want), (make, rows)


@cuda
@pytest.mark.gpu
def test_gpu_int4_dequant_kernel_gives_the_torch_dequantizations_bits():
    # the > MAX_M rows' dequantize + cuBLAS path: one Triton launch, the bits of `dequantize_packed`
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(20)
    for n, k, group in [(4096, 14336, 128), (1000, 3000, 64), (384, 1024, 128)]:
        q, s = int4_group_quantize(torch.randn(n, k, generator=g) * 0.05, group)
        p, s = pack_int4(q).cuda(), s.cuda()
        for dtype in (torch.bfloat16, torch.float32):
            want = w4a16_gemm.dequantize_packed(p, s, k, group, dtype)
            layouts = [p] + ([w4a16_mma.repack_tiles(p, 64)] if group == 128 and n % 64 == 0 else [])
            for packed in layouts:
                for sc in (s, w4a16_gemm.group_major(s)):
                    _poison()
                    got = w4a16_gemm.dequantize_packed_triton(packed, sc, k, group, dtype)
                    assert got.dtype == dtype and torch.equal(got, want), (n, k, group, dtype, packed.dim())


@cuda
@pytest.mark.gpu
def test_gpu_quantized_experts_match_cpu_experts():
    from miles_core.quant import QuantExperts

    class Experts(torch.nn.Module):  # the model core's stacked layout: gate_up [E, 2I, H], down [E, H, I]
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(8, 2 * 256, 512) * 0.05)
            self.down_proj = torch.nn.Parameter(torch.randn(8, 512, 256) * 0.05)
            self.act = torch.nn.functional.silu

    g = torch.Generator().manual_seed(14)
    x = torch.randn(37, 512, generator=g).bfloat16()
    experts = torch.randint(0, 8, (37, 2), generator=g)
    weights = torch.rand(37, 2, generator=g).bfloat16()
    # The CPU reference runs in the same dtype (bf16 between the two GEMMs). FP8 re-quantizes that
    # intermediate, so one bf16 ulp of difference can move a value by one e4m3 step (6%): the CPU
    # alone differs by 1.6% between fp32 and bf16 intermediates on these inputs (1.6% was also the
    # GPU's distance to the fp32 reference on the H100, 2026-11-23). Bounds: fp8 2.5e-2, int4 1e-2;
    # a wrong expert, scale or tile gives O(1).
    for fmt, bound in (("fp8", 2.5e-2), ("int4", 1e-2)):
        layer = QuantExperts.from_experts(Experts(), fmt)
        with torch.no_grad():
            ref = layer(x, weights, experts)
            _poison()
            y = layer.cuda()(x.cuda(), weights.cuda(), experts.cuda())
        assert not y.isnan().any() and _rel(y.cpu(), ref) < bound, (fmt, _rel(y.cpu(), ref))


def _compile_gluon(fn, consts: dict, types: dict, nw: int):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in consts and n != "M" and not sig[n].startswith("tensordesc")
    }
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": nw, "num_stages": 1})


_MMA_TYPES = {"X": "*bf16", "W": "*i32", "S": "*bf16", "Y": "*bf16", "P": "*fp32", "LOCKS": "*i32"}


def _compile_mma(bn: int, nw: int, split: int, bm: int = 16):
    from miles_core.kernels import w4a16_mma

    consts = {"BM": bm, "BN": bn, "SPLIT_K": split, "NW": nw}
    return _compile_gluon(w4a16_mma.w4a16_mma_kernel, consts, _MMA_TYPES, nw)


@pytest.mark.parametrize(
    "bn,nw,split,bm", [(64, 4, 4, 16), (128, 4, 1, 16), (32, 2, 8, 16), (64, 2, 4, 16), (64, 1, 4, 16),
                       (64, 2, 4, 32), (64, 4, 2, 64)]
)  # fmt: skip
def test_w4a16_mma_kernel_keeps_both_operands_in_registers(bn, nw, split, bm):
    """The Gluon tensor-core W4A16 kernel compiles for sm_90 (its two `assert_trivial` layout conversions hold:
    x and the dequantized weights reach the MMA by register renaming), with mma.sync and 16-byte loads, no
    shared-memory round trip for the operands, and no spills; also with 32 and 64 rows per program."""
    kernel = _compile_mma(bn, nw, split, bm)
    ptx = kernel.asm["ptx"]
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ptx
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx
    assert "stmatrix" not in ptx and "ldmatrix" not in ptx  # no operand goes through shared memory; only the
    # split-K epilogue's arrival count is broadcast through it (one store, one load, two barriers)
    assert ptx.count("st.shared") <= (split > 1) and ptx.count("ld.shared") <= (split > 1)
    assert ptx.count("bar.sync") <= 2 * (split > 1)
    res = _resources(kernel)
    assert "STACK:0" in res and "LOCAL:0" in res, res


def test_repack_tiles_is_a_permutation_of_the_words_by_column_tile_and_group():
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(15)
    packed = torch.randint(-(2**31), 2**31 - 1, (96, 48), generator=g, dtype=torch.int32)  # N 96, K 384
    for bn in (32, 96):
        t = w4a16_mma.repack_tiles(packed, bn)
        assert t.shape == (96 // bn, 3, bn, 16) and t.is_contiguous()
        i, gr, j, w = (torch.arange(d) for d in t.shape)
        rows = (i[:, None, None, None] * bn + j[None, None, :, None]).expand(t.shape)
        words = (gr[None, :, None, None] * 16 + w[None, None, None, :]).expand(t.shape)
        assert torch.equal(t, packed[rows, words]), bn
    with pytest.raises(ValueError, match="multiple of bn=64"):
        w4a16_mma.repack_tiles(packed, 64)
    for bn in (32, 96):
        assert torch.equal(w4a16_mma.unpack_tiles(w4a16_mma.repack_tiles(packed, bn)), packed), bn


def test_w4a16_linear_on_repacked_tiles_gives_the_rows_layouts_bits_on_the_cpu():
    # the CPU path (and any fallback to the reference or to cuBLAS) reads the tiles through `unpack_tiles`
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(17)
    q, s = int4_group_quantize(torch.randn(96, 384, generator=g), 128)
    p = pack_int4(q)
    for x in (torch.randn(3, 384, generator=g), torch.randn(2, 5, 384, generator=g).bfloat16()):
        want = w4a16_gemm.w4a16_linear(x, p, s, 128)
        got = w4a16_gemm.w4a16_linear(x, w4a16_mma.repack_tiles(p, 32), s, 128)
        assert got.shape == want.shape == (*x.shape[:-1], 96) and torch.equal(got, want)


@cuda
@pytest.mark.gpu
def test_gpu_w4a16_mma_on_repacked_tiles_gives_the_rows_layouts_bits():
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(16)
    for m, n, k in [(1, 4096, 4096), (16, 1024, 1024), (27, 512, 2048)]:
        x = torch.randn(m, k, generator=g).bfloat16().cuda()
        q, s = int4_group_quantize(torch.randn(n, k, generator=g) * 0.05, 128)
        p, sg = pack_int4(q).cuda(), w4a16_gemm.group_major(s).cuda()
        for bn, nw, split in [(64, 4, None), (128, 2, 1), (64, 1, 4)]:
            want = w4a16_mma.w4a16_mma(x, p, sg, bn, nw, split_k=split)
            _poison()
            got = w4a16_mma.w4a16_mma(x, w4a16_mma.repack_tiles(p, bn), sg, bn, nw, split_k=split)
            assert not got.isnan().any() and torch.equal(got, want), (m, n, k, bn, nw, split)
        with pytest.raises(ValueError, match="repacked for bn=64"):
            w4a16_mma.w4a16_mma(x, w4a16_mma.repack_tiles(p, 64), sg, 128, 4)


@cuda
@pytest.mark.gpu
def test_gpu_w4a16_linear_on_repacked_tiles_gives_the_rows_layouts_bits_at_every_row_count():
    # one repacked copy serves the GEMV (1 row), the tensor-core kernel (2-32) and the Triton kernel (33-256)
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(18)
    for n, k in [(512, 2048), (4096, 1024)]:
        q, s = int4_group_quantize(torch.randn(n, k, generator=g) * 0.05, 128)
        p, sg = pack_int4(q).cuda(), w4a16_gemm.group_major(s).cuda()
        tiles = {bt: w4a16_mma.repack_tiles(p, bt) for bt in (32, 64)}
        for m in (1, 2, 9, 16, 27, 32, 33, 64, 100, 256, 300):
            x = torch.randn(m, k, generator=g).bfloat16().cuda()
            want = w4a16_gemm.w4a16_linear(x, p, sg, 128)
            assert _rel(want, w4a16_gemm.w4a16_linear_reference(x, p, sg, 128)) < 2e-2, (n, k, m)
            for bt, t in tiles.items():
                _poison()
                got = w4a16_gemm.w4a16_linear(x, t, sg, 128)
                assert not got.isnan().any() and torch.equal(got, want), (n, k, m, bt)


@cuda
@pytest.mark.gpu
def test_gpu_w4a16_linear_picks_mma_at_2_to_32_rows_and_the_switch_turns_it_off(monkeypatch):
    from miles_core import kernels
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(14)
    q, s = int4_group_quantize(torch.randn(1536, 2048, generator=g) * 0.05, 128)
    p, sg = pack_int4(q).cuda(), w4a16_gemm.group_major(s).cuda()
    for m in (8, 27):
        x = torch.randn(m, 2048, generator=g).bfloat16().cuda()
        ref = w4a16_gemm.w4a16_linear_reference(x.float().cpu(), p.cpu(), s, 128)
        # the default path is the Gluon kernel with mma_config's tiles for the row count (same bits)
        want = w4a16_mma.w4a16_mma(x, p, sg, **w4a16_mma.mma_config(1536, 2048, m))
        assert torch.equal(w4a16_gemm.w4a16_linear(x, p, sg, 128), want), m
        with monkeypatch.context() as mp:
            mp.setattr(kernels, "W4A16_MMA", False)
            _poison()
            y = w4a16_gemm.w4a16_linear(x, p, sg, 128)
        triton_tiles = w4a16_gemm.default_config(m, 1536, 2048)
        assert torch.equal(y, w4a16_gemm.w4a16_linear_triton(x, p, sg, 128, triton_tiles)), m  # the Triton kernel
        assert not y.isnan().any() and _rel(y.cpu(), ref) < 5e-3, m


@cuda
@pytest.mark.gpu
def test_gpu_w4a16_mma_matches_reference():
    from miles_core.kernels import w4a16_mma

    g = torch.Generator().manual_seed(13)
    for m, n, k in [
        (1, 4096, 4096),
        (16, 1000, 1024),
        (3, 14336, 512),
        (9, 520, 2048),
        (24, 2048, 1024),
        (64, 520, 512),
    ]:
        x = torch.randn(m, k, generator=g).bfloat16()
        q, s = int4_group_quantize(torch.randn(n, k, generator=g) * 0.05, 128)
        p = pack_int4(q)
        ref = w4a16_gemm.w4a16_linear_reference(x.float(), p, s, 128)
        for bn, nw, split in [(64, 4, None), (128, 4, 1), (32, 2, 3), (256, 8, 2), (64, 2, 5), (64, 1, 4)]:
            _poison()
            sg = w4a16_gemm.group_major(s).cuda()
            y = w4a16_mma.w4a16_mma(x.cuda(), p.cuda(), sg, bn, nw, split_k=split)
            case = (m, n, k, bn, nw, split)
            assert not y.isnan().any(), case
            assert _rel(y.cpu(), ref) < 5e-3, (case, _rel(y.cpu(), ref))
