"""FP8 block / INT4 group quantization: error bounds, packing, edge cases, QAT straight-through,
the quantized layers' CPU reference, and the quantize stage (HF checkpoint -> FP8 / INT4 and back)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from miles_core.errors import MilesError
from miles_core.quant import (
    FP8_MAX,
    Fp8Linear,
    Int4Linear,
    dequantize_hf_tensors,
    enable_qat,
    fake_quant_fp8,
    fake_quant_int4,
    fp8_act_dequantize,
    fp8_act_quantize_reference,
    fp8_block_dequantize,
    fp8_block_quantize,
    int4_group_dequantize,
    int4_group_quantize,
    pack_int4,
    quantize_checkpoint,
    quantize_model_,
    unpack_int4,
)

ODD_SHAPES = [(1, 1), (7, 300), (128, 128), (130, 257), (256, 384), (300, 129)]


def _blocks(t: torch.Tensor, b: int = 128) -> torch.Tensor:
    # [r, c] -> per-element block max of |t| (for relative error bounds)
    r, c = t.shape
    gr, gc = -(-r // b), -(-c // b)
    p = torch.nn.functional.pad(t.abs(), (0, gc * b - c, 0, gr * b - r)).view(gr, b, gc, b)
    amax = p.amax(dim=(1, 3))
    return amax.repeat_interleave(b, 0).repeat_interleave(b, 1)[:r, :c]


# ---- FP8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_fp8_block_roundtrip_error_within_half_ulp_of_e4m3(shape):
    w = torch.randn(*shape) * torch.logspace(-3, 2, shape[1])  # columns over 5 decades
    q, s = fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128)) and s.dtype == torch.float32
    d = fp8_block_dequantize(q, s)
    err = (d - w).abs()
    # e4m3 has 3 mantissa bits: rounding error <= 2^-4 relative for normals, and the subnormal
    # spacing 2^-9 * scale below 2^-6 * scale.
    scale = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    bound = torch.maximum(w.abs() * 2.0**-4, scale * 2.0**-10) * 1.0001
    assert bool((err <= bound).all()), float((err / bound).max())
    # the block maximum maps to 448 exactly (full use of the range)
    assert torch.allclose(_blocks(d), _blocks(w), rtol=2**-4)
    assert float(q.float().abs().max()) == FP8_MAX


def test_fp8_zero_block_has_unit_scale_and_zero_values():
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    q, s = fp8_block_quantize(w)
    assert s[0, 1] == 1.0 and torch.isfinite(s).all()
    assert torch.equal(fp8_block_dequantize(q, s)[:128, 128:], torch.zeros(128, 128))


def test_fp8_pow2_scales_are_powers_of_two_and_never_overflow():
    w = torch.randn(200, 300) * 3.7
    q, s = fp8_block_quantize(w, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    assert float(q.float().abs().max()) <= FP8_MAX
    assert torch.isfinite(q.float()).all()
    assert (fp8_block_dequantize(q, s) - w).abs().max() <= (w.abs().max() * 2**-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_rejected_not_saturated(bad):
    w = torch.randn(64, 64)
    w[3, 5] = bad
    with pytest.raises(MilesError, match="NaN/inf"):
        fp8_block_quantize(w)
    with pytest.raises(MilesError, match="NaN/inf"):
        int4_group_quantize(w, 32)


@pytest.mark.parametrize("shape", [(1, 5), (3, 128), (17, 300)])
def test_fp8_activation_quant_1x128_error_bound(shape):
    x = torch.randn(*shape) * 10
    q, s = fp8_act_quantize_reference(x)
    assert s.shape == (shape[0], -(-shape[1] // 128))
    d = fp8_act_dequantize(q, s)
    bound = torch.maximum(x.abs() * 2.0**-4, s.repeat_interleave(128, 1)[:, : shape[1]] * 2.0**-10) * 1.0001
    assert bool(((d - x).abs() <= bound).all())


# ---- INT4 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,group", [((4, 128), 128), ((7, 300), 128), ((33, 96), 32), ((5, 13), 8)])
def test_int4_error_at_most_half_a_step(shape, group):
    w = torch.randn(*shape) * torch.logspace(-2, 1, shape[1])
    q, s = int4_group_quantize(w, group)
    assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
    assert s.shape == (shape[0], -(-shape[1] // group)) and s.dtype == torch.bfloat16
    d = int4_group_dequantize(q, s, group)
    step = s.float().repeat_interleave(group, -1)[:, : shape[1]]
    assert bool(((d - w).abs() <= step / 2 * (1 + 1e-6)).all())
    # the largest element of every group is represented to within half a step of +-7 * scale
    assert int(q.abs().amax()) == 7


def test_int4_zero_group_is_exact_zero():
    w = torch.randn(4, 64)
    w[1, :32] = 0
    q, s = int4_group_quantize(w, 32)
    assert float(s[1, 0]) == 1.0
    assert torch.equal(int4_group_dequantize(q, s, 32)[1, :32], torch.zeros(32))


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 64, 131])
def test_int4_pack_unpack_is_exact(cols):
    q = torch.randint(-8, 8, (5, cols), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.int32 and p.shape == (5, -(-cols // 8))
    assert torch.equal(unpack_int4(p, cols), q)


def test_int4_packing_order_matches_compressed_tensors():
    # compressed-tensors pack_to_int32: value + 8 as a nibble, column 8j+i at bits 4i of word j.
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7, 5]], dtype=torch.int8)
    expected0 = sum(((v + 8) & 0xF) << (4 * i) for i, v in enumerate(q[0, :8].tolist()))
    expected0 = expected0 - (1 << 32) if expected0 >= 1 << 31 else expected0
    p = pack_int4(q)
    assert p.tolist() == [[expected0, 5 + 8]]


def test_int4_requantizing_dequantized_weights_is_idempotent():
    w = torch.randn(16, 256)
    q, s = int4_group_quantize(w, 128)
    q2, s2 = int4_group_quantize(int4_group_dequantize(q, s, 128), 128)
    assert torch.equal(q, q2) and torch.equal(s, s2)


# ---- QAT ----------------------------------------------------------------------------------------


def test_fake_quant_int4_forward_equals_dequantized_checkpoint_values_bitwise():
    w = torch.randn(3, 64, 96)
    q, s = int4_group_quantize(w, 32)
    assert torch.equal(fake_quant_int4(w, 32), int4_group_dequantize(unpack_int4(pack_int4(q), 96), s, 32))


@pytest.mark.parametrize("fn", [lambda w: fake_quant_int4(w, 32), fake_quant_fp8])
def test_ste_gradient_is_identity(fn):
    w = (torch.randn(130, 160) * 2).requires_grad_()
    g = torch.randn(130, 160)
    out = fn(w)
    assert not torch.equal(out.detach(), w.detach())  # it does quantize
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_enable_qat_sets_expert_transform_and_linear_swap_keeps_state_dict():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 8, 16))
            self.down_proj = torch.nn.Parameter(torch.randn(2, 16, 4))
            self.weight_transform = None

    model = torch.nn.ModuleDict({"experts": Experts(), "q_proj": torch.nn.Linear(16, 16)})
    keys = set(model.state_dict())
    names = enable_qat(model, "int4", group_size=8, linear_pattern=r"q_proj$")
    assert names == ["experts", "q_proj"] and set(model.state_dict()) == keys
    x = torch.randn(3, 16)
    expect = torch.nn.functional.linear(x, fake_quant_int4(model.q_proj.weight, 8), model.q_proj.bias)
    assert torch.equal(model.q_proj(x), expect)
    assert torch.equal(
        model.experts.weight_transform(model.experts.down_proj), fake_quant_int4(model.experts.down_proj, 8)
    )


# ---- layers (CPU reference) ------------------------------------------------------------------------


def test_fp8_linear_matches_dense_within_fp8_tolerance():
    lin = torch.nn.Linear(256, 384)
    x = torch.randn(5, 7, 256)
    with torch.no_grad():
        ref = lin(x)
    with torch.no_grad():
        y = Fp8Linear.from_linear(lin)(x)
    rel = float((y - ref).norm() / ref.norm())
    assert y.shape == ref.shape and rel < 0.05, rel


def test_int4_linear_equals_dense_linear_on_dequantized_weights():
    lin = torch.nn.Linear(200, 48)
    layer = Int4Linear.from_linear(lin, group_size=64)
    w = int4_group_dequantize(*int4_group_quantize(lin.weight.detach(), 64), 64)
    x = torch.randn(6, 200)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)


def test_int4_linear_stores_column_tiles_and_hands_out_the_checkpoint_layout():
    # group 128, whole column tiles: the words are stored in `repack_tiles` order (what the decode kernels read
    # fastest), same shape; state_dict, `packed_rows`, loading and weight updates all speak the checkpoint's rows
    from miles_core.kernels.w4a16_gemm import w4a16_linear_reference
    from miles_core.rollout.weights import copy_weights_

    torch.manual_seed(0)
    lin, other = torch.nn.Linear(256, 128), torch.nn.Linear(256, 128)
    q, s = int4_group_quantize(lin.weight.detach(), 128)
    rows = pack_int4(q)
    layer = Int4Linear.from_linear(lin, 128)
    assert layer.tile == 32 and layer.weight_packed.shape == rows.shape  # `repack_width`: 64 from 8,192 rows
    assert not torch.equal(layer.weight_packed, rows)
    assert torch.equal(layer.weight_packed.flatten().sort()[0], rows.flatten().sort()[0])
    assert torch.equal(layer.packed_rows(), rows) and torch.equal(layer.state_dict()["weight_packed"], rows)
    x = torch.randn(5, 256)
    want = w4a16_linear_reference(x, rows, s, 128, lin.bias)
    assert torch.equal(layer(x), want)
    for assign in (False, True):  # a checkpoint slice (rows layout) loads into the tiles
        fresh = Int4Linear.from_linear(other, 128)
        fresh.load_state_dict(layer.state_dict(), assign=assign)
        assert torch.equal(fresh.weight_packed, layer.weight_packed) and torch.equal(fresh(x), want), assign
    for source in (lin, layer, layer.state_dict()):  # weight updates: bf16 (requantized), an INT4 module, a dict
        fresh = Int4Linear.from_linear(other, 128)
        graph_storage = fresh.weight_packed.data_ptr()
        copy_weights_(fresh, source)
        assert fresh.weight_packed.data_ptr() == graph_storage, type(source)
        assert torch.equal(fresh.weight_packed, layer.weight_packed) and torch.equal(fresh(x), want), type(source)
    for shape, group in (((256, 80), 128), ((200, 128), 128), ((256, 128), 64)):  # no whole tiles: rows kept
        small = Int4Linear.from_linear(torch.nn.Linear(*shape), group)
        assert small.tile == 0 and torch.equal(small.weight_packed, small.state_dict()["weight_packed"])


def test_quantize_model_swaps_linear_keeps_router_and_head():
    model = torch.nn.ModuleDict({
        "q_proj": torch.nn.Linear(128, 128), "lm_head": torch.nn.Linear(128, 10),
        "mlp": torch.nn.ModuleDict({"gate": torch.nn.Linear(128, 4)}),
    })  # fmt: skip
    names = quantize_model_(model, "fp8")
    assert names == ["q_proj"] and isinstance(model.q_proj, Fp8Linear)
    assert type(model.lm_head) is torch.nn.Linear and type(model.mlp.gate) is torch.nn.Linear


# ---- checkpoints ----------------------------------------------------------------------------------


def _write_hf(path, tensors: dict, stacked: bool = False):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64}, f)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write("{}")


def _toy_tensors():
    g = torch.Generator().manual_seed(0)
    t = {
        "model.embed_tokens.weight": torch.randn(32, 64, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 64, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(64, generator=g),
        "lm_head.weight": torch.randn(32, 64, generator=g),
    }
    for e in range(4):
        for n, shape in (("gate_proj", (48, 64)), ("up_proj", (48, 64)), ("down_proj", (64, 48))):
            t[f"model.layers.0.mlp.experts.{e}.{n}.weight"] = torch.randn(*shape, generator=g)
    return t


def _cfg(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _read(path):
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def test_quantize_checkpoint_fp8_layout_config_and_exact_roundtrip(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "fp8"
    tensors = _toy_tensors()
    _write_hf(src, tensors)
    quantize_checkpoint(str(src), str(out), "fp8")
    cfg = _cfg(out)["quantization_config"]
    assert cfg["quant_method"] == "fp8" and cfg["weight_block_size"] == [128, 128]
    assert cfg["fmt"] == "e4m3" and cfg["activation_scheme"] == "dynamic"
    assert "lm_head" in cfg["modules_to_not_convert"] and "model.layers.0.mlp.gate" in cfg["modules_to_not_convert"]
    assert (out / "tokenizer.json").exists()
    got = _read(out)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert got["model.layers.0.mlp.experts.3.down_proj.weight_scale_inv"].shape == (1, 1)
    assert torch.equal(got["lm_head.weight"], tensors["lm_head.weight"])
    back = dict(dequantize_hf_tensors(got.items(), cfg))
    assert set(back) == set(tensors)
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    assert torch.equal(back[name], fp8_block_dequantize(*fp8_block_quantize(tensors[name])))


def test_quantize_checkpoint_int4_experts_only_and_exact_roundtrip(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "int4"
    tensors = _toy_tensors()
    _write_hf(src, tensors)
    quantize_checkpoint(str(src), str(out), "int4", group_size=32)
    cfg = _cfg(out)["quantization_config"]
    w = cfg["config_groups"]["group_0"]["weights"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 32)
    got = _read(out)
    e = "model.layers.0.mlp.experts.2.down_proj"
    assert got[f"{e}.weight_packed"].dtype == torch.int32 and got[f"{e}.weight_packed"].shape == (64, 6)
    assert got[f"{e}.weight_scale"].shape == (64, 2) and got[f"{e}.weight_shape"].tolist() == [64, 48]
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"])
    back = dict(dequantize_hf_tensors(reversed(list(got.items())), cfg))  # any order
    assert set(back) == set(tensors)
    assert torch.equal(back[f"{e}.weight"], fake_quant_int4(tensors[f"{e}.weight"], 32))


def test_quantize_checkpoint_splits_stacked_experts_and_shards(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "int4"
    stacked = torch.randn(2, 16, 32)
    _write_hf(src, {"model.layers.0.mlp.experts.gate_up_proj": stacked, "lm_head.weight": torch.randn(8, 32)})
    quantize_checkpoint(str(src), str(out), "int4", group_size=16, shard_bytes=200)
    assert (out / "model.safetensors.index.json").exists()
    back = dict(dequantize_hf_tensors(_read(out).items(), _cfg(out)["quantization_config"]))
    assert torch.equal(back["model.layers.0.mlp.experts.1.up_proj.weight"], fake_quant_int4(stacked[1, 8:], 16))


def test_quantize_checkpoint_rejects_nan_and_leaves_no_output(tmp_path):
    src, out = tmp_path / "hf", tmp_path / "fp8"
    tensors = _toy_tensors()
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    _write_hf(src, tensors)
    with pytest.raises(MilesError, match="q_proj.*NaN/inf"):
        quantize_checkpoint(str(src), str(out), "fp8")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".fp8")]


def test_quantize_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(MilesError, match="does not exist"):
        quantize_checkpoint(str(tmp_path / "nope"), str(tmp_path / "o"), "fp8")
    (tmp_path / "td").mkdir()
    (tmp_path / "td" / "latest_checkpointed_iteration.txt").write_text("1")
    try:
        import miles_core.checkpoint as ck

        has_converter = hasattr(ck, "torch_dist_to_hf")
    except ImportError:
        has_converter = False
    if not has_converter:
        with pytest.raises(MilesError, match="torch_dist"):
            quantize_checkpoint(str(tmp_path / "td"), str(tmp_path / "o"), "fp8")
    with pytest.raises(MilesError, match="format"):
        quantize_checkpoint(str(tmp_path), str(tmp_path / "o"), "int3")


def test_dequantize_reports_incomplete_checkpoint():
    cfg = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    q, _ = fp8_block_quantize(torch.randn(8, 8))
    with pytest.raises(MilesError, match="lacks"):
        list(dequantize_hf_tensors([("a.weight", q)], cfg))


def test_cli_quantize_writes_checkpoint_and_reports_errors_in_one_line(tmp_path):
    from flows.commands.quantize import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode
    src = tmp_path / "hf"
    _write_hf(src, _toy_tensors())
    res = CliRunner().invoke(
        app, ["quantize", "--src", str(src), "--out", str(tmp_path / "q"), "--format", "int4", "--group-size", "32"]
    )
    assert res.exit_code == 0, res.output
    assert _cfg(tmp_path / "q")["quantization_config"]["quant_method"] == "compressed-tensors"
    res = CliRunner().invoke(app, ["quantize", "--src", str(src), "--out", str(tmp_path / "q2"), "--format", "int8"])
    assert isinstance(res.exception, MilesError) and "--format" in str(res.exception)
