"""GQAttention.fuse_projections_: q/k/v weights become views of one buffer, `project` runs one GEMM
outside autograd, and every way the parameters change either reaches the buffer or turns the fusion off."""

import copy

import pytest
import torch
from torch import nn

from miles_core.model import load_model
from miles_core.rollout.weights import copy_weights_
from tests.tiny_models import CONFIGS, save_hf


@pytest.fixture(scope="module", params=["qwen3_moe", "llama"])
def model(request, tmp_path_factory):
    path, _ = save_hf(CONFIGS[request.param](), str(tmp_path_factory.mktemp(request.param)), seed=3)
    return load_model(path).eval()


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
