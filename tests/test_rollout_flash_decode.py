"""The GPU decode attention (`flash_decode`, Triton) held to its pure-torch reference.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess so that no
other test sees interpreted kernels) in float32, over split and single-chunk grids, rows of length
1 and of the full read length, slots out of order. GPU (`-m gpu`): bf16 at the benchmark's shapes,
and the engine's decode through the kernel against the einsum decode it replaces.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from miles_core.rollout import flash_decode as fd

pytest.importorskip("triton")

# (batch, query heads, kv heads, head dim, cache slots, max_len, read_len)
SHAPES = [
    (3, 8, 2, 16, 5, 300, 260),
    (2, 4, 4, 32, 3, 70, 70),
    (40, 4, 1, 16, 41, 200, 130),
    (260, 8, 4, 16, 261, 80, 65),
]


def _case(b, hq, hkv, d, slots, max_len, read_len, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(device, dtype)
    k = torch.randn(slots, max_len, hkv, d, generator=g).to(device, dtype)
    v = torch.randn(slots, max_len, hkv, d, generator=g).to(device, dtype)
    order = torch.randperm(slots, generator=g)[:b].to(device)
    lengths = torch.randint(1, read_len + 1, (b,), generator=g)
    lengths[0], lengths[-1] = 1, read_len
    return q, k, v, order, lengths.to(device)


def interp_flash_decode() -> None:
    for i, shape in enumerate(SHAPES):
        b, hq, hkv, d, _, _, read_len = shape
        q, k, v, slots, lengths = _case(*shape, torch.float32, "cpu", seed=i)
        got = fd.flash_decode(q, k, v, slots, lengths, d**-0.5, read_len)
        ref = fd.flash_decode_reference(q, k, v, slots, lengths, d**-0.5, read_len)
        assert (got - ref).abs().max().item() < 1e-5, shape
    # quant (head dim 128): each head's output row quantized as the act-quant kernel quantizes the stored
    # rows, bit for bit, through the combine (3 splits) and the one-split kernel
    from miles_core.kernels.fp8_gemm import fp8_act_quant_triton

    for shape in [(3, 8, 2, 128, 5, 300, 260), (130, 4, 2, 128, 131, 80, 65)]:
        b, hq, hkv, d, _, _, read_len = shape
        q, k, v, slots, lengths = _case(*shape, torch.float32, "cpu", seed=7)
        want = fd.flash_decode(q, k, v, slots, lengths, d**-0.5, read_len)
        out, (q8, qs) = fd.flash_decode(q, k, v, slots, lengths, d**-0.5, read_len, quant=True)
        rq, rs = fp8_act_quant_triton(want.reshape(b, -1))
        assert torch.equal(out, want) and torch.equal(q8.view(torch.uint8), rq.view(torch.uint8)), shape
        assert torch.equal(qs, rs) and fd.splits_for(b, hkv, read_len)[0] == (3 if b == 3 else 1), shape
    assert fd.splits_for(64, 4, 1024) == (1, 1024) and fd.splits_for(256, 4, 1024)[0] == 1
    assert fd.splits_for(8, 4, 1024) == (8, 128) and fd.splits_for(8, 4, 768) == (6, 128)


def test_flash_decode_matches_reference_in_interpreter():
    code = (
        "import tests.test_kernels_quant as t; t._fix_interpreter_for_numpy2(); "
        "import tests.test_rollout_flash_decode as f; f.interp_flash_decode()"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape",
    [*SHAPES, (64, 32, 4, 128, 65, 1025, 896), (256, 32, 4, 128, 257, 1025, 1024), (4, 32, 4, 128, 9, 1025, 1000)],
)
def test_gpu_flash_decode_matches_reference_bf16(shape):
    b, hq, hkv, d, _, _, read_len = shape
    q, k, v, slots, lengths = _case(*shape, torch.bfloat16, "cuda")
    got = fd.flash_decode(q, k, v, slots, lengths, d**-0.5, read_len)
    ref = fd.flash_decode_reference(q, k, v, slots, lengths, d**-0.5, read_len)
    assert (got.float() - ref.float()).abs().max().item() <= 2e-2  # a few bf16 ulps of |out| <~ 3
    if d == 128:  # the FP8 rows for o_proj: the act-quant kernel's bits of the same output
        from miles_core.kernels.fp8_gemm import fp8_act_quant_triton

        out, (q8, qs) = fd.flash_decode(q, k, v, slots, lengths, d**-0.5, read_len, quant=True)
        rq, rs = fp8_act_quant_triton(got.reshape(b, -1))
        assert torch.equal(out, got) and torch.equal(q8.view(torch.uint8), rq.view(torch.uint8))
        assert torch.equal(qs, rs)


@pytest.mark.gpu
def test_gpu_engine_on_the_kernel_is_as_close_to_a_full_forward_as_the_einsum_decode(monkeypatch, tmp_path):
    """bf16 on the GPU, CUDA graphs: each recorded log-prob against log_softmax of one full forward
    over prompt+response; the kernel's worst error is at most 2x the einsum decode's + 0.01."""
    from miles_core.model import load_model
    from miles_core.rl.logits import token_logprobs
    from miles_core.rollout import Engine, EngineConfig, Request, SamplingParams, runner
    from tests.test_rollout_fixtures import ragged_prompts
    from tests.tiny_models import CONFIGS, save_hf

    path, _ = save_hf(CONFIGS["qwen3"](), str(tmp_path / "qwen3"))
    model = load_model(path, device="cuda", dtype=torch.bfloat16)
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    reqs = [Request(f"p{i}", p, sp) for i, p in enumerate(ragged_prompts((5, 30, 12, 70), seed=11))]

    def worst() -> float:
        engine = Engine(model, config=EngineConfig(max_slots=4, max_len=128, cuda_graphs=True, graph_len_bucket=32))
        err = 0.0
        for s in engine.generate(reqs):
            ids = torch.tensor([s.prompt_tokens + s.response_tokens], device="cuda")
            with torch.no_grad():
                logits = model(ids).logits
            p = len(s.prompt_tokens)
            ref = token_logprobs(logits[:, p - 1 : -1], ids[:, p:], temperature=1.0)[0].cpu()
            err = max(err, (torch.tensor(s.logprobs) - ref).abs().max().item())
        return err

    kernel = worst()
    monkeypatch.setattr(runner, "flash_decode_ok", lambda *a: False)
    einsum = worst()
    assert kernel <= 2 * einsum + 0.01, (kernel, einsum)
