"""GQAttention.fuse_projections_: q/k/v weights become views of one buffer, `project` runs one GEMM
outside autograd, and every way the parameters change either reaches the buffer or turns the fusion off."""

import copy

import pytest
import torch
from torch import nn

from miles_core.model import load_model
from miles_core.rollout.weights import copy_weights_
from tests.tiny_models import CONFIGS, qwen3_config, save_hf


@pytest.fixture(scope="module", params=["qwen3_moe", "llama"])
def model(request, tmp_path_factory):
    path, _ = save_hf(CONFIGS[request.param](), str(tmp_path_factory.mktemp(request.param)), seed=3)
    return load_model(path).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _separate(attn, x):
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


def test_fused_projection_equals_the_three_and_keeps_parameters(model):
    m = copy.deepcopy(model)
    attn = m.model.layers[0].self_attn
    names = sorted(n for n, _ in m.named_parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = {n: id(p) for n, p in m.named_parameters()}
    x = torch.randn(3, 1, m.config.hidden_size)
    with torch.no_grad():
        want = _separate(attn, x)
    assert attn.fuse_projections_() and attn._fused() is not None
    assert sorted(n for n, _ in m.named_parameters()) == names  # same names, objects and values
    assert all(id(p) == ids[n] and torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert attn.q_proj.weight.data_ptr() == attn._fused()[0].data_ptr()
    with torch.no_grad():
        got = attn.project(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_updates_reach_the_buffer_and_a_replaced_parameter_unfuses(model):
    m = copy.deepcopy(model)
    attn = m.model.layers[0].self_attn
    attn.fuse_projections_()
    x = torch.randn(2, m.config.hidden_size)
    new = torch.randn_like(attn.k_proj.weight)
    copy_weights_(m, {"model.layers.0.self_attn.k_proj.weight": new})  # in place: lands in the buffer
    with torch.no_grad():
        _, k, _ = attn.project(x)
    torch.testing.assert_close(k, nn.functional.linear(x, new, attn.k_proj.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an optimizer-style in-place step on v lands there too
        attn.v_proj.weight.mul_(2.0)
        _, _, v = attn.project(x)
        torch.testing.assert_close(v, attn.v_proj(x), rtol=1e-6, atol=1e-6)
    attn.q_proj.weight = nn.Parameter(torch.randn_like(attn.q_proj.weight))  # no longer a view
    assert attn._fused() is None
    with torch.no_grad():
        q, _, _ = attn.project(x)
    torch.testing.assert_close(q, attn.q_proj(x), rtol=1e-6, atol=1e-6)


def test_training_through_project_reaches_the_parameters(model):
    m = copy.deepcopy(model)
    attn = m.model.layers[0].self_attn
    attn.fuse_projections_()
    x = torch.randn(2, m.config.hidden_size)
    q, k, v = attn.project(x)  # grad enabled: the three projections, so gradients reach the parameters
    (q.sum() + k.sum() + v.sum()).backward()
    assert all(p.grad is not None for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))


def test_quantized_projections_are_not_fused(model):
    from miles_core.quant import quantize_model_

    m = copy.deepcopy(model)
    quantize_model_(m, "int4", scope="linear", group_size=16)
    attn = m.model.layers[0].self_attn
    assert not attn.fuse_projections_() and attn._fused() is None


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    # q/k/v output sizes multiples of the 128-row scale block (256, 128, 128), so FP8 projections fuse
    from miles_core.quant import quantize_model_

    cfg = qwen3_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    path, _ = save_hf(cfg, str(tmp_path_factory.mktemp("qwen3_fp8")), seed=4)
    m = load_model(path).eval()
    quantize_model_(m, "fp8", scope="linear")
    return m


def test_fp8_projections_fuse_weights_and_scales_and_stay_in_step_with_updates(fp8_model):
    from miles_core.quant import Fp8Linear

    m = copy.deepcopy(fp8_model)
    attn = m.model.layers[0].self_attn
    assert type(attn.q_proj) is Fp8Linear
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 1, m.config.hidden_size)
    with torch.no_grad():
        want = _separate(attn, x)
    assert attn.fuse_projections_()
    weight, scale, bias = attn._fused()
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (512, 128) and scale.shape == (4, 1)
    assert attn.k_proj.weight.data_ptr() == weight[256:].data_ptr()
    assert attn.v_proj.weight_scale_inv.data_ptr() == scale[3:].data_ptr()
    got_state = m.state_dict()  # names and values unchanged: the checkpoint slice is the same
    assert sorted(got_state) == sorted(state)
    assert all(torch.equal(_bits(got_state[k]), _bits(v)) for k, v in state.items())
    with torch.no_grad():
        got = attn.project(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    new = torch.randn(128, 128)  # a trainer's bf16/fp32 k weight, requantized into the fused buffer
    copy_weights_(m, {"model.layers.0.self_attn.k_proj.weight": new})
    with torch.no_grad():
        _, k, _ = attn.project(x)
        torch.testing.assert_close(k, attn.k_proj(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(k, want[1])


def test_projections_of_mixed_or_unaligned_types_are_not_fused(fp8_model, tmp_path):
    from miles_core.quant import Fp8Linear, quantize_model_

    path, _ = save_hf(CONFIGS["llama"](), str(tmp_path), seed=5)
    m = load_model(path).eval()  # tiny head_dim: q/k/v output sizes not multiples of 128
    quantize_model_(m, "fp8", scope="linear")
    attn = m.model.layers[0].self_attn
    assert type(attn.q_proj) is Fp8Linear and not attn.fuse_projections_() and attn._fused() is None
    m = copy.deepcopy(fp8_model)
    attn = m.model.layers[0].self_attn
    attn.v_proj = nn.Linear(128, 128, bias=False)  # one plain projection among FP8 ones
    assert not attn.fuse_projections_()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_gpu_fp8_fused_projection_matches_the_three_at_qwen3_30b_shapes(rows):
    # decode rows (the dense Triton kernel) and prefill rows (act-quant + cuBLAS): one FP8 GEMM over the
    # fused weights against three; the same quantized operands, so only the sum order differs
    from miles_core.model.attention import GQAttention
    from miles_core.model.config import ModelConfig
    from miles_core.quant import Fp8Linear

    torch.manual_seed(rows)
    cfg = ModelConfig.from_hf(dict(qwen3_config(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                                                head_dim=128).to_dict()))  # fmt: skip
    attn = GQAttention(cfg).cuda().to(torch.bfloat16).eval()
    for name in ("q_proj", "k_proj", "v_proj"):
        lin = getattr(attn, name)
        torch.nn.init.normal_(lin.weight, std=0.02)
        setattr(attn, name, Fp8Linear.from_linear(lin))
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = _separate(attn, x)
        assert attn.fuse_projections_()
        got = attn.project(x)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and not g.isnan().any()
        assert (g.float() - w.float()).abs().max() <= 2**-7 * w.float().abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp8_decode_reads_the_rows_its_norms_and_flash_quantized_bit_for_bit(monkeypatch):
    # the "fp8" engine at decode: flash decode, and the add + norm before an attention that follows a dense MLP
    # (layer 1 here), write their rows in FP8 too, and the o and q/k/v projections read those instead of
    # quantizing them again: the same logits and experts, bit for bit, as with the act-quant launches
    from miles_core.kernels import fp8_gemm
    from miles_core.model.config import ModelConfig
    from miles_core.model.loader import build_model
    from miles_core.quant import quantize_model_
    from miles_core.rollout import runner
    from tests.test_kernels_add_norm import decode_steps
    from tests.tiny_models import qwen3_moe_config

    hf = qwen3_moe_config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, head_dim=128)
    model = build_model(ModelConfig.from_hf(hf.to_dict()), "cuda", torch.bfloat16).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else noise * (0.05 if p.dim() > 1 else 0.02))
    quantize_model_(model, "fp8")
    assert all(layer.self_attn.fuse_projections_() for layer in model.model.layers)
    calls = {"flash": 0, "dense": 0}
    flash, dense = runner.flash_decode, fp8_gemm.fp8_dense_triton

    def count_flash(*a, quant=False, **kw):
        calls["flash"] += quant
        return flash(*a, quant=quant, **kw)

    def count_dense(*a, xq=None, **kw):
        calls["dense"] += xq is not None
        return dense(*a, xq=xq, **kw)

    monkeypatch.setattr(runner, "flash_decode", count_flash)
    monkeypatch.setattr(fp8_gemm, "fp8_dense_triton", count_dense)
    folded = decode_steps(model, "cuda")
    layers = model.model.layers
    after_dense = sum(not layers[i - 1].is_moe for i in range(1, len(layers)))  # layer 2's q/k/v
    assert after_dense == 1
    # the prefill (44 rows) and 3 decode steps: q/k/v reads the norm's rows after the dense layer; at decode
    # flash quantizes in every layer and o_proj reads its rows
    assert calls == {"flash": 3 * len(layers), "dense": 4 * after_dense + 3 * len(layers)}, calls
    monkeypatch.setattr(runner, "_attn_takes_fp8_rows", lambda *a: False)
    monkeypatch.setattr(runner, "_o_proj_takes_fp8_rows", lambda *a: False)
    calls.update(flash=0, dense=0)
    plain = decode_steps(model, "cuda")
    assert calls == {"flash": 0, "dense": 0}
    for got, want in zip(folded, plain, strict=True):
        assert torch.equal(got, want)
