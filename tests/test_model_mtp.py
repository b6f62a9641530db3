"""MTP layers: loaded from a DeepSeek-V3 checkpoint's extra layer, or created fresh; the MTP loss."""

import torch

from miles_core.model import load_model, mtp_logits, mtp_loss
from miles_core.model.layers import RMSNorm
from tests.tiny_models import CONFIGS, VOCAB, add_mtp_layer, save_hf


def _ids(b=2, t=12, seed=0):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def test_deepseek_mtp_layer_is_loaded_from_checkpoint(tmp_path):
    cfg = CONFIGS["deepseek_v3"]()
    path, _ = save_hf(cfg, str(tmp_path / "ds"))
    written = add_mtp_layer(path, cfg)
    model = load_model(path)
    assert model.mtp is not None and len(model.mtp.layers) == 1
    L = cfg.num_hidden_layers
    layer = model.mtp.layers[0]
    assert torch.equal(layer.eh_proj.weight, written[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(layer.enorm.weight, written[f"model.layers.{L}.enorm.weight"])
    assert torch.equal(layer.final_norm.weight, written[f"model.layers.{L}.shared_head.norm.weight"])
    q = written[f"model.layers.{L}.self_attn.q_a_proj.weight"]
    assert torch.equal(layer.layer.self_attn.q_a_proj.weight, q)
    g = written[f"model.layers.{L}.mlp.experts.3.gate_proj.weight"]
    assert torch.equal(layer.layer.mlp.experts.gate_up_proj[3, : g.shape[0]], g)
    # main model unaffected, and mtp_num_layers=0 skips the extra layer
    assert load_model(path, mtp_num_layers=0).mtp is None


def test_fresh_mtp_layers_for_a_model_without_them(tmp_path):
    path, _ = save_hf(CONFIGS["qwen3_moe"](), str(tmp_path / "q"))
    model = load_model(path, mtp_num_layers=2)
    assert len(model.mtp.layers) == 2
    for mod in model.mtp.modules():
        if isinstance(mod, RMSNorm):
            assert torch.equal(mod.weight, torch.ones_like(mod.weight))
    w = model.mtp.layers[0].eh_proj.weight
    assert 0.01 < w.std().item() < 0.03  # normal(0, initializer_range=0.02)


def test_mtp_loss_finite_and_draft_only_grads(tmp_path):
    cfg = CONFIGS["deepseek_v3"]()
    path, _ = save_hf(cfg, str(tmp_path / "ds"))
    add_mtp_layer(path, cfg)
    model = load_model(path)
    ids = _ids()
    out = model(ids, return_hidden_states=True)
    logits = mtp_logits(model, ids, out.hidden_states)
    assert logits[0].shape == (2, 12, VOCAB)
    loss = mtp_loss(model, ids, out.hidden_states, detach_trunk=True)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        has = p.grad is not None and p.grad.abs().sum().item() > 0
        if name.startswith("mtp."):
            if "e_score" not in name and "experts" not in name:
                assert has, f"MTP parameter {name} got no gradient"
        else:
            assert not has, f"trunk parameter {name} got a gradient in draft-only mode"


def test_mtp_loss_trains_trunk_when_not_detached(tmp_path):
    path, _ = save_hf(CONFIGS["qwen3_moe"](), str(tmp_path / "q"))
    model = load_model(path, mtp_num_layers=1)
    ids = _ids(seed=3)
    out = model(ids, return_hidden_states=True)
    mtp_loss(model, ids, out.hidden_states).backward()
    assert model.model.embed_tokens.weight.grad.abs().sum().item() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum().item() > 0


def test_mtp_loss_matches_manual_cross_entropy(tmp_path):
    path, _ = save_hf(CONFIGS["qwen3"](), str(tmp_path / "d"))
    model = load_model(path, mtp_num_layers=1)
    ids = _ids(1, 10, seed=4)
    with torch.no_grad():
        hidden = model(ids, return_hidden_states=True).hidden_states
        lg = mtp_logits(model, ids, hidden)[0]
        # position t predicts ids[t+2]
        manual = torch.nn.functional.cross_entropy(lg[0, :8], ids[0, 2:])
        assert torch.allclose(mtp_loss(model, ids, hidden), manual, atol=1e-6)
