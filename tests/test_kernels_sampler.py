"""The decode sampler kernels (miles_core.kernels.sampler) held to `rollout.sampling.sample`'s torch path.

What "the same" means: greedy tokens equal torch.argmax (the first of equal maxima); log-probs are
log_softmax(logits / T)[token] in float32 up to reduction order; the in-kernel uniform equals
`sampling.uniform` bit for bit; a sampled token is the inverse CDF at that uniform, which float32
can only decide up to rounding of the cumulative sums. So each sampled token is checked against a
float64 inverse CDF of the same float32 logits / T: it must lie in the interval of the target u
widened by TOL (relative to the total), and it must *equal* the float64 token (and the torch
path's) wherever no boundary is within TOL of u. TOL = 2e-6 is about the float32 error bound of a
151,936-term sum in a tree or in chunks (log2(V) * 2^-24 ~ 1e-6) and 4x what was seen on the H200
(2026-11: the kernels' tokens lay at most 2e-7 outside their float64 interval, and where they
differed from the torch path's, a boundary was within 5.6e-7 of u; 0.5% of draws differed at
logits ~ N(0, 4^2), 2.2% at N(0, 1), and the kernels were the closer of the two to float64 in both).
An off-by-one or a wrong chunk fails it on the interpreter's small vocabularies, where tokens are
~1000x wider than TOL.

CPU: the kernels under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess) in float32 and
float16, vocabularies not a multiple of the chunk, -inf stretches (whole chunks, the row's end),
greedy and sampled rows of several temperatures mixed, many seeds and steps; and the Hopper
compile ahead of time. GPU (`-m gpu`): bf16 [64 | 256, 151936] with outputs poisoned, the same
checks against the torch path on the device, in a CUDA graph, and a chi-square of the kernel's
samples on a small vocabulary.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from miles_core.kernels import sampler as ks
from miles_core.rollout.sampling import SamplingParams, SamplingTensors, sample, uniform

pytest.importorskip("triton")

TOL = 2e-6
U_ONE = (15617172, 0)  # (seed, step) whose uniform rounds to exactly 1.0: u * total is the total


def _case(n: int, v: int, seed: int, dtype=torch.float32, device="cpu", scale: float = 2.0):
    """Logits [n, v] with -inf stretches and tied maxima, and the rows' temperatures (0 = greedy)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    x[0, v // 3 :] = float("-inf")  # whole chunks and the row's end masked
    x[1, : v // 2] = float("-inf")
    x[2, 5 : v - 7] = float("-inf")
    x[3, [8, 7, v - 1]] = x[3].max() + 1  # tied maxima in one chunk and in two: the first wins
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3])[torch.arange(n) % 4]
    temps[:4] = torch.tensor([1.0, 0.7, 1.3, 0.0])
    return x.to(device, dtype), temps.to(device)


def _streams(n: int, seed: int, device="cpu"):
    """Per-row seeds over the whole int64 range and steps past 2^32."""
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**62, (n,), generator=g) * 2 + torch.randint(0, 2, (n,), generator=g)
    steps = torch.randint(0, 2**40, (n,), generator=g)
    steps[::3] = torch.arange(0, n, 3)  # small counters too
    return seeds.to(device), steps.to(device)


def _tensors(temps, seeds, steps, device) -> SamplingTensors:
    params = [SamplingParams(temperature=float(t)) for t in temps]
    return SamplingTensors(params, seeds.tolist(), steps.tolist(), device)


def _scaled(x: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """float32 logits / T, T = 1 for greedy rows: what sample() and the kernels compute, on the CPU."""
    t = torch.where(temps > 0, temps, torch.ones_like(temps)).cpu()
    return x.cpu().float() / t[:, None]


def _float64_cdf(scaled: torch.Tensor):
    p = torch.softmax(scaled.double(), -1)  # [n, V]
    hi = p.cumsum(-1)
    return p, hi - p, hi


def _check_sampled(tokens, scaled, u, rows, torch_tokens=None) -> float:
    """Each sampled token lies within TOL of the float64 inverse CDF at u and of mass > 0, and equals
    the float64 token (and `torch_tokens`) wherever no boundary is within TOL. Returns the share of
    rows with a boundary within TOL."""
    p, lo, hi = _float64_cdf(scaled[rows])
    u = u[rows].double()
    k = tokens[rows].cpu()[:, None]
    assert (p.gather(1, k) > 0).all(), "drew a token of probability 0"
    inside = (lo.gather(1, k)[:, 0] - TOL <= u) & (u <= hi.gather(1, k)[:, 0] + TOL)
    assert inside.all(), (k[~inside, 0], u[~inside])
    near = ((hi - u[:, None]).abs() < TOL).any(-1)
    exact = torch.searchsorted(hi, u[:, None], right=True)[:, 0]
    assert torch.equal(k[~near, 0], exact[~near])
    if torch_tokens is not None:
        assert torch.equal(k[~near, 0], torch_tokens[rows].cpu()[~near])
    return near.float().mean().item()


def _check(x, temps, seeds, steps, tokens, logp, torch_path, lp_tol) -> float:
    """The kernels' (tokens, logp) against sample()'s torch path (tokens_ref, logp_ref) on the same rows:
    log-probs within lp_tol of torch's float32 log_softmax on the logits' device and of float64 (on the
    CPU, torch's float32 log_softmax of a [64, 151936] row is itself up to 2.3e-5 off float64)."""
    ref_tokens, _ = torch_path
    scaled = _scaled(x, temps)
    greedy = (temps == 0).cpu()
    assert torch.equal(tokens.cpu()[greedy], scaled.argmax(-1)[greedy])
    assert torch.equal(tokens.cpu()[greedy], ref_tokens.cpu()[greedy])
    on_device = scaled.to(x.device).log_softmax(-1).gather(1, tokens[:, None])[:, 0]
    assert (logp - on_device).abs().max().item() <= lp_tol
    exact = scaled.double().log_softmax(-1).gather(1, tokens.cpu()[:, None])[:, 0]
    assert (logp.cpu().double() - exact).abs().max().item() <= lp_tol
    return _check_sampled(tokens, scaled, uniform(seeds, steps).cpu(), ~greedy, ref_tokens)


# ---- interpreter (CPU) ----------------------------------------------------------------------------


def interp_uniform() -> None:
    seeds, steps = _streams(4096, 0)
    edges = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, U_ONE[0]])
    seeds = torch.cat([seeds, edges, edges.flip(0)])
    steps = torch.cat([steps, edges.flip(0), torch.tensor([0, 2**32 - 1, 2**32, 2**40, 2**62, 7, U_ONE[1]])])
    assert torch.equal(ks.uniform_triton(seeds, steps), uniform(seeds, steps))


def interp_sample() -> None:
    # (rows, vocabulary, chunk, dtype, row stride padding)
    for i, (n, v, chunk, dtype, pad) in enumerate([(48, 1000, 128, torch.float32, 0), (24, 777, 256, torch.float16, 9),
                                                   (8, 300, 512, torch.float32, 3)]):  # fmt: skip
        wide, temps = _case(n, v + pad, i, dtype)
        x = wide[:, :v]  # any row stride
        seeds, steps = _streams(n, 10 + i)
        tokens, logp = ks.sample_plain(x, temps, seeds, steps, config=(chunk, 4, 4))
        ref = sample(x, _tensors(temps, seeds, steps, "cpu"))
        _check(x, temps, seeds, steps, tokens, logp, ref, lp_tol=2e-6)
    # u = 1: the target is the whole mass; the last token of nonzero mass, never the masked end
    x = torch.randn(2, 600)
    x[:, 590:] = float("-inf")
    tokens, _ = ks.sample_plain(x, torch.ones(2), torch.tensor([U_ONE[0]] * 2), torch.tensor([U_ONE[1]] * 2),
                                config=(128, 4, 4))  # fmt: skip
    assert tokens.tolist() == [589, 589]


def _mixed_batch(temps, rows, filtered: int) -> SamplingTensors:
    """SamplingTensors for `rows` of `temps`, top-k on row `filtered`, each row's seed and step its index."""
    params = [SamplingParams(temperature=float(temps[r]), top_k=5 if r == filtered else 0) for r in rows]
    return SamplingTensors(params, list(rows), list(rows), temps.device)


def _check_mixed(x, temps, torch_sample) -> None:
    """sample() on a batch with a filtering row: that row is the torch path's, the others the kernels',
    and each plain row's (token, log-prob) is the one it gets alone (a row's draw ignores its batch)."""
    n = x.shape[0]
    st = _mixed_batch(temps, range(n), filtered=5)
    tokens, logp = sample(x, st)
    ref_tokens, ref_logp = torch_sample(x, st)
    k_tokens, k_logp = ks.sample_plain(x, st.temperature, st.seed, st.step)
    assert tokens[5] == ref_tokens[5] and logp[5] == ref_logp[5]
    others = torch.arange(n, device=x.device) != 5
    assert torch.equal(tokens[others], k_tokens[others]) and torch.equal(logp[others], k_logp[others])
    for row in (0, 3, 6, 7):
        alone = sample(x[row : row + 1], _mixed_batch(temps, [row], filtered=-1))
        assert alone[0].item() == tokens[row] and alone[1].item() == logp[row], row


def interp_mixed() -> None:
    x, temps = _case(8, 500, 5)
    available = ks.available
    ks.available = lambda logits: True  # sample() takes the kernels on CPU tensors here

    def torch_sample(x, st):
        ks.available = available
        try:
            return sample(x, st)
        finally:
            ks.available = lambda logits: True

    _check_mixed(x, temps, torch_sample)


def _run_interpreted(check: str) -> None:
    code = (
        "import tests.test_kernels_quant as q; q._fix_interpreter_for_numpy2(); "
        f"import tests.test_kernels_sampler as t; t.{check}()"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_kernel_uniform_equals_sampling_uniform_bit_for_bit_in_interpreter():
    _run_interpreted("interp_uniform")


def test_kernel_tokens_and_logprobs_equal_the_torch_path_in_interpreter():
    _run_interpreted("interp_sample")


def test_filter_rows_take_the_torch_path_and_plain_rows_the_kernels_in_interpreter():
    _run_interpreted("interp_mixed")


def test_u_one_exists_and_the_torch_path_then_takes_the_last_token():
    """Why the kernel guards the end: `uniform` can round to 1.0, and the torch path then returns the
    last token of the vocabulary whatever its mass; the kernel returns the last token of mass > 0."""
    seed, step = (torch.tensor([s]) for s in U_ONE)
    assert uniform(seed, step).item() == 1.0
    x = torch.randn(1, 600)
    x[:, 590:] = float("-inf")
    tokens, logp = sample(x, SamplingTensors([SamplingParams()], [U_ONE[0]], [U_ONE[1]], "cpu"))
    assert tokens.item() == 599 and logp.item() == float("-inf")


def test_kernels_are_off_on_cpu_and_when_switched_off(monkeypatch):
    from types import SimpleNamespace

    from miles_core import kernels

    assert not ks.available(torch.zeros(2, 8))
    on_cuda = SimpleNamespace(is_cuda=True, shape=(2, 8))
    monkeypatch.setattr(kernels, "DECODE_FUSION", True)
    assert ks.available(on_cuda)
    monkeypatch.setattr(kernels, "DECODE_FUSION", False)
    assert not ks.available(on_cuda)


# ---- ahead-of-time compile for Hopper (CPU; no GPU needed) ----------------------------------------

_TYPES = {"L": "*bf16", "T": "*fp32", "MX": "*fp32", "SM": "*fp32", "AM": "*i32", "SEED": "*i64", "STEP": "*i64",
          "TOK": "*i64", "LP": "*fp32"}  # fmt: skip


@pytest.mark.parametrize("name,consts,warps", [("_chunk_stats_kernel", {"CHUNK": 4096}, ks.CONFIG[1]),
                                               ("_pick_kernel", {"CHUNK": 4096, "CP": 64}, ks.CONFIG[2])])  # fmt: skip
def test_kernels_compile_for_hopper_without_spills_and_with_ieee_division(name, consts, warps):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.test_kernels_quant import _resources

    fn = getattr(ks, name)
    sig = {n: "constexpr" if n in consts else _TYPES.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in _TYPES}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    res = _resources(kernel)
    assert "STACK:0" in res and "LOCAL:0" in res, res  # no register spills
    ptx = kernel.asm["ptx"]
    assert "div.rn.f32" in ptx and "div.full" not in ptx  # logits / T rounds as torch's division


# ---- GPU ----------------------------------------------------------------------------------------

V_QWEN3 = 151936


def _poison() -> None:
    """Freed memory reads as NaN / -1: an output element a kernel forgets to write fails the checks."""
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(0xFF)
    del buf


def _torch_path(x, st, monkeypatch):
    from miles_core import kernels

    with monkeypatch.context() as m:
        m.setattr(kernels, "DECODE_FUSION", False)
        return sample(x, st)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 256])
def test_gpu_kernels_equal_the_torch_path_bf16(n, monkeypatch):
    """bf16 [n, 151936], logits ~ N(0, 4^2) (a spread like a model's): 8 steps of every row."""
    x, temps = _case(n, V_QWEN3, n, torch.bfloat16, "cuda", scale=4.0)
    near = []
    for step in range(8):
        seeds, steps = _streams(n, 100 * n + step, "cuda")
        st = _tensors(temps, seeds, steps, "cuda")
        _poison()
        with torch.inference_mode():
            tokens, logp = sample(x, st)  # the kernels: no filters, CUDA
            ref = _torch_path(x, st, monkeypatch)
        assert torch.equal(tokens, ks.sample_plain(x, st.temperature, st.seed, st.step)[0])
        near.append(_check(x, temps, seeds.cpu(), steps.cpu(), tokens, logp, ref, lp_tol=2e-5))
    assert sum(near) / len(near) < 0.05, near  # rows where float32 may pick a neighbour


@pytest.mark.gpu
def test_gpu_filter_rows_take_the_torch_path_and_plain_rows_the_kernels(monkeypatch):
    x, temps = _case(16, V_QWEN3, 3, torch.bfloat16, "cuda", scale=4.0)
    with torch.inference_mode():
        _check_mixed(x, temps, lambda x, st: _torch_path(x, st, monkeypatch))


@pytest.mark.gpu
def test_gpu_kernels_replay_in_a_cuda_graph_like_eager():
    x, temps = _case(64, V_QWEN3, 1, torch.bfloat16, "cuda", scale=4.0)
    seeds, steps = _streams(64, 2, "cuda")
    with torch.inference_mode():
        eager = ks.sample_plain(x, temps, seeds, steps)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ks.sample_plain(x, temps, seeds, steps)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ks.sample_plain(x, temps, seeds, steps)
        steps += 1
        graph.replay()
        again = ks.sample_plain(x, temps, seeds, steps)
    assert not torch.equal(eager[0], again[0])  # the counters moved the draws
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])


@pytest.mark.gpu
def test_gpu_uniform_equals_sampling_uniform_bit_for_bit():
    seeds, steps = _streams(1 << 20, 7, "cuda")
    assert torch.equal(ks.uniform_triton(seeds, steps), uniform(seeds, steps))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1.0, 0.7, 1.6])
def test_gpu_kernel_samples_follow_softmax_chi_square(t):
    """40,000 draws of one request (steps 0..39,999) on a 10-token vocabulary, through sample()."""
    from tests.test_rollout_sampling import CHI2_999, LOGITS, _chi2

    n = 40000
    x = LOGITS[None].expand(n, -1).cuda().bfloat16().float()  # the same values on both sides
    st = SamplingTensors([SamplingParams(temperature=t)] * n, [1234] * n, list(range(n)), "cuda")
    assert ks.available(x)
    with torch.inference_mode():
        tokens, _ = sample(x, st)
    counts = torch.bincount(tokens.cpu(), minlength=10).double()
    stat, df = _chi2(counts, torch.softmax(x[0].cpu().double() / t, -1))
    assert stat < CHI2_999[df], f"chi2 {stat:.1f} >= {CHI2_999[df]} (df {df})"
