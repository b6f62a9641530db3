"""Routing record and replay (R3) on every MoE layer."""

import pytest
import torch

from miles_core.errors import MilesError
from miles_core.model import load_model
from tests.tiny_models import CONFIGS, VOCAB, save_hf


@pytest.fixture(params=["qwen3_moe", "deepseek_v3"])
def moe_model(request, tmp_path):
    path, _ = save_hf(CONFIGS[request.param](), str(tmp_path / request.param))
    return load_model(path)


def _ids(seed=0, b=2, t=13):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_record_shape_and_range(moe_model):
    cfg = moe_model.config
    out = moe_model(_ids(), return_routed_experts=True)
    assert out.routed_experts.shape == (2, 13, len(cfg.moe_layers), cfg.num_experts_per_tok)
    assert out.routed_experts.dtype == torch.int32
    assert int(out.routed_experts.min()) >= 0 and int(out.routed_experts.max()) < cfg.num_experts
    # top-k picks distinct experts per token
    sorted_ids = out.routed_experts.sort(-1).values
    assert bool((sorted_ids[..., 1:] != sorted_ids[..., :-1]).all())


def test_replay_of_recorded_experts_is_bit_identical(moe_model):
    ids = _ids(1)
    with torch.no_grad():
        rec = moe_model(ids, return_routed_experts=True)
        rep = moe_model(ids, routed_experts=rec.routed_experts, return_routed_experts=True)
    assert torch.equal(rec.logits, rep.logits)
    assert torch.equal(rec.routed_experts, rep.routed_experts)


def test_replay_forces_selection_under_perturbed_router_and_router_gets_gradient(moe_model):
    ids = _ids(2)
    with torch.no_grad():
        rec = moe_model(ids, return_routed_experts=True).routed_experts
        for i in moe_model.moe_layer_ids:
            gate = moe_model.model.layers[i].mlp.gate
            gate.weight.add_(torch.randn_like(gate.weight) * 0.5)
        free = moe_model(ids, return_routed_experts=True).routed_experts
    assert not torch.equal(free, rec), "perturbation should change the router's own choice"
    out = moe_model(ids, routed_experts=rec, return_routed_experts=True)
    assert torch.equal(out.routed_experts, rec)
    out.logits.float().square().mean().backward()
    for i in moe_model.moe_layer_ids:
        g = moe_model.model.layers[i].mlp.gate.weight.grad
        assert g is not None and g.abs().sum().item() > 0


def test_replay_rejects_wrong_shape_and_ids(moe_model):
    ids = _ids()
    rec = moe_model(ids, return_routed_experts=True).routed_experts
    with pytest.raises(MilesError, match="shape"):
        moe_model(ids, routed_experts=rec[:, :-1])
    bad = rec.clone()
    bad[0, 0, 0, 0] = moe_model.config.num_experts
    with pytest.raises(MilesError, match="outside"):
        moe_model(ids, routed_experts=bad)


def test_dense_model_records_nothing(tmp_path):
    path, _ = save_hf(CONFIGS["llama"](), str(tmp_path / "llama"))
    out = load_model(path)(_ids(), return_routed_experts=True)
    assert out.routed_experts is None
