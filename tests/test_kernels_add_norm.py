"""The residual add + RMSNorm kernels (miles_core.kernels.add_norm) held to the ops they replace.

What is exact and what is bounded:
- s = x + r and s = x + combine(ys, inverse, weights) equal torch's sums BIT FOR BIT; for the
  combine that is x + `moe_combine.combine(...)` (the kernel the unfused path runs) and x + the
  pure-torch `combine_reference`, which does the same float32 ops in the same order.
- h is within ONE ULP of F.rms_norm(s) in bf16/fp16 (the float32 sum of squares is added in another
  order, so rstd may differ in its last bits); in fp32 those bits are the output's own precision:
  within 4 fp32 ulps in the interpreter, 8 on the GPU (torch's CUDA rstd is another approximation).
- Outputs start as NaN before every run (on the CPU `new_empty` is patched to fill NaN, on the GPU
  the caching allocator's free memory is), so an unwritten element fails.

CPU: the kernels under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess so that no other
test sees interpreted kernels) in bf16, fp16 and fp32, rows of H = 64, 200, 1000 and 7168 (not
all powers of two), k = 1, 3, 6, 8 slots, strided and 3-d inputs. The interpreter narrows float32
to bf16 by truncation; the subprocess patches in round-to-nearest-even (what the GPU and torch do)
so that bf16 can be compared bit for bit. Also under the interpreter: `forward_step` of a tiny
fp32 MoE model (GQA with qk-norm, a dense layer between MoE layers; and a variant with shared
experts and the sigmoid router) through the fused layer loop against the unfused one: logits
within 1e-5 of the largest |logit|, equal argmax, equal recorded experts. Ahead of time (CPU): the
kernels compile for sm_90 at H = 2048, 7168 and 16384 without register spills, and the combine sum
is contracted into FMAs exactly as in `moe_combine`'s kernel.

GPU (`-m gpu`, not run on this CPU machine): the kernels against torch on the device (bf16, fp16,
fp32; Qwen3-30B-A3B's decode shapes included), and `forward_step` / the CUDA-graph engine on tiny
random MoE models with `kernels.DECODE_FUSION` on vs off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miles_core.kernels import add_norm as an
from tests.test_kernels_quant import _run_interpreted
from tests.test_kernels_rope_cache import _same_bits, _ulps

triton = pytest.importorskip("triton")

EPS = 1e-6
NORM_SHAPES = [(5, 64), (3, 200), (2, 3, 1000), (2, 7168)]  # x: [..., H]
COMBINE_SHAPES = [(5, 64, 1), (4, 200, 3), (3, 1000, 8), (2, 7168, 6)]  # (tokens, H, k)


def _h_bound(dtype: torch.dtype, gpu: bool) -> int:
    """ulps between the kernel's normed rows and F.rms_norm's (see the module docstring)."""
    return (8 if gpu else 4) if dtype == torch.float32 else 1


def _norm_case(shape, dtype, device, seed: int):
    """x [..., H]; r the same shape as a strided view (rows further apart than H); weight [H]."""
    g = torch.Generator().manual_seed(seed)
    h = shape[-1]
    x = torch.randn(*shape, generator=g) * 3
    x[..., 0, :] *= 40  # a row of large values (in 3-d: a whole position)
    r = torch.randn(*shape[:-1], h + 8, generator=g)[..., :h]
    w = torch.rand(h, generator=g) * 1.5 + 0.25
    return x.to(device, dtype), r.to(device, dtype), w.to(device, dtype)


def _combine_case(n, h, k, dtype, device, seed: int):
    """ys [N*k, H] (sorted rows), inverse [N*k] (a permutation), weights [N, k] (fp32 when k = 6, as a
    router may give them), x [N, H] (or [N, 1, H] when k = 3), weight [H]."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.randn(n * k, h, generator=g)
    inverse = torch.randperm(n * k, generator=g)
    weights = torch.rand(n, k, generator=g)
    x = torch.randn(n, 1, h, generator=g) * 2 if k == 3 else torch.randn(n, h, generator=g) * 2
    w = torch.rand(h, generator=g) * 1.5 + 0.25
    weights = weights.to(device, torch.float32 if k == 6 else dtype)
    return ys.to(device, dtype), inverse.to(device), weights, x.to(device, dtype), w.to(device, dtype)


def _check_add_norm(shape, dtype, device, seed: int, before=lambda: None) -> None:
    x, r, w = _norm_case(shape, dtype, device, seed)
    before()
    s, h = an.add_rms_norm(x, r, w, EPS)
    want = x + r
    assert _same_bits(s, want), (shape, dtype)
    ref = F.rms_norm(want, (shape[-1],), w, EPS)
    assert not h.isnan().any() and _ulps(h, ref) <= _h_bound(dtype, x.is_cuda), (shape, dtype, _ulps(h, ref))
    _check_norm_quant(x, r, w, s, h, before)


def _check_norm_quant(x, r, w, s, h, before) -> None:
    """quant=True: the same s and h, and h's rows quantized to FP8 with the bits of the act-quant kernel
    the unquantized path runs; on the GPU also the pure-torch recipe computed on the CPU (as the act-quant's
    own GPU test: torch on CUDA divides by the scalar 448 as a multiply by its reciprocal, which moves a
    scale's last bit). The interpreter's fp32 -> e4m3 conversion rounds wrongly (tests/test_kernels_quant.py),
    in both kernels alike, so there the kernels are held to each other only."""
    from miles_core.kernels import fp8_gemm
    from miles_core.quant.fp8 import fp8_act_quantize_reference

    before()
    s2, h2, (q, qs) = an.add_rms_norm(x, r, w, EPS, quant=True)
    assert _same_bits(s2, s) and _same_bits(h2, h)
    rows = h.reshape(-1, h.shape[-1])
    q_ref, s_ref = fp8_gemm.fp8_act_quant_triton(rows)
    assert q.shape == q_ref.shape and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), x.shape
    assert torch.equal(qs, s_ref), x.shape
    if x.is_cuda:
        q_ref, s_ref = fp8_act_quantize_reference(rows.cpu())
        assert torch.equal(q.cpu().float(), q_ref.float()) and torch.equal(qs.cpu(), s_ref), x.shape


def _check_combine_add_norm(n, hdim, k, dtype, device, seed: int, before=lambda: None) -> None:
    from miles_core.kernels import moe_combine

    ys, inverse, weights, x, w = _combine_case(n, hdim, k, dtype, device, seed)
    before()
    s, h = an.combine_add_rms_norm(ys, inverse, weights, x, w, EPS)
    combined = moe_combine.combine(ys, inverse, weights).view(x.shape)  # the unfused path's kernel
    assert _same_bits(s, x + combined), (n, hdim, k, dtype)
    if not x.is_cuda:  # the reference has the interpreter's float32 ops (the GPU contracts them into FMAs)
        assert _same_bits(s, an.combine_add_rms_norm_reference(ys, inverse, weights, x, None, EPS)[0])
    ref = F.rms_norm(x + combined, (hdim,), w, EPS)
    assert not h.isnan().any() and _ulps(h, ref) <= _h_bound(dtype, x.is_cuda), (n, hdim, k, _ulps(h, ref))
    before()
    s2, h2 = an.combine_add_rms_norm(ys, inverse, weights, x, None, EPS)  # no norm after: the sum alone
    assert h2 is None and _same_bits(s2, s)


# ---- interpreter (CPU) -------------------------------------------------------------------------


def _interpreter_setup() -> None:
    """In the interpreter subprocess: CPU tensors go to the kernels, float32 -> bf16 rounds to
    nearest even (the interpreter truncates), and `new_empty` outputs start as NaN."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(an._on_gpu, "patched", False):
        return
    an._on_gpu = lambda x: True
    an._on_gpu.patched = True
    narrow = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if not (src == tl.float32 and dst == tl.bfloat16):
            return narrow(data, src, dst, rounding_mode)
        f = np.asarray(data, dtype=np.float32)
        bits = f.view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest, ties to even
        return np.where(np.isnan(f), ((bits >> 16) | 0x40).astype(np.uint16), out)  # NaN stays NaN

    interpreter._convert_float = convert
    new_empty = torch.Tensor.new_empty
    poisoned = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    torch.Tensor.new_empty = lambda self, *a, **kw: poisoned(new_empty(self, *a, **kw))


def interp_kernels() -> None:
    _interpreter_setup()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for i, shape in enumerate(NORM_SHAPES):
            _check_add_norm(shape, dtype, "cpu", seed=i)
        for i, (n, h, k) in enumerate(COMBINE_SHAPES):
            _check_combine_add_norm(n, h, k, dtype, "cpu", seed=10 + i)


def interp_fallbacks() -> None:
    """With autograd needing a gradient, or mixed dtypes, the functions run the torch reference."""
    from miles_core import kernels

    _interpreter_setup()
    x, r, w = _norm_case((3, 64), torch.float32, "cpu", seed=1)
    kernels.DECODE_FUSION = True
    with torch.no_grad():
        assert an.fused_ok(x)
    assert not an.fused_ok(x)  # grad mode on: the engine keeps the unfused loop
    kernels.DECODE_FUSION = False
    with torch.no_grad():
        assert not an.fused_ok(x)
    s, h = an.add_rms_norm(x, r, w.clone().requires_grad_(), EPS)
    assert h.grad_fn is not None  # the reference ran: differentiable
    ys, inverse, weights, x, w = _combine_case(3, 64, 2, torch.float32, "cpu", seed=2)
    s, h = an.combine_add_rms_norm(ys.requires_grad_(), inverse, weights, x, w, EPS)
    assert s.grad_fn is not None and h.grad_fn is not None
    with torch.no_grad():
        s, _ = an.combine_add_rms_norm(ys, inverse, weights, x.double(), w, EPS)  # dtypes differ
    assert s.dtype == torch.float64


def interp_kernels_and_fallbacks() -> None:
    interp_kernels()
    interp_fallbacks()


def test_kernels_equal_torch_add_and_rms_norm_and_fall_back_for_autograd_in_interpreter():
    _run_interpreted("interp_kernels_and_fallbacks", "tests.test_kernels_add_norm")


def test_kernels_are_off_on_cpu():
    x, r, w = _norm_case((3, 64), torch.float32, "cpu", seed=3)
    with torch.no_grad():
        assert not an.fused_ok(x)
        s, h = an.add_rms_norm(x, r, w, EPS)
    ref = an.add_rms_norm_reference(x, r, w, EPS)
    assert _same_bits(s, ref[0]) and _same_bits(h, ref[1])


# ---- forward_step through the fused layer loop (interpreter) -----------------------------------


def tiny_moe(shared: bool, device="cpu", dtype=torch.float32, seed: int = 0):
    """A random 3-layer MoE model built without transformers: GQA with qk-norm, layers 0 and 2 MoE
    (8 experts, top-3), layer 1 dense; `shared`: one shared expert and the sigmoid router."""
    from miles_core.model.config import ModelConfig
    from miles_core.model.loader import build_model

    cfg = ModelConfig(
        "Qwen3MoeForCausalLM", vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=96, qk_norm=True, num_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True, moe_layers=(0, 2),
        router="sigmoid" if shared else "softmax", n_shared_experts=1 if shared else 0,
        routed_scaling_factor=2.5 if shared else 1.0,
    )  # fmt: skip
    model = build_model(cfg, device, dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * (0.05 if p.dim() > 1 else 0.02))
    return model.eval()


def decode_steps(model, device, steps: int = 3):
    """A ragged prefill (all positions' logits) of 4 prompts into slots out of order, then `steps`
    decode steps -> (prefill logits [B, T, V], decode logits [steps, B, V], experts cache)."""
    from miles_core.rollout.cache import KVCache
    from miles_core.rollout.runner import StepBatch, forward_step

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 11, 3, 8)]  # interpreted: few rows
    slots = [3, 0, 4, 1]
    cache = KVCache(model, slots=5, max_len=64)
    with torch.no_grad():
        rows = [(p, s, 0) for p, s in zip(prompts, slots, strict=True)]
        prefill = forward_step(model, cache, StepBatch.build(rows, device), all_logits=True)  # [B, T, V]
        out = []
        for t in range(steps):
            rows = [([7 * i + t + 3], s, len(p) + t) for i, (p, s) in enumerate(zip(prompts, slots, strict=True))]
            out.append(forward_step(model, cache, StepBatch.build(rows, device), capture_safe=True))  # [B, V]
    return prefill, torch.stack(out), cache.experts[: cache.slots]


def fused_and_unfused(model, device, setattr_) -> tuple:
    """decode_steps with kernels.DECODE_FUSION on, then off -> (fused, unfused); checks that the fused
    run went through the kernels for every layer of every step and the unfused run never did."""
    from miles_core import kernels
    from miles_core.rollout import runner

    calls = {"add": 0, "combine": 0}
    add, combine = runner.add_rms_norm, runner.combine_add_rms_norm
    count = lambda name, fn: lambda *a, **kw: calls.__setitem__(name, calls[name] + 1) or fn(*a, **kw)
    setattr_(runner, "add_rms_norm", count("add", add))
    setattr_(runner, "combine_add_rms_norm", count("combine", combine))
    setattr_(kernels, "DECODE_FUSION", True)
    fused = decode_steps(model, device)
    layers = model.model.layers
    routed = sum(layer.is_moe and layer.mlp.shared_experts is None for layer in layers)
    assert calls == {"add": 4 * (2 * len(layers) - routed), "combine": 4 * routed}, calls  # 4 forward steps
    setattr_(kernels, "DECODE_FUSION", False)
    unfused = decode_steps(model, device)
    assert calls == {"add": 4 * (2 * len(layers) - routed), "combine": 4 * routed}, calls
    return fused, unfused


def _assert_close_logits(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """got within rel * max|want| of want; argmax equal wherever want's top-two gap exceeds twice
    that (closer than that, the greedy token is a coin toss of rounding)."""
    got, want = got.float(), want.float()
    tol = rel * want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= tol, (err, tol)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tol
    assert clear.float().mean() >= 0.25  # not vacuous (tiny random models: top-two gaps are often small)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def interp_forward_step() -> None:
    _interpreter_setup()
    for shared in (False, True):
        fused, unfused = fused_and_unfused(tiny_moe(shared), "cpu", setattr)
        for got, want in zip(fused[:2], unfused[:2], strict=True):
            _assert_close_logits(got, want, 1e-5)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.equal(fused[2], unfused[2])  # the recorded experts


def test_forward_step_fused_layers_match_unfused_in_interpreter():
    """fp32: logits (a prefill's every position, three decode steps) within 1e-5 of the largest
    |logit|, argmax and recorded experts equal; with and without shared experts."""
    _run_interpreted("interp_forward_step", "tests.test_kernels_add_norm")


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ----------------------------------------


def _compile_sm90(fn, types: dict, consts: dict, num_warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


@pytest.mark.parametrize("h", [2048, 7168, 16384])
def test_kernels_compile_for_hopper_without_spills_and_with_ieee_mean(h):
    from tests.test_kernels_quant import _resources

    bf = {n: "*bf16" for n in ("x_ptr", "r_ptr", "w_ptr", "s_ptr", "h_ptr", "ys_ptr", "cw_ptr")}
    types = {**bf, "inv_ptr": "*i64", "eps": "fp32", "q_ptr": "*fp8e4nv", "qs_ptr": "*fp32", "qeps": "fp32"}
    launch = an._launch(h)
    warps = launch.pop("num_warps")
    cases = [
        (an._add_norm_kernel, {"H": h, "QUANT": False, "G": 1, **launch}),
        (an._add_norm_kernel, {"H": h, "QUANT": True, "G": triton.next_power_of_2(h // 128), **launch}),  # FP8 rows
        (an._combine_add_norm_kernel, {"H": h, "K": 8, "HAS_NORM": True, **launch}),
    ]
    for fn, consts in cases:
        kernel = _compile_sm90(fn, types, consts, warps)
        res = _resources(kernel)
        assert "STACK:0" in res and "LOCAL:0" in res, res  # the row stays in registers
        ptx = kernel.asm["ptx"]
        assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx  # 16-byte loads
        assert "div.rn.f32" in ptx and "div.full" not in ptx  # mean of squares: IEEE division, as torch


def test_combine_sum_is_contracted_like_moe_combines_kernel():
    """Both kernels fuse `acc += w * y` into one FMA per slot and element (the same float32 ops, so
    the same bits): counted per element of a row in each kernel's PTX."""
    from miles_core.kernels import moe_combine

    types = {n: "*bf16" for n in ("ys_ptr", "w_ptr", "out_ptr", "x_ptr", "s_ptr", "h_ptr", "cw_ptr")}
    types = {**types, "inv_ptr": "*i64", "eps": "fp32"}
    k, h, block = 8, 1024, 1024
    ours = _compile_sm90(an._combine_add_norm_kernel, types, {"H": h, "K": k, "BLOCK_H": block, "HAS_NORM": False}, 2)
    theirs = _compile_sm90(moe_combine._combine_fwd_kernel, types, {"K": k, "BLOCK_H": block}, 2)
    per_thread = block // 64  # elements of the row each of 2 x 32 threads holds

    def fmas(kernel) -> int:
        return kernel.asm["ptx"].count("fma.rn.f32")

    assert fmas(ours) == fmas(theirs) == k * per_thread, (fmas(ours), fmas(theirs))


# ---- GPU ----------------------------------------------------------------------------------------

GPU_NORM_SHAPES = [(64, 1, 2048), (256, 2048), (64, 7168), (7, 8192), *NORM_SHAPES]
GPU_COMBINE_SHAPES = [(64, 2048, 8), (256, 2048, 8), (64, 7168, 8), (5, 8192, 1), *COMBINE_SHAPES]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernels_equal_torch_add_and_rms_norm(dtype):
    """On the device: s bit for bit x + r / x + moe_combine.combine, h within one 16-bit ulp (8 fp32
    ulps) of F.rms_norm, outputs poisoned (NaN) before every run."""
    from tests.test_kernels_quant import _poison

    with torch.no_grad():
        for i, shape in enumerate(GPU_NORM_SHAPES):
            _check_add_norm(shape, dtype, "cuda", seed=i, before=_poison)
        for i, (n, h, k) in enumerate(GPU_COMBINE_SHAPES):
            _check_combine_add_norm(n, h, k, dtype, "cuda", seed=10 + i, before=_poison)


@pytest.mark.gpu
def test_gpu_kernels_replay_in_a_cuda_graph():
    """Captured once, replayed on new inputs copied into the same buffers: the replay's outputs equal
    a direct call's (static grid, no host sync)."""
    ys, inverse, weights, x, w = _combine_case(64, 2048, 8, torch.bfloat16, "cuda", seed=5)
    r = torch.randn_like(x)
    with torch.no_grad():
        an.add_rms_norm(x, r, w, EPS)  # compile before capturing
        an.combine_add_rms_norm(ys, inverse, weights, x, w, EPS)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s1, h1 = an.add_rms_norm(x, r, w, EPS)
            s2, h2 = an.combine_add_rms_norm(ys, inverse, weights, s1, w, EPS)
        for seed in (6, 7):
            new = _combine_case(64, 2048, 8, torch.bfloat16, "cuda", seed=seed)
            for buf, val in zip((ys, inverse, weights, x, w), new, strict=True):
                buf.copy_(val)
            r.copy_(torch.randn_like(r))
            graph.replay()
            want1 = an.add_rms_norm(x, r, w, EPS)
            want2 = an.combine_add_rms_norm(ys, inverse, weights, want1[0], w, EPS)
            assert all(_same_bits(a, b) for a, b in zip((s1, h1, s2, h2), (*want1, *want2), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True])
def test_gpu_forward_step_fused_matches_unfused_fp32(shared, monkeypatch):
    """fp32 on the device (the fused layer loop vs the unfused one, with every other decode fusion
    also on vs off): logits within 1e-4 of the largest |logit|, argmax and recorded experts equal."""
    fused, unfused = fused_and_unfused(tiny_moe(shared, "cuda"), "cuda", monkeypatch.setattr)
    for got, want in zip(fused[:2], unfused[:2], strict=True):
        _assert_close_logits(got, want, 1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(fused[2], unfused[2])


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_gpu_forward_step_fused_matches_unfused_bf16(arch, tmp_path, monkeypatch):
    """bf16 checkpoints (transformers' tiny configs; DeepSeek-V3: MLA, shared experts, a dense first
    layer): logits within 2^-5 of the largest |logit| (one-ulp normed values, carried through three
    layers, may also flip a near-tied expert), greedy tokens equal where the top two are further
    apart than twice that."""
    from miles_core.model import load_model
    from tests.tiny_models import CONFIGS, save_hf

    path, _ = save_hf(CONFIGS[arch](), str(tmp_path / arch))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    fused, unfused = fused_and_unfused(model, "cuda", monkeypatch.setattr)
    for got, want in zip(fused[:2], unfused[:2], strict=True):
        _assert_close_logits(got, want, 2**-5)


@pytest.mark.gpu
def test_gpu_engine_replays_the_fused_kernels_from_cuda_graphs(monkeypatch):
    """The engine's CUDA graphs capture and replay the fused layer loop (bf16 model): the same tokens
    and log-probs as the same static-shape decode run eagerly. (An fp32 MoE cannot be captured: its
    grouped GEMM falls back to a per-expert loop that reads the counts on the host.)"""
    from miles_core import kernels
    from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams, runner

    model = tiny_moe(False, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(10)
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 30, 12)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    reqs = [Request(f"p{i}", p, sp) for i, p in enumerate(prompts)]
    calls = []
    combine = runner.combine_add_rms_norm
    monkeypatch.setattr(runner, "combine_add_rms_norm", lambda *a, **kw: calls.append(1) or combine(*a, **kw))
    monkeypatch.setattr(kernels, "DECODE_FUSION", True)

    def run(graphs: bool):
        cfg = EngineConfig(max_slots=4, max_len=128, cuda_graphs=graphs, static_decode=True, graph_len_bucket=32)
        engine = Engine(model, config=cfg)
        out = engine.generate(reqs)
        assert bool(engine._graphs._graphs) == graphs  # captured and replayed, or run eagerly
        return out

    got = run(True)
    assert calls
    want = run(False)
    for a, b in zip(got, want, strict=True):
        assert a.response_tokens == b.response_tokens
        assert a.logprobs == b.logprobs  # the same kernels on the same shapes: the same bits


@pytest.mark.gpu
def test_gpu_fp8_experts_read_their_rows_quantized_by_the_norm(tmp_path, monkeypatch):
    """FP8 experts (bf16 attention) on the fused layer loop: the norm before each MoE also quantizes its
    rows (`add_rms_norm(quant=True)`, one act-quant launch fewer per layer) and the gate_up GEMM gathers
    them; prefill and decode logits and recorded experts are bit for bit those of the same loop with the
    expert fusions off (act-quant of the gathered rows in its own launch)."""
    from miles_core import kernels
    from miles_core.model import load_model
    from miles_core.quant import quantize_model_
    from miles_core.rollout import runner
    from tests.tiny_models import qwen3_moe_config, save_hf

    cfg = qwen3_moe_config(hidden_size=256, moe_intermediate_size=128, head_dim=64)
    path, _ = save_hf(cfg, str(tmp_path / "qwen3_moe"))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    quantize_model_(model, "fp8", scope="experts")
    quantized = {"norms": 0}
    add = runner.add_rms_norm

    def counted(*a, quant=False, **kw):
        quantized["norms"] += quant
        return add(*a, quant=quant, **kw)

    monkeypatch.setattr(runner, "add_rms_norm", counted)
    with kernels.fusion(decode=True, experts=True):
        on = decode_steps(model, "cuda")
    routed = sum(layer.is_moe for layer in model.model.layers)
    assert quantized["norms"] == 4 * routed, quantized  # 4 forward steps
    with kernels.fusion(decode=True, experts=False):
        off = decode_steps(model, "cuda")
    assert quantized["norms"] == 4 * routed, quantized  # none more with the fusions off
    for got, want in zip(on, off, strict=True):
        assert not got.float().isnan().any() and torch.equal(got, want)
