"""Fused Triton kernels of the training/rollout path against float64 torch references: the token
log-prob / entropy kernel (miles_core.kernels.logprobs), the MoE combine (moe_combine) and SwiGLU
(swiglu); the last two are described at their sections below.

Log-probs and entropy:

Reference: `miles_core.rl.logprobs_and_entropy` in float64 with autograd, the CPU path of the
trainer. Checked: log-probs, entropy, and the logits' gradient through either output or both, with
a temperature, masked (-inf) logits and a vocabulary that is not a multiple of the block.

CPU: the Triton kernels run under the interpreter (a subprocess, as in test_kernels_quant) on small
shapes in fp32/fp16 (the interpreter has no bf16). GPU (`-m gpu`): a 151,936 vocabulary in bf16 and
fp32 with outputs poisoned, and the trainer's `policy_forward` on CUDA against the same model on
the CPU. Bounds: log-probs and entropy 2e-5 absolute for fp32 logits (float32 sums over the
vocabulary, a different reduction order); gradients 1e-5 of the largest |grad| for fp32 output,
half a unit of bf16/fp16 rounding (4e-3 / 5e-4 relative) otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from miles_core.rl import logprobs_and_entropy


def _case(n: int, v: int, dtype: torch.dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype)
    x[0, 7 : v // 3] = float("-inf")  # a masked stretch of vocabulary, as a logits processor leaves
    tok = torch.randint(0, v, (n,), generator=g)
    tok[0] = 3  # a live token in the masked row
    gl, ge = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(device), tok.to(device), gl.to(device), ge.to(device)


def _reference(x, tok, t, gl, ge):
    xr = x.double().requires_grad_(True)
    lp, ent = logprobs_and_entropy(xr[None], tok[None], t)
    out = []
    for wl, we in ((gl, ge), (gl, None), (None, ge)):
        xr.grad = None
        lp, ent = logprobs_and_entropy(xr[None], tok[None], t)
        loss = sum(((o[0] * w).sum() for o, w in ((lp, wl), (ent, we)) if w is not None), torch.zeros(()))
        loss.backward()
        out.append(xr.grad.clone())
    return lp[0].detach(), ent[0].detach(), out


def _interpreted(check: str) -> None:
    """Run `check()` of this module in a subprocess with the Triton interpreter on (CPU tensors)."""
    code = f"import tests.test_kernels_quant as q; q._fix_interpreter_for_numpy2(); import tests.test_kernels_fused as t; t.{check}()"  # noqa: E501
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _fused(x, tok, t, gl, ge):
    from miles_core.kernels.logprobs import _FusedLogprobs

    grads = []
    for wl, we in ((gl, ge), (gl, None), (None, ge)):
        xk = x.clone().requires_grad_(True)
        lp, ent = _FusedLogprobs.apply(xk, tok, t)
        terms = [(o * w.float()).sum() for o, w in ((lp, wl), (ent, we)) if w is not None]
        sum(terms).backward()
        grads.append(xk.grad)
    return lp.detach(), ent.detach(), grads


def _check(n, v, dtype, t, device, seed=0):
    x, tok, gl, ge = _case(n, v, dtype, device, seed)
    lp_r, ent_r, grads_r = _reference(x.cpu(), tok.cpu(), t, gl.cpu(), ge.cpu())
    lp, ent, grads = _fused(x, tok, t, gl, ge)
    assert (lp.cpu().double() - lp_r).abs().max() < 2e-5, (lp.cpu().double() - lp_r).abs().max()
    assert (ent.cpu().double() - ent_r).abs().max() < 2e-5 * max(1.0, float(ent_r.abs().max()))
    bound = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]
    for g, r in zip(grads, grads_r, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all()
        err = (g.cpu().double() - r).abs().max() / r.abs().max()
        assert err < bound, (dtype, float(err))


def interp_fused_logprobs():
    for n, v, dtype, t in [(3, 9000, torch.float32, 1.0), (2, 4096, torch.float32, 0.7), (3, 5000, torch.float16, 1.3)]:
        _check(n, v, dtype, t, "cpu")


def test_fused_logprobs_match_reference_in_interpreter():
    _interpreted("interp_fused_logprobs")


# ---- GPU ----------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_logprobs_match_reference(dtype):
    from tests.test_kernels_quant import _poison

    for n, v, t, seed in [(64, 151936, 1.0, 0), (37, 151936, 0.6, 1), (5, 1000, 1.0, 2)]:
        _poison()
        _check(n, v, dtype, t, "cuda", seed)


@cuda
@pytest.mark.gpu
def test_gpu_policy_forward_uses_fused_path_and_matches_cpu():
    from miles_core.train import TrainConfig, Trainer, samples_from_table
    from miles_core.train.logprobs import policy_forward
    from tests.test_train_gpu import _table
    from tests.test_train_support import tiny_model

    model = tiny_model(seed=0)
    trainer = Trainer(model, TrainConfig(micro_batch_tokens=512))
    mb = trainer.micro_batches(samples_from_table(_table(model)))[0]
    cpu = policy_forward(model, mb, temperature=0.8, entropy=True)
    gpu = policy_forward(model.cuda(), mb.to("cuda"), temperature=0.8, entropy=True)
    assert (gpu.logp.cpu() - cpu.logp).abs().max() < 1e-4
    assert (gpu.entropy.cpu() - cpu.entropy).abs().max() < 1e-4


# ---- MoE combine (miles_core.kernels.moe_combine) -----------------------------------------------
# Reference: the pure-torch tail of `miles_core.model.moe.dispatch` (index_select + einsum), in
# float64. Forward and both gradients; k = 1 and k = 8; H not a multiple of the kernel's block.


def _combine_case(n, k, h, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    ys = torch.randn(n * k, h, generator=g).to(dtype)
    inverse = torch.randperm(n * k, generator=g)
    w = torch.rand(n, k, generator=g).to(dtype)
    grad = torch.randn(n, h, generator=g).to(dtype)
    return ys.to(device), inverse.to(device), w.to(device), grad.to(device)


def _check_combine(n, k, h, dtype, device, seed=0):
    from miles_core.kernels.moe_combine import _Combine

    ys, inv, w, grad = _combine_case(n, k, h, dtype, device, seed)
    ys_r, w_r = ys.cpu().double().requires_grad_(True), w.cpu().double().requires_grad_(True)
    ref = torch.einsum("nkh,nk->nh", ys_r.index_select(0, inv.cpu()).view(n, k, h), w_r)
    ref.backward(grad.cpu().double())
    ys_k, w_k = ys.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = _Combine.apply(ys_k, inv, w_k)
    out.backward(grad)
    bound = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for got, want in ((out, ref), (ys_k.grad, ys_r.grad), (w_k.grad, w_r.grad)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        err = (got.detach().cpu().double() - want.detach()).abs().max() / want.detach().abs().max()
        assert err < bound, (dtype, float(err))


def interp_moe_combine():
    for n, k, h, dtype in [(5, 3, 1500, torch.float32), (4, 1, 64, torch.float32), (3, 8, 2100, torch.float16)]:
        _check_combine(n, k, h, dtype, "cpu")


def test_moe_combine_matches_reference_in_interpreter():
    _interpreted("interp_moe_combine")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_moe_combine_matches_reference(dtype):
    from tests.test_kernels_quant import _poison

    for n, k, h, seed in [(8192, 8, 2048, 0), (300, 8, 7168, 1), (17, 1, 96, 2), (64, 6, 2000, 3)]:
        _poison()
        _check_combine(n, k, h, dtype, "cuda", seed)


# ---- SwiGLU (miles_core.kernels.swiglu) ---------------------------------------------------------
# Reference: `torch_swiglu` (chunk, silu, product) in float64, forward and the [M, 2I] gradient.


def _check_swiglu(m, i, dtype, device, seed=0):
    from miles_core.kernels.swiglu import _SwiGLU, torch_swiglu

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, 2 * i, generator=g) * 3).to(dtype)
    grad = torch.randn(m, i, generator=g).to(dtype)
    xr = x.double().requires_grad_(True)
    ref = torch_swiglu(xr)
    ref.backward(grad.double())
    xk = x.to(device).requires_grad_(True)
    out = _SwiGLU.apply(xk)
    out.backward(grad.to(device))
    bound = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for got, want in ((out, ref), (xk.grad, xr.grad)):
        assert got.dtype == dtype and got.shape == want.shape and torch.isfinite(got).all()
        err = (got.detach().cpu().double() - want.detach()).abs().max() / want.detach().abs().max()
        assert err < bound, (dtype, float(err))


def interp_swiglu():
    for m, i, dtype in [(7, 300, torch.float32), (3, 1024, torch.float32), (5, 96, torch.float16)]:
        _check_swiglu(m, i, dtype, "cpu")


def test_swiglu_matches_reference_in_interpreter():
    _interpreted("interp_swiglu")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_swiglu_matches_reference(dtype):
    from tests.test_kernels_quant import _poison

    for m, i, seed in [(65536, 768, 0), (513, 2048, 1), (1, 96, 2)]:
        _poison()
        _check_swiglu(m, i, dtype, "cuda", seed)
