"""The one-launch MoE routing kernel (miles_core.kernels.moe_route) held to its pure-torch reference.

CPU: the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, in a subprocess so that no
other test sees interpreted kernels) on float32 logits: top-k experts equal torch.topk's (ties
broken towards the lower id: torch.topk's tie order is unspecified, so the reference is a stable
descending sort), weights within 2e-7 of the float32 softmax reference, and the plan
(src, inverse, counts) *equal* to the stable argsort's, for k and expert counts that are and are
not powers of two, chunks that end mid-way and duplicate experts in a row (replayed inputs).

GPU (`-m gpu`): bf16 router logits at the decode shapes (64 and 256 tokens, 128 experts, top-8)
with outputs poisoned; weights equal the reference's bf16 weights up to 1 bf16 ulp (the float32
sums may differ in reduction order), experts and plan equal; and a float32 Qwen3-MoE layer (no
ties) through `MoE.forward` with the kernel equals the torch path (1e-5 relative).
"""

from __future__ import annotations

import pytest
import torch

from miles_core.kernels import moe_route as mr
from tests.test_kernels_quant import _run_interpreted

pytest.importorskip("triton")

# (tokens, k, experts)
SHAPES = [(24, 8, 128), (5, 2, 8), (33, 3, 10), (1, 1, 4), (9, 6, 256)]  # the interpreter runs programs one by one


def _logits(n: int, e: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, e, generator=g) * 2
    x[0, : e // 2] = x[0, 0]  # ties in row 0: the lower id wins
    return x.to(device, dtype)


def _reference(x, k, renorm, scaling, dtype):
    """topk_route_reference with ties broken towards the lower id (torch.topk's tie order is unspecified)."""
    scores = torch.softmax(x.float(), -1)
    experts = torch.sort(scores, dim=-1, descending=True, stable=True)[1][:, :k]
    w_ref, ex_ref = mr.topk_route_reference(x, k, renorm, scaling, dtype)
    assert torch.equal(scores.gather(1, experts), scores.gather(1, ex_ref))  # the same values chosen
    w = scores.gather(1, experts)
    w = w / w.sum(-1, keepdim=True) if renorm else w
    return (w * scaling if scaling != 1.0 else w).to(dtype), experts


def _check_plan(plan, experts, n_experts):
    src, inverse, counts = plan
    ref = mr.sort_route_reference(experts.cpu(), n_experts)
    for got, want, name in zip((src, inverse, counts), ref, ("src", "inverse", "counts"), strict=True):
        assert torch.equal(got.cpu(), want), name


def interp_route() -> None:
    for i, (n, k, e) in enumerate(SHAPES):
        x = _logits(n, e, i)
        for renorm, scaling, tile in ((True, 1.0, None), (False, 2.5, (1, 2))):  # (1, 2): a token per top-k program
            w, ex, plan = mr.topk_route(x, k, renorm, scaling, torch.float32, tile=tile)
            w_ref, ex_ref = _reference(x, k, renorm, scaling, torch.float32)
            assert torch.equal(ex, ex_ref), (n, k, e)
            assert (w - w_ref).abs().max() <= 2e-7 * max(1.0, scaling), (n, k, e)
            _check_plan(plan, ex, e)
        # the sort alone, with a duplicate expert in a row (what a replay may hold)
        g = torch.Generator().manual_seed(100 + i)
        given = torch.randint(0, e, (n, k), generator=g)
        given[0, :] = e - 1
        _check_plan(mr.sort_route(given, e), given, e)
        _check_plan(mr.sort_route(given, e, tile=(4, 1)), given, e)


def test_route_kernel_matches_reference_in_interpreter():
    _run_interpreted("interp_route", "tests.test_kernels_moe_route")


def test_route_ok_only_for_small_inference_batches_on_cuda():
    x = torch.zeros(4, 8)
    assert not mr.route_ok(x, 4, 2, 8)  # CPU: the torch path
    assert mr.sort_route_reference(torch.tensor([[1, 0], [0, 1]]), 2)[0].tolist() == [0, 1, 0, 1]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("n", [64, 256, 7])
def test_gpu_route_kernel_matches_reference_bf16(n):
    torch.cuda.empty_cache()
    k, e = 8, 128
    x = _logits(n, e, n, torch.bfloat16, "cuda")
    with torch.inference_mode():
        junk = torch.empty(64 << 20, dtype=torch.uint8, device="cuda").fill_(0xFF)  # poison freed memory
        del junk
        w, ex, plan = mr.topk_route(x, k, True, 1.0, torch.bfloat16)
        w_ref, ex_ref = _reference(x, k, True, 1.0, torch.bfloat16)
    assert torch.equal(ex, ex_ref)
    ulp = (w_ref.float().abs() * 2**-7).clamp_min(1e-30)
    assert ((w.float() - w_ref.float()).abs() <= ulp).all()
    _check_plan(plan, ex, e)
    given = torch.randint(0, e, (n, k), device="cuda")
    with torch.inference_mode():
        _check_plan(mr.sort_route(given, e), given, e)
        _check_plan(mr.sort_route(given, e, tile=(4, 1)), given, e)


@pytest.mark.gpu
@cuda
def test_gpu_moe_layer_with_route_kernel_equals_torch_path(monkeypatch):
    from miles_core.model.config import ModelConfig
    from miles_core.model.moe import MoE
    from tests.tiny_models import qwen3_moe_config

    cfg = ModelConfig.from_hf(qwen3_moe_config(num_experts=128, num_experts_per_tok=8, hidden_size=256).to_dict())
    torch.manual_seed(0)
    moe = MoE(cfg).cuda()  # float32: no ties in the router's logits, so torch.topk's tie order cannot differ
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 64, 256, device="cuda")
    with torch.inference_mode():
        out, experts = moe(x)
        monkeypatch.setattr(mr, "MAX_SLOTS", 0)  # the torch path
        ref, ref_experts = moe(x)
    assert torch.equal(experts, ref_experts)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
