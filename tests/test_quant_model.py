"""Quantization end to end on tiny random Qwen3-MoE checkpoints written by transformers.

- QAT identity: the forward with INT4 fake-quant experts equals, bit for bit (CPU fp32), the forward
  of the model loaded from the INT4 checkpoint that `miles quantize` wrote.
- FP8 interop: transformers loads miles' FP8 checkpoint with its own FP8 support
  (`FineGrainedFP8Config(dequantize=True)`, the CPU path) and its logits match miles' forward on the
  same checkpoint: exactly dequantized weights to fp32 rounding (rel. 1e-5), and miles' FP8 forward
  (activations also quantized in 1x128 tiles, which transformers' CPU path does not do) within FP8
  tolerance: relative logits error < 0.15 and top-1 agreement >= 80%.
- A torch_dist source goes through the checkpoint converter to the same INT4 checkpoint.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import typer
from typer.testing import CliRunner

from miles_core.quant import Fp8Linear, QuantExperts, enable_qat, quantize_checkpoint, quantize_model_

transformers = pytest.importorskip("transformers")


def _tiny_qwen3_moe(path, hidden=64, heads=4, kv=2, head_dim=16, moe_inter=32, inter=96, vocab=128, seed=0):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1],
        max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # spread the router so that every expert is used
        for p in model.parameters():
            p.normal_(0, 0.08) if p.ndim > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(path)
    return model


def _cli(args: list[str]) -> None:
    from flows.commands.quantize import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)


def test_qat_fake_quant_forward_equals_int4_checkpoint_forward_bitwise(tmp_path):
    from miles_core.model import load_model

    hf, q = str(tmp_path / "hf"), str(tmp_path / "int4")
    _tiny_qwen3_moe(hf)
    _cli(["quantize", "--src", hf, "--out", q, "--format", "int4", "--group-size", "32"])
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))

    rollout = load_model(q)  # dequantizes the INT4 experts on load
    trainer = load_model(hf)
    with torch.no_grad():
        plain = trainer(ids).logits
        assert enable_qat(trainer, "int4", group_size=32) == ["model.layers.0.mlp.experts"]
        fake = trainer(ids).logits
        real = rollout(ids).logits
    assert torch.equal(fake, real)
    assert not torch.equal(plain, real)  # the quantization is visible: the test could fail
    # and the fake-quant forward is differentiable, with straight-through gradients
    trainer(ids).logits.sum().backward()
    assert trainer.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_qat_fake_quant_fp8_forward_equals_fp8_checkpoint_forward_bitwise(tmp_path):
    from miles_core.model import load_model

    hf, q = str(tmp_path / "hf"), str(tmp_path / "fp8")
    # moe_intermediate_size 128: the stacked gate_up blocks are the per-expert gate/up blocks on disk
    _tiny_qwen3_moe(hf, hidden=256, heads=4, kv=2, head_dim=64, moe_inter=128, inter=384, vocab=256)
    quantize_checkpoint(hf, q, "fp8")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    trainer = load_model(hf)
    names = enable_qat(trainer, "fp8", linear_pattern=r"(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$")
    assert len(names) == 4 + 1 + 4 + 3  # attention x2 layers, experts, dense MLP
    with torch.no_grad():
        assert torch.equal(trainer(ids).logits, load_model(q)(ids).logits)


def test_fp8_checkpoint_loads_in_transformers_and_matches_miles(tmp_path):
    pytest.importorskip("accelerate")
    from miles_core.model import load_model

    hf, q = str(tmp_path / "hf"), str(tmp_path / "fp8")
    # dims that are multiples of 128 (or under 128): transformers infers the block from the grid
    _tiny_qwen3_moe(hf, hidden=256, heads=4, kv=2, head_dim=64, moe_inter=128, inter=384, vocab=256)
    quantize_checkpoint(hf, q, "fp8")
    with open(os.path.join(q, "config.json")) as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        q, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.float32
    )
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(2))
    miles = load_model(q)
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
        dequant = miles(ids).logits
        swapped = quantize_model_(miles, "fp8")
        fp8 = miles(ids).logits

    def rel(a):
        return float((a - ref).norm() / ref.norm())

    assert rel(dequant) < 1e-5, rel(dequant)
    assert isinstance(miles.model.layers[0].self_attn.q_proj, Fp8Linear)
    assert isinstance(miles.model.layers[0].mlp.experts, QuantExperts)
    # Activation quantization alone costs ~2.6% RMS per quantized input (e4m3, 1x128 tiles, Gaussian
    # data), compounded over the 2 layers' 9 quantized matmuls: measured 0.089; bound 0.15.
    agree = float((fp8.argmax(-1) == ref.argmax(-1)).float().mean())
    assert "lm_head" not in swapped and 0 < rel(fp8) < 0.15 and agree >= 0.8, (rel(fp8), agree)


def test_torch_dist_source_quantizes_like_its_hf_source(tmp_path):
    ck = pytest.importorskip("miles_core.checkpoint")
    if not hasattr(ck, "hf_to_torch_dist"):
        pytest.skip("no torch_dist converter")
    from miles_core.model import iter_hf_tensors

    hf = str(tmp_path / "hf")
    _tiny_qwen3_moe(hf)
    ck.hf_to_torch_dist(hf, str(tmp_path / "td"))
    quantize_checkpoint(hf, str(tmp_path / "a"), "int4", group_size=32)
    quantize_checkpoint(str(tmp_path / "td"), str(tmp_path / "b"), "int4", group_size=32)
    a, b = dict(iter_hf_tensors(str(tmp_path / "a"))), dict(iter_hf_tensors(str(tmp_path / "b")))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".miles-quant-src")]
