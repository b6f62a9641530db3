"""The MoE experts' launch fusions held bit for bit to the launches they replace.

- bf16 (`grouped_triton.grouped_linear_triton(..., src=, swiglu=)`): the row gather x[src] inside the
  grouped GEMM == index_select + the GEMM; the SwiGLU epilogue == the GEMM's [M, 2I] output + `swiglu`.
- FP8: `fp8_act_quant_triton(x, src=)` == act-quant of x[src]; `swiglu_fp8_quant_triton(y)` ==
  act-quant of swiglu(y); `grouped_fp8_experts` == index_select -> grouped FP8 -> swiglu -> grouped FP8.
- INT4: the row gather in `grouped_w4a16_kernel` == index_select + the kernel.

CPU: under the Triton interpreter (a subprocess), fp16 and fp32 (the interpreter has no bf16), ragged
counts with empty experts, K and I off the tile grid, every output allocated NaN-filled (an element a
kernel forgets to write fails `torch.equal`). The bf16 inputs make the GEMMs' fp32 sums exact (small
integers times 2^-6), so the interpreter's dot order cannot decide the bits, while gate and up are not
fp16-representable: rounding them before the epilogue matters, and the test checks that it does.
Also: the fused kernels compile for sm_90 without spills, on the same MMA as the unfused GEMM.

GPU (`-m gpu`): the same equalities in bf16 at the Qwen3-30B-A3B decode shapes (64 and 256 tokens,
top-8 of 128 experts, hidden 2048, expert hidden 768) with the caching allocator poisoned before each
run, and `Experts` / `QuantExperts` forward identical with `kernels.EXPERT_FUSION` on and off, eager and
replayed from a CUDA graph.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.test_kernels_quant import _compile_sm90, _poison, _rel, _resources, _run_interpreted

triton = pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# rows per expert: empty experts in the middle and at the end, an expert over one 16-row tile, one row
_COUNTS = [[3, 0, 17, 1, 0], [0, 0, 1], [0, 33, 0, 2]]


@contextlib.contextmanager
def _nan_outputs():
    """torch.empty returns NaN-filled tensors (integers: -1), so that an unwritten output element fails."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    torch.empty = poisoned
    try:
        yield
    finally:
        torch.empty = empty


def _plan(counts: list[int], tokens: int, g: torch.Generator):
    # (src [M] int64: token of each sorted row, repeats allowed, as top-k slots; counts [E])
    m = sum(counts)
    return torch.randint(0, tokens, (m,), generator=g), torch.tensor(counts)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# ---- interpreter (CPU) -------------------------------------------------------------------------


def interp_bf16_gather_swiglu() -> None:
    from miles_core.kernels.grouped_gemm import grouped_linear_reference
    from miles_core.kernels.grouped_triton import grouped_linear_triton
    from miles_core.kernels.swiglu import _SwiGLU, torch_swiglu

    g = torch.Generator().manual_seed(40)
    shapes = [(7, 40, 24), (5, 128, 32), (12, 200, 40)]  # (tokens, K, I): K and I off the tile grid
    sensitive = False
    for counts, (t, k, i), dtype in zip(_COUNTS, shapes, (torch.float16, torch.float32, torch.float16), strict=True):
        src, c = _plan(counts, t, g)
        e = c.numel()
        x = torch.randint(-8, 9, (t, k), generator=g).to(dtype)
        w = (torch.randint(-64, 65, (e, 2 * i, k), generator=g) / 64).to(dtype)  # exact fp32 sums
        xs = x.index_select(0, src)
        for bn, bk in ((64, 128), (16, 64)):  # SWIGLU_CONFIG's BN and BK, and small tiles
            fused_cfg = dict(BM=16, BN=bn, BK=bk, num_warps=4, num_stages=1)
            plain_cfg = dict(fused_cfg, BN=2 * bn)  # the unfused GEMM at the same weight bytes per program
            with _nan_outputs():
                gate_up = grouped_linear_triton(xs, w, c, plain_cfg)  # [M, 2I]
                gathered = grouped_linear_triton(x, w, c, plain_cfg, src=src)
                both = grouped_linear_triton(x, w, c, fused_cfg, src=src, swiglu=True)  # [M, I]
                sorted_rows = grouped_linear_triton(xs, w, c, fused_cfg, swiglu=True)
            want = _SwiGLU.apply(gate_up)
            assert _same(gathered, gate_up), (counts, bn, bk)
            assert _same(both, want) and _same(sorted_rows, want), (counts, bn, bk)
        ref = grouped_linear_reference(xs.float(), w.float(), c)  # exact
        assert torch.equal(gate_up, ref.to(dtype)), counts
        assert _rel(both, torch_swiglu(ref)) < (1e-3 if dtype == torch.float16 else 1e-6), counts
        # the inputs tell the roundings apart: SwiGLU of the unrounded fp32 gate and up differs from
        # SwiGLU of the rounded ones, so an epilogue that skipped the rounding would fail above
        sensitive |= not torch.equal(torch_swiglu(ref).to(dtype), torch_swiglu(ref.to(dtype).float()).to(dtype))
    assert sensitive
    with _nan_outputs():  # no rows at all
        empty = grouped_linear_triton(x, w, torch.zeros(e, dtype=torch.long), src=src[:0], swiglu=True)
    assert empty.shape == (0, w.shape[1] // 2)


def interp_quant_gather_swiglu() -> None:
    from miles_core.kernels import fp8_gemm, w4a16_gemm
    from miles_core.kernels.swiglu import _SwiGLU
    from miles_core.kernels.w4a16_gemm import W4A16Config
    from miles_core.quant import fp8_act_quantize_reference, fp8_block_quantize, int4_group_quantize, pack_int4
    from tests.test_kernels_quant import _exact_fp8_input

    g = torch.Generator().manual_seed(41)
    # act-quant of gathered rows: bits of act-quant of the index_select, and of the reference (exact inputs)
    for t, k, pad, col in [(9, 200, 4, True), (20, 384, 1, False)]:
        x = _exact_fp8_input(t, k, g)
        src = torch.randint(0, t, (2 * t + 1,), generator=g)
        with _nan_outputs():
            q, s = fp8_gemm.fp8_act_quant_triton(x, pad, col, src=src)
            q0, s0 = fp8_gemm.fp8_act_quant_triton(x.index_select(0, src), pad, col)
        rq, rs = fp8_act_quantize_reference(x.index_select(0, src))
        assert _same(q, q0) and _same(s, s0) and s.stride() == s0.stride(), (t, k, pad, col)
        assert torch.equal(q[: src.numel()].float(), rq.float()) and torch.equal(s[: src.numel()], rs), (t, k)
    # SwiGLU + act-quant: bits of swiglu then act-quant; rows off the 16-row tile, I off the 128 block
    for m, i, dtype in [(37, 200, torch.float16), (16, 128, torch.float32), (0, 128, torch.float16)]:
        y = (torch.randn(m, 2 * i, generator=g) * 4).to(dtype)
        with _nan_outputs():
            q, s = fp8_gemm.swiglu_fp8_quant_triton(y)
            q0, s0 = fp8_gemm.fp8_act_quant_triton(_SwiGLU.apply(y))
        assert _same(q, q0) and _same(s, s0), (m, i, dtype)
    # the FP8 expert MLP in four launches == index_select -> grouped FP8 -> swiglu -> grouped FP8
    for counts, dtype in zip(_COUNTS, (torch.float16, torch.float32, torch.float16), strict=True):
        t, h, i = 11, 128, 64  # the down GEMM's K = 64: half a scale block
        src, c = _plan(counts, t, g)
        e = c.numel()
        x = (torch.randn(t, h, generator=g) * 2).to(dtype)
        w1, s1 = fp8_block_quantize(torch.randn(e, 2 * i, h, generator=g))
        w2, s2 = fp8_block_quantize(torch.randn(e, h, i, generator=g))
        cfg = fp8_gemm.grouped_fp8_config(src.numel(), e)
        tiles = dict(bm=cfg.bm, bn=cfg.bn, num_warps=cfg.num_warps, num_stages=cfg.num_stages, swap=cfg.swap)
        with _nan_outputs():
            fused = fp8_gemm.grouped_fp8_experts(x, c, w1, s1, w2, s2, src)
            gate_up = fp8_gemm.grouped_fp8_linear_triton(x.index_select(0, src), w1, s1, c, **tiles)
            unfused = fp8_gemm.grouped_fp8_linear_triton(_SwiGLU.apply(gate_up), w2, s2, c, **tiles)
        assert _same(fused, unfused) and not fused.isnan().any(), (counts, dtype)
    # INT4: the gather in the grouped kernel
    for counts, unpack in zip(_COUNTS[:2], (0, 4), strict=True):
        src, c = _plan(counts, 6, g)
        x = torch.randn(6, 96, generator=g)
        q, s = int4_group_quantize(torch.randn(c.numel(), 40, 96, generator=g), 32, torch.float32)
        p, s = pack_int4(q), w4a16_gemm.group_major(s)
        for cfg in (W4A16Config(bm=16, bn=32, bk=32, unpack=unpack),):
            with _nan_outputs():
                y = w4a16_gemm.grouped_w4a16_linear_triton(x, p, s, c, 32, cfg, src=src)
                y0 = w4a16_gemm.grouped_w4a16_linear_triton(x.index_select(0, src), p, s, c, 32, cfg)
            assert _same(y, y0), (counts, cfg)


@pytest.mark.parametrize("check", ["interp_bf16_gather_swiglu", "interp_quant_gather_swiglu"])
def test_fused_gather_and_swiglu_are_bitwise_the_unfused_launches_in_interpreter(check):
    _run_interpreted(check, "tests.test_kernels_expert_fusion")


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ----------------------------------------

_BF16 = {"X": "*bf16", "W": "*bf16", "Y": "*bf16", "COUNTS": "*i64", "SRC": "*i64"}


def _grouped(**consts) -> dict:
    return {"E_P2": 128, "BM": 16, "BK": 128, "EVEN_K": True, **consts}


def _bf16_kernel(consts: dict, warps: int = 4, stages: int = 3):
    from miles_core.kernels import grouped_triton

    return _compile_sm90(grouped_triton.grouped_kernel, _BF16, consts, warps, stages)


def _mma(ptx: str) -> set[str]:
    return {line.split()[0] for line in ptx.splitlines() if line.strip().startswith(("mma.", "wgmma.mma_async"))}


@pytest.mark.parametrize("bn", [32, 64, 128])
def test_bf16_swiglu_gather_kernel_compiles_for_hopper_on_the_unfused_mma_without_spills(bn):
    fused = _bf16_kernel(_grouped(BN=bn, GATHER=True, SWIGLU=True))
    plain = _bf16_kernel(_grouped(BN=128, GATHER=False, SWIGLU=False))
    res = _resources(fused)
    assert "STACK:0" in res and "LOCAL:0" in res, res
    ptx = fused.asm["ptx"]
    assert "ld.global.v4" in ptx or "cp.async.cg.shared.global" in ptx
    # the same MMA instruction as the unfused GEMM's (16-row tiles: mma.sync, not wgmma), so each
    # accumulator sums the same products in the same K order
    assert _mma(ptx) == _mma(plain.asm["ptx"]) and "wgmma" not in ptx, (_mma(ptx), _mma(plain.asm["ptx"]))


_QUANT_CASES = [
    ("fp8_act_quant_kernel", {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "SRC": "*i64", "EPS": "fp32"},
     {"BM": 16, "BLOCK": 128, "GATHER": True}),
    ("swiglu_fp8_quant_kernel", {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "EPS": "fp32"}, {"BM": 16, "BLOCK": 128}),
    ("grouped_w4a16_kernel", {"X": "*bf16", "W": "*i32", "S": "*bf16", "Y": "*bf16", "TILE_END": "*i32",
                              "ROW_START": "*i32", "COUNTS": "*i64", "SRC": "*i64"},
     {"GROUP": 128, "E_P2": 128, "BM": 16, "BN": 64, "BK": 128, "EVEN_K": True, "UNPACK": 2, "ASM": False,
      "PREP": False, "GATHER": True}),
]  # fmt: skip


@pytest.mark.parametrize("name,types,consts", _QUANT_CASES)
def test_quant_gather_and_swiglu_kernels_compile_for_hopper_without_spills(name, types, consts):
    from miles_core.kernels import quant_triton

    kernel = _compile_sm90(getattr(quant_triton, name), types, consts, 4, 3)
    res = _resources(kernel)
    assert "STACK:0" in res and "LOCAL:0" in res, res
    assert "ld.global.v4" in kernel.asm["ptx"] or "cp.async.cg.shared.global" in kernel.asm["ptx"]


# ---- GPU ----------------------------------------------------------------------------------------


def _decode_plan(tokens: int, g: torch.Generator, e: int = 128, k: int = 8):
    # top-k of random scores per token, one expert left without rows; the model's sort (stable argsort)
    from miles_core.kernels import moe_route

    scores = torch.rand(tokens, e, generator=g)
    scores[:, 5] = -1  # expert 5 gets no rows
    experts = scores.topk(k, dim=-1)[1].cuda()  # [T, k]
    return moe_route.sort_route_reference(experts, e)  # (src, inverse, counts)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 256])
def test_gpu_bf16_gather_and_swiglu_are_bitwise_the_unfused_launches(tokens):
    from miles_core.kernels.grouped_triton import grouped_linear_triton
    from miles_core.kernels.swiglu import swiglu

    g = torch.Generator().manual_seed(tokens)
    src, _, counts = _decode_plan(tokens, g)
    x = torch.randn(tokens, 2048, generator=g).bfloat16().cuda()
    w1 = (torch.randn(128, 1536, 2048, generator=g) * 0.02).bfloat16().cuda()  # gate_up [E, 2I, H]
    w2 = (torch.randn(128, 2048, 768, generator=g) * 0.02).bfloat16().cuda()  # down [E, H, I]
    with torch.inference_mode():
        xs = x.index_select(0, src)
        gate_up = grouped_linear_triton(xs, w1, counts)  # CONFIG
        want = swiglu(gate_up)
        for bn in (32, 64, 128):
            _poison()
            got = grouped_linear_triton(x, w1, counts, dict(BN=bn), src=src, swiglu=True)
            assert not got.isnan().any() and torch.equal(got, want), bn
        _poison()
        assert torch.equal(grouped_linear_triton(x, w1, counts, src=src), gate_up)
        h = torch.randn(tokens, 768, device="cuda").bfloat16()
        _poison()
        down = grouped_linear_triton(h, w2, counts, src=src)  # the gather on the other shape
        assert torch.equal(down, grouped_linear_triton(h.index_select(0, src), w2, counts))


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [64, 256])
def test_gpu_fp8_and_int4_gather_and_swiglu_quant_are_bitwise_the_unfused_launches(tokens, monkeypatch):
    from miles_core.kernels import fp8_gemm, w4a16_gemm
    from miles_core.kernels.swiglu import swiglu
    from miles_core.quant import fp8_block_quantize, int4_group_quantize, pack_int4

    g = torch.Generator().manual_seed(tokens + 1)
    src, _, counts = _decode_plan(tokens, g)
    x = (torch.randn(tokens, 2048, generator=g) * 3).bfloat16().cuda()
    w1, s1 = fp8_block_quantize(torch.randn(128, 1536, 2048, device="cuda") * 0.05)
    w2, s2 = fp8_block_quantize(torch.randn(128, 2048, 768, device="cuda") * 0.05)
    with torch.inference_mode():
        xs = x.index_select(0, src)
        _poison()
        q, s = fp8_gemm.fp8_act_quant_triton(x, src=src)
        q0, s0 = fp8_gemm.fp8_act_quant_triton(xs)
        assert _same(q, q0) and _same(s, s0)
        gate_up = fp8_gemm.grouped_fp8_linear(xs, w1, s1, counts)  # [M, 1536] bf16
        _poison()
        q, s = fp8_gemm.swiglu_fp8_quant_triton(gate_up)
        q0, s0 = fp8_gemm.fp8_act_quant_triton(swiglu(gate_up))
        assert _same(q, q0) and _same(s, s0)
        _poison()
        fused = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src)
        unfused = fp8_gemm.grouped_fp8_linear(swiglu(gate_up), w2, s2, counts)
        assert not fused.isnan().any() and torch.equal(fused, unfused)
        _poison()  # the token rows quantized once (as the norm before the MoE does), gathered by the GEMM
        pre = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src, xq=fp8_gemm.fp8_act_quant(x))
        assert torch.equal(pre, fused)
        monkeypatch.setattr(fp8_gemm, "SWIGLU_EPILOGUE", True)  # SwiGLU + act-quant in the gate_up epilogue
        for xq in (None, fp8_gemm.fp8_act_quant(x)):
            _poison()
            epilogue = fp8_gemm.grouped_fp8_experts(x, counts, w1, s1, w2, s2, src, xq=xq)
            assert torch.equal(epilogue, fused)
        monkeypatch.undo()
        qi, si = int4_group_quantize(torch.randn(128, 1536, 2048, device="cuda") * 0.05, 128)
        p, si = pack_int4(qi), w4a16_gemm.group_major(si)
        _poison()
        y = w4a16_gemm.grouped_w4a16_linear(x, p, si, counts, 128, src=src)
        assert not y.isnan().any() and torch.equal(y, w4a16_gemm.grouped_w4a16_linear(xs, p, si, counts, 128))


def _layers():
    # The model core's bf16 experts at the Qwen3-30B-A3B shape, and their FP8 and INT4 quantizations
    from miles_core.model.config import ModelConfig
    from miles_core.model.moe import Experts
    from miles_core.quant import QuantExperts
    from tests.tiny_models import qwen3_moe_config

    hf = qwen3_moe_config(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)
    experts = Experts(ModelConfig.from_hf(hf.to_dict())).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    quant = {fmt: QuantExperts.from_experts(experts, fmt) for fmt in ("fp8", "int4")}
    return {"bf16": experts.bfloat16(), **quant}


@cuda
@pytest.mark.gpu
def test_gpu_experts_forward_is_identical_with_expert_fusion_on_and_off():
    from miles_core import kernels

    g = torch.Generator().manual_seed(50)
    for name, layer in _layers().items():
        for tokens in (64, 256):
            x = torch.randn(tokens, 2048, generator=g).bfloat16().cuda()
            weights = torch.rand(tokens, 8, generator=g).bfloat16().cuda()
            experts = torch.rand(tokens, 128, generator=g).topk(8, dim=-1)[1].cuda()
            out = {}
            with torch.inference_mode():
                for on in (True, False):
                    with kernels.fusion(experts=on):
                        _poison()
                        out[on] = layer(x, weights, experts)
                old, kernels.DECODE_FUSION = kernels.DECODE_FUSION, False
                try:  # every decode kernel off: other GEMM kernels (e.g. CUTLASS), so close, not equal
                    _poison()
                    torch_path = layer(x, weights, experts)
                finally:
                    kernels.DECODE_FUSION = old
            assert not out[True].isnan().any() and torch.equal(out[True], out[False]), (name, tokens)
            bound = 2.5e-2 if name == "fp8" else 1e-2  # fp8: one bf16 ulp moves an e4m3 step (test_kernels_quant)
            assert _rel(out[True], torch_path) < bound, (name, tokens, _rel(out[True], torch_path))


@cuda
@pytest.mark.gpu
def test_gpu_fused_experts_replayed_from_a_cuda_graph_follow_new_tokens_and_routes():
    # src and counts are read on the device at each replay: new inputs, same graph, same bits as eager
    from miles_core import kernels

    g = torch.Generator().manual_seed(51)
    tokens = 64
    for name, layer in _layers().items():
        x = torch.randn(tokens, 2048, generator=g).bfloat16().cuda()
        weights = torch.rand(tokens, 8, generator=g).bfloat16().cuda()
        experts = torch.rand(tokens, 128, generator=g).topk(8, dim=-1)[1].cuda()
        with torch.inference_mode():
            layer(x, weights, experts)  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = layer(x, weights, experts)
            for _ in range(2):
                x.copy_(torch.randn(tokens, 2048, generator=g).bfloat16())
                experts.copy_(torch.rand(tokens, 128, generator=g).topk(8, dim=-1)[1])
                graph.replay()
                with kernels.fusion(experts=False):
                    want = layer(x, weights, experts)
                assert torch.equal(out, want), name


def test_fusion_switch_sets_the_flags_for_a_block_and_restores_them_after_an_error():
    from miles_core import kernels

    before = kernels.DECODE_FUSION, kernels.EXPERT_FUSION
    with pytest.raises(RuntimeError), kernels.fusion(decode=False, experts=not before[1]):
        assert (False, not before[1]) == (kernels.DECODE_FUSION, kernels.EXPERT_FUSION)
        raise RuntimeError("inside")
    assert before == (kernels.DECODE_FUSION, kernels.EXPERT_FUSION)
    with kernels.fusion(experts=False):  # an unset flag keeps its value
        assert before[0] == kernels.DECODE_FUSION and kernels.EXPERT_FUSION is False
