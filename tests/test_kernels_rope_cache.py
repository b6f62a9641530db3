"""The decode-step q/k RMSNorm + rope + KV-cache write kernel (miles_core.kernels.rope_cache) held
to the eager ops it replaces (F.rms_norm, apply_rope, the cache's index write).

The check splits where the numerics split. Rope and the cache writes must equal the eager ops bit
for bit given the same normed inputs: without qk-norm everything is compared bitwise; with qk-norm
the kernel's own normed q and k (read back from a run with cos = 1, sin = 0, where rope is the
identity) go through the eager rope, which must reproduce the kernel's output bit for bit. The
normed values themselves are bounded by ONE ULP of the 16-bit dtype from F.rms_norm: the float32
sum of squares may be added in another order (so rstd may differ in its last bit), and an
F.rms_norm that rounds before the weight multiply is also within one ulp. (In the fp32 interpreter
run that last bit of rstd is the output's own precision: 4 fp32 ulps.) Caches start as random old data with
NaN at the entries the kernel must write: every other entry must keep its bits, every written one
must equal the reference.

CPU: the kernel under the Triton interpreter (a subprocess with TRITON_INTERPRET=1, as in
test_kernels_quant) in fp32 and fp16 (the interpreter has no bf16). CPU, ahead of time: it compiles
for sm_90 with no FMA (a fused multiply-add would skip one of eager's roundings) and IEEE division.
GPU (`-m gpu`): bf16 at Qwen3-30B-A3B's shape (B=64, Hq=32, Hkv=4, D=128) against the eager ops
run on the GPU itself, q_out poisoned; and decode steps of the engine with the kernel against the
same steps without it (MILES_NO_ROPE_CACHE_KERNEL=1): bit for bit for Llama (no qk-norm, so no
reduction), for Qwen3 (qk-norm) logits within 2^-5 of the largest |logit| (one-ulp differences
of a few normed values, carried through two layers; a wrong slot, position or rotation is O(1)).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from miles_core.kernels import rope_cache as rc

triton = pytest.importorskip("triton")

SHAPES = [(2, 32, 4, 64), (4, 8, 2, 16), (2, 4, 4, 128), (3, 8, 2, 128)]  # (B, Hq, Hkv, D)
MAX_LEN = 9


def _case(b, hq, hkv, d, dtype, device, norm: bool, seed: int, max_len: int = MAX_LEN) -> dict:
    """rope_norm_cache's arguments; slots out of order, positions from 0 to max_len - 1."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    rows = b + 2  # slots + scratch, a few never written
    slot = torch.randperm(rows, generator=g)[:b]
    pos = torch.randint(0, max_len, (b,), generator=g)
    pos[0], pos[-1] = 0, max_len - 1
    angles = torch.rand(b, 1, d, generator=g) * 7  # [B, T=1, D], as Rotary's cos/sin come
    weight = (lambda: (torch.rand(d, generator=g) * 1.5 + 0.25).to(device, dtype)) if norm else (lambda: None)
    cache_k, cache_v = rnd(rows, max_len, hkv, d), rnd(rows, max_len, hkv, d)  # old data
    cache_k[slot, pos] = cache_v[slot, pos] = float("nan")  # what the kernel must overwrite
    return dict(
        q=rnd(b, 1, hq * d, scale=3), k=rnd(b, 1, hkv * d, scale=3), v=rnd(b, 1, hkv * d),  # projection outputs
        q_weight=weight(), k_weight=weight(), eps=1e-6,
        cos=angles.cos().to(device, dtype), sin=angles.sin().to(device, dtype),
        cache_k=cache_k, cache_v=cache_v, slot=slot.to(device), pos=pos.to(device),
    )  # fmt: skip


def _run(fn, case: dict):
    """fn on copies of the caches -> (q_out [B, 1, Hq, D], cache_k, cache_v)."""
    ck, cv = case["cache_k"].clone(), case["cache_v"].clone()
    return fn(**{**case, "cache_k": ck, "cache_v": cv}), ck, cv


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the dtype's ulp at max(|a|, |b|)."""
    mant = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[a.dtype]
    a64, b64 = a.double(), b.double()
    _, e = torch.frexp(torch.maximum(a64.abs(), b64.abs()))
    ulp = torch.ldexp(torch.ones_like(a64), e - 1 - mant).clamp_min(torch.finfo(a.dtype).smallest_normal * 2.0**-mant)
    return ((a64 - b64).abs() / ulp).max().item()


def _check_written(case: dict, got, ref) -> None:
    """q_out and the written entries equal ref bit for bit; every other cache entry is unchanged."""
    assert _same_bits(got[0], ref[0])
    written = torch.zeros(case["cache_k"].shape[:2], dtype=torch.bool, device=case["slot"].device)
    written[case["slot"], case["pos"]] = True  # [slots + 1, max_len]
    for g, r, old in ((got[1], ref[1], case["cache_k"]), (got[2], ref[2], case["cache_v"])):
        assert _same_bits(g[~written], old[~written])
        assert _same_bits(g[written], r[written]) and not g[written].isnan().any()


def _check_kernel(shape, dtype, device, seed: int, before_kernel=lambda: None) -> None:
    b, hq, hkv, d = shape
    case = _case(*shape, dtype, device, norm=False, seed=seed)
    before_kernel()
    _check_written(case, _run(rc.rope_norm_cache, case), _run(rc.rope_norm_cache_reference, case))

    case = _case(*shape, dtype, device, norm=True, seed=seed + 100)
    before_kernel()  # rope as the identity: the kernel's normed q and k come out as they are
    yq, yk, _ = _run(rc.rope_norm_cache, {**case, "cos": torch.ones_like(case["cos"]), "sin": case["sin"] * 0})
    yk = yk[case["slot"], case["pos"]]  # [B, Hkv, D]
    ref_q = F.rms_norm(case["q"].view(b, 1, hq, d), (d,), case["q_weight"], case["eps"])
    ref_k = F.rms_norm(case["k"].view(b, hkv, d), (d,), case["k_weight"], case["eps"])
    bound = 4 if dtype == torch.float32 else 1  # fp32: rstd's last bit shows in the output
    assert _ulps(yq, ref_q) <= bound and _ulps(yk, ref_k) <= bound, (_ulps(yq, ref_q), _ulps(yk, ref_k))
    before_kernel()
    got = _run(rc.rope_norm_cache, case)
    eager_rope = {**case, "q": yq, "k": yk, "q_weight": None, "k_weight": None}  # the kernel's normed values
    _check_written(case, got, _run(rc.rope_norm_cache_reference, eager_rope))

    # k_out (a prefill's own attention reads it): the k written to the cache, bit for bit, same q and cache
    k_out = torch.full((b, hkv, d), float("nan"), dtype=dtype, device=device)
    before_kernel()
    with_k = _run(rc.rope_norm_cache, {**case, "k_out": k_out})
    assert _same_bits(k_out, with_k[1][case["slot"], case["pos"]]) and not k_out.isnan().any()
    _check_written(case, with_k, got)


# ---- interpreter (CPU) -------------------------------------------------------------------------


def interp_rope_cache(dtype: str) -> None:
    for i, shape in enumerate(SHAPES):
        _check_kernel(shape, getattr(torch, dtype), "cpu", seed=i)


def interp_heads_per_program() -> None:
    """Several heads per program (a prefill's rows), including counts that do not divide Hq + Hkv: the same
    bits as one head per program, q, cache and k_out."""
    for i, (b, hq, hkv, d) in enumerate([(5, 8, 2, 16), (3, 32, 4, 64)]):
        case = _case(b, hq, hkv, d, torch.float32, "cpu", norm=True, seed=40 + i)
        outs = []
        for hpp in (1, 3, 4, hq + hkv):
            k_out = torch.full((b, hkv, d), float("nan"))
            outs.append((*_run(functools.partial(rc.rope_norm_cache, hpp=hpp), {**case, "k_out": k_out}), k_out))
        assert not outs[0][3].isnan().any()
        for other in outs[1:]:
            assert all(_same_bits(x, y) for x, y in zip(outs[0], other, strict=True))
    assert [rc.heads_per_program(r, 36) for r in (64, 256, 32768)] == [2, 4, 12] and rc.heads_per_program(9, 1) == 1


def _interpreted(call: str) -> None:
    """Run `call` of this module in a subprocess with the Triton interpreter on (CPU tensors)."""
    code = (
        "import tests.test_kernels_quant as q; q._fix_interpreter_for_numpy2(); "
        f"import tests.test_kernels_rope_cache as t; t.{call}"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["float32", pytest.param("float16", marks=pytest.mark.slow)])
def test_kernel_equals_eager_norm_rope_and_cache_write_in_interpreter(dtype):
    _interpreted(f"interp_rope_cache({dtype!r})")


def test_heads_per_program_changes_no_bit_in_interpreter():
    _interpreted("interp_heads_per_program()")


def test_reference_equals_the_model_cores_qkv_and_cache_write():
    """The reference is what `GQAttention.qkv` + `KVCache.write` compute (CPU, fp32: the CPU RMSNorm
    rounds like F.rms_norm there), so holding the kernel to it holds it to the model."""
    from miles_core.model.attention import GQAttention
    from miles_core.model.config import ModelConfig

    b, hq, hkv, d = 3, 8, 2, 16
    cfg = ModelConfig("Qwen3ForCausalLM", vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=hq,
                      num_key_value_heads=hkv, head_dim=d, intermediate_size=8, qk_norm=True)  # fmt: skip
    attn = GQAttention(cfg)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5), attn.k_norm.weight.uniform_(0.5, 1.5)
        case = _case(b, hq, hkv, d, torch.float32, "cpu", norm=True, seed=5)
        h = torch.randn(b, 1, 32)
        q, k, v = attn.qkv(h, case["cos"], case["sin"])  # [B, 1, H, D]
        proj = {"q": attn.q_proj(h), "k": attn.k_proj(h), "v": attn.v_proj(h)}
        case = {**case, **proj, "q_weight": attn.q_norm.weight, "k_weight": attn.k_norm.weight}
        got = _run(rc.rope_norm_cache_reference, case)
    assert (got[0] - q).abs().max() <= 1e-6
    assert (got[1][case["slot"], case["pos"]] - k[:, 0]).abs().max() <= 1e-6
    assert torch.equal(got[2][case["slot"], case["pos"]], v[:, 0])


def test_kernel_is_off_on_cpu_and_when_switched_off(monkeypatch):
    x, cos, cache = torch.zeros(2, 1, 8), torch.zeros(2, 1, 16), torch.zeros(3, 4, 2, 16)
    assert not rc.rope_cache_ok(x.bfloat16(), cos.bfloat16(), cache.bfloat16())  # CPU tensors
    from miles_core import kernels

    assert rc.enabled()
    monkeypatch.setattr(kernels, "DECODE_FUSION", False)  # off with the other decode-size kernels
    assert not rc.enabled()
    monkeypatch.setattr(kernels, "DECODE_FUSION", True)
    monkeypatch.setenv("MILES_NO_ROPE_CACHE_KERNEL", "1")  # off alone
    assert not rc.enabled()


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ----------------------------------------


@pytest.mark.parametrize("has_norm,hpp", [(True, 1), (False, 1), (True, 4)])
def test_kernel_compiles_for_hopper_without_fma_and_with_ieee_division(has_norm, hpp):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = rc._rope_cache_kernel
    consts = {"HQ": 32, "D": 128, "BLOCK_D": 128, "HAS_NORM": has_norm, "HPP": hpp}
    types = {n: "*bf16" for n in fn.arg_names if n.endswith("_ptr")} | {"slot_ptr": "*i64", "pos_ptr": "*i64"}
    sig = {n: "constexpr" if n in consts else types.get(n, "fp32" if n == "eps" else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = rc.launch_options(128)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    assert "fma." not in ptx  # each product rounds to bf16 before the sum, as in eager
    assert ("div.rn.f32" in ptx) == has_norm and "div.full" not in ptx
    assert "cvt.rn.bf16" in ptx


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 32, 4, 128), *SHAPES])
def test_gpu_kernel_equals_eager_ops_bf16(shape):
    """bf16 on the GPU, against F.rms_norm + apply_rope + index writes run there: rope and cache
    bitwise given equal normed inputs, normed values within one bf16 ulp; q_out poisoned (NaN)."""
    from tests.test_kernels_quant import _poison

    _check_kernel(shape, torch.bfloat16, "cuda", seed=7, before_kernel=_poison)


@pytest.mark.gpu
def test_gpu_kernel_applies_only_to_16_bit_one_token_full_rope_steps(monkeypatch):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, cos, cache = torch.zeros(4, 1, 64, **bf), torch.zeros(4, 1, 16, **bf), torch.zeros(5, 8, 2, 16, **bf)
    w = torch.ones(16, **bf)
    with torch.no_grad():
        assert rc.rope_cache_ok(x, cos, cache, (w, w)) and rc.rope_cache_ok(x, cos, cache)
        assert not rc.rope_cache_ok(x.float(), cos.float(), cache.float())  # fp32
        assert not rc.rope_cache_ok(torch.zeros(4, 2, 64, **bf), cos, cache)  # two tokens per row
        assert not rc.rope_cache_ok(x, cos[..., :8], cache)  # rope over part of the head
        assert not rc.rope_cache_ok(x, cos, cache, (w.float(), w.float()))  # fp32 norm weights
        monkeypatch.setenv("MILES_NO_ROPE_CACHE_KERNEL", "1")
        assert not rc.rope_cache_ok(x, cos, cache)
    monkeypatch.setenv("MILES_NO_ROPE_CACHE_KERNEL", "0")
    assert not rc.rope_cache_ok(x, cos, cache)  # autograd on: the kernel has no backward


def _decode_steps(model, device, steps: int = 3):
    """A ragged prefill of 4 prompts into slots out of order, then `steps` decode steps -> (logits
    [1 + steps, B, V]: the prefill's last positions, then each step's; cache)."""
    from miles_core.rollout.cache import KVCache
    from miles_core.rollout.runner import StepBatch, forward_step
    from tests.test_rollout_fixtures import ragged_prompts

    prompts, slots = ragged_prompts((5, 17, 9, 30), seed=4), [3, 0, 4, 1]
    cache = KVCache(model, slots=5, max_len=64)
    out = []
    with torch.no_grad():
        first = StepBatch.build([(p, s, 0) for p, s in zip(prompts, slots, strict=True)], device)
        out.append(forward_step(model, cache, first))  # [B, V]
        for t in range(steps):
            rows = [([7 * i + t + 3], s, len(p) + t) for i, (p, s) in enumerate(zip(prompts, slots, strict=True))]
            out.append(forward_step(model, cache, StepBatch.build(rows, device), capture_safe=True))  # [B, V]
    return torch.stack(out), cache


def _with_and_without_kernel(model, device, setenv, setattr_) -> tuple:
    """The prefill and decode steps with the kernel, then with MILES_NO_ROPE_CACHE_KERNEL=1 -> (logits,
    cache) of each; checks that every layer of the prefill and of each decode step went through the
    kernel (and none without it)."""
    from miles_core.rollout import runner

    calls = []
    fused = runner.rope_norm_cache
    setattr_(runner, "rope_norm_cache", lambda *a: calls.append(1) or fused(*a))
    setenv("MILES_NO_ROPE_CACHE_KERNEL", "0")
    got = _decode_steps(model, device)
    assert len(calls) == 4 * len(model.model.layers)  # the prefill and 3 decode steps
    setenv("MILES_NO_ROPE_CACHE_KERNEL", "1")
    ref = _decode_steps(model, device)
    assert len(calls) == 4 * len(model.model.layers)
    return got, ref


def _assert_steps_match(got, ref, bitwise: bool, rel: float) -> None:
    if bitwise:  # logits and every cache entry of every layer (not the scratch slot: padding rows race there)
        assert _same_bits(got[0], ref[0])
        pairs = zip(got[1].a + got[1].b, ref[1].a + ref[1].b, strict=True)
        assert all(_same_bits(a[: got[1].slots], b[: got[1].slots]) for a, b in pairs)
    else:
        err = (got[0].float() - ref[0].float()).abs().max().item()
        assert err <= rel * ref[0].float().abs().max().item(), err


def interp_decode_steps() -> None:
    """The runner's decode through the kernel (interpreted, fp32 CPU tensors) against its eager ops."""
    from miles_core.rollout import runner
    from tests.test_rollout_fixtures import tiny

    # CPU fp32 tensors allowed here
    runner.rope_cache_ok = lambda x, cos, cache, w=(), any_t=False: (x.shape[1] == 1 or any_t) and rc.enabled()
    for arch in ("llama", "qwen3"):
        steps = _with_and_without_kernel(tiny(arch)[2], "cpu", os.environ.__setitem__, setattr)
        _assert_steps_match(*steps, bitwise=arch == "llama", rel=1e-5)


def test_runner_decode_through_the_kernel_equals_eager_decode_in_interpreter():
    """Llama (no qk-norm) bit for bit; Qwen3 (qk-norm) within 1e-5 of the largest |logit| (fp32)."""
    _interpreted("interp_decode_steps()")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_decode_steps_with_the_kernel_equal_the_eager_ops(arch, tmp_path, monkeypatch):
    """bf16. Llama (no qk-norm): logits and every cache entry bit for bit. Qwen3 (qk-norm): logits
    within 2^-5 of the largest |logit| (one-ulp normed values carried through two layers)."""
    from miles_core.model import load_model
    from tests.tiny_models import CONFIGS, save_hf

    path, _ = save_hf(CONFIGS[arch](), str(tmp_path / arch))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    steps = _with_and_without_kernel(model, "cuda", monkeypatch.setenv, monkeypatch.setattr)
    _assert_steps_match(*steps, bitwise=arch == "llama", rel=2**-5)


@pytest.mark.gpu
def test_gpu_engine_with_cuda_graphs_samples_the_same_with_and_without_the_kernel(tmp_path, monkeypatch):
    """Llama, greedy, CUDA graphs: the kernel is captured and replayed, and tokens and log-probs are
    the eager ops' bit for bit."""
    from miles_core.model import load_model
    from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams, runner
    from tests.test_rollout_fixtures import ragged_prompts
    from tests.tiny_models import CONFIGS, save_hf

    path, _ = save_hf(CONFIGS["llama"](), str(tmp_path / "llama"))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    sp = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    reqs = [Request(f"p{i}", p, sp) for i, p in enumerate(ragged_prompts((5, 30, 12), seed=10))]
    calls = []
    fused = runner.rope_norm_cache
    monkeypatch.setattr(runner, "rope_norm_cache", lambda *a: calls.append(1) or fused(*a))

    def run(kernel: bool):
        monkeypatch.setenv("MILES_NO_ROPE_CACHE_KERNEL", "0" if kernel else "1")
        engine = Engine(model, config=EngineConfig(max_slots=4, max_len=128, cuda_graphs=True, graph_len_bucket=32))
        out = engine.generate(reqs)
        assert engine._graphs._graphs  # a graph was captured and replayed
        return [(s.response_tokens, s.logprobs) for s in out]

    got = run(True)
    assert calls
    assert got == run(False)
