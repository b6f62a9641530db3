"""HF <-> torch_dist conversion: bit-exact round trips, MTP layers, sharding, bad inputs, crash safety."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from miles_core.checkpoint import (
    TorchDistCheckpoint,
    hf_to_torch_dist,
    iter_hf_tensors,
    load_torch_dist,
    torch_dist_to_hf,
)
from miles_core.checkpoint.torch_dist_io import TorchDistReader
from miles_core.errors import MilesError
from miles_core.model import load_model
from tests.tiny_models import CONFIGS, VOCAB, add_mtp_layer, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


def _hf_with_mtp(name: str, folder: str):
    cfg = CONFIGS[name]()
    hf, model = save_hf(cfg, folder)
    if name == "deepseek_v3":
        add_mtp_layer(hf, cfg)
    return hf, model


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _ids(t: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "qwen3", "llama"])
def test_round_trip_is_bit_exact_and_transformers_logits_are_identical(name, tmp_path):
    from transformers import AutoModelForCausalLM

    hf, model = _hf_with_mtp(name, str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    back = torch_dist_to_hf(ckpt, str(tmp_path / "back"), include_mtp=name == "deepseek_v3")
    a, b = _tensors(hf), _tensors(back)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(
            a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)
        ), k
    reloaded = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_checkpoint_folder_has_megatron_files_and_hf_side_files(tmp_path):
    hf, _ = _hf_with_mtp("qwen3_moe", str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    assert _text(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) == "0"
    it = os.path.join(ckpt, "iter_0000000")
    assert _json(os.path.join(it, "metadata.json"))["sharded_backend"] == "torch_dist"
    common = torch.load(os.path.join(it, "common.pt"), weights_only=False)
    assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
    assert os.path.exists(os.path.join(ckpt, "config.json"))
    assert os.path.exists(os.path.join(it, ".metadata"))
    keys = TorchDistReader(it).tensors
    # Qwen3-MoE tiny config mixes dense and MoE layers: megatron keys each layer on its own.
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in keys
    assert keys["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"].size == torch.Size([8, 64, 64])
    assert "output_layer.weight" in keys and "embedding.word_embeddings.weight" in keys


def test_file_urls_work_and_remote_urls_are_a_clear_error(tmp_path):
    hf, _ = _hf_with_mtp("qwen3", str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(f"file://{hf}", f"file://{tmp_path}/td")
    torch_dist_to_hf(f"file://{ckpt}", str(tmp_path / "back"))
    with pytest.raises(MilesError, match="needs a local path"):
        hf_to_torch_dist("s3://bucket/model", str(tmp_path / "x"))


def test_release_folder_for_megatron_lm(tmp_path):
    hf, _ = _hf_with_mtp("qwen3", str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"), iteration=None)
    assert _text(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) == "release"
    assert os.path.exists(os.path.join(ckpt, "release", ".metadata"))
    torch_dist_to_hf(ckpt, str(tmp_path / "back"))


def test_deepseek_mtp_layer_is_kept_and_loads_into_miles(tmp_path):
    hf, _ = _hf_with_mtp("deepseek_v3", str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    keys = TorchDistReader(os.path.join(ckpt, "iter_0000000")).tensors
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.eh_proj.weight", "mtp.layers.0.final_layernorm.weight"} <= set(
        keys
    )
    assert "mtp.layers.0.transformer_layer.mlp.experts.experts.linear_fc2.weight" in keys
    # the MTP layer's embedding / head copies equal the shared ones, so they are not stored twice
    assert not any(k.startswith("mtp.layers.0.embedding") for k in keys)
    ref, got = load_model(hf).eval(), load_torch_dist(ckpt).eval()
    assert got.mtp is not None and len(got.mtp.layers) == 1
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert set(ref_sd) == set(got_sd)
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)


def test_mtp_copies_that_differ_from_the_shared_tensors_are_kept_bit_exact(tmp_path):
    from safetensors.torch import save_file

    hf, _ = _hf_with_mtp("deepseek_v3", str(tmp_path / "hf"))
    mtp_file = os.path.join(hf, "model-mtp.safetensors")
    t = load_file(mtp_file)
    t["model.layers.3.embed_tokens.weight"] = t["model.layers.3.embed_tokens.weight"] + 1
    save_file(t, mtp_file, metadata={"format": "pt"})
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    back = torch_dist_to_hf(ckpt, str(tmp_path / "back"), include_mtp=True)
    a, b = _tensors(hf), _tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_created_mtp_layers_follow_the_initialiser_and_export_with_include_mtp(tmp_path):
    hf, _ = _hf_with_mtp("qwen3_moe", str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"), mtp_num_layers=2)
    info = _json(os.path.join(ckpt, "miles_checkpoint.json"))
    assert info["mtp_num_layers"] == 2 and info["mtp_source"] == "created"
    back = torch_dist_to_hf(ckpt, str(tmp_path / "back"), include_mtp=True)
    t = _tensors(back)
    assert _json(os.path.join(back, "config.json"))["num_nextn_predict_layers"] == 2
    assert torch.equal(t["model.layers.3.enorm.weight"], torch.ones(64))
    assert torch.equal(t["model.layers.4.shared_head.norm.weight"], torch.ones(64))
    w = t["model.layers.3.eh_proj.weight"]
    assert w.shape == (64, 128) and abs(w.std().item() - 0.02) < 0.003
    assert t["model.layers.3.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    model = load_torch_dist(ckpt)
    assert len(model.mtp.layers) == 2
    without = _tensors(torch_dist_to_hf(ckpt, str(tmp_path / "plain")))
    assert set(without) == set(_tensors(hf))


def test_sharded_input_and_size_bounded_output_shards_with_index(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS["qwen3_moe"]()
    hf, model = save_hf(cfg, str(tmp_path / "hf"), max_shard_size="200KB")
    assert os.path.exists(os.path.join(hf, "model.safetensors.index.json"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"), max_file_bytes=100_000)
    assert len(glob.glob(os.path.join(ckpt, "iter_0000000", "*.distcp"))) > 3
    back = torch_dist_to_hf(ckpt, str(tmp_path / "back"), max_shard_bytes=300_000)
    shards = glob.glob(os.path.join(back, "model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(os.path.getsize(s) < 300_000 + 70_000 for s in shards)
    index = _json(os.path.join(back, "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(_tensors(hf))
    ids = _ids()
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()(ids).logits
        assert torch.equal(got, model(ids).logits)


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    cfg = CONFIGS["llama"]()
    hf, model = save_hf(cfg, str(tmp_path / "hf"))
    model.to(torch.bfloat16).save_pretrained(hf)
    back = torch_dist_to_hf(hf_to_torch_dist(hf, str(tmp_path / "td")), str(tmp_path / "back"))
    a, b = _tensors(hf), _tensors(back)
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_load_torch_dist_into_miles_gives_the_logits_of_the_hf_checkpoint(tmp_path):
    hf, _ = _hf_with_mtp("qwen3_moe", str(tmp_path / "hf"))
    ckpt = hf_to_torch_dist(hf, str(tmp_path / "td"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(load_torch_dist(ckpt).eval()(ids).logits, load_model(hf).eval()(ids).logits)
    config, names, tensors = iter_hf_tensors(ckpt)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and len(names) == len(list(tensors))


# ---- bad inputs: one MilesError with a clear message ------------------------------------------------


def test_not_an_hf_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MilesError, match="does not exist"):
        hf_to_torch_dist(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MilesError, match="config.json"):
        hf_to_torch_dist(str(tmp_path / "empty"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_a_clear_error(tmp_path):
    hf, _ = _hf_with_mtp("llama", str(tmp_path / "hf"))
    cfg = _json(os.path.join(hf, "config.json"))
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(MilesError, match="unsupported architecture GPT2LMHeadModel"):
        hf_to_torch_dist(hf, str(tmp_path / "out"))


def test_truncated_shard_is_a_clear_error(tmp_path):
    hf, _ = _hf_with_mtp("llama", str(tmp_path / "hf"))
    f = os.path.join(hf, "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 1000)
    with pytest.raises(MilesError, match="truncated") as e:
        hf_to_torch_dist(hf, str(tmp_path / "out"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_tensor_and_bad_checkpoint_dirs_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    hf, _ = _hf_with_mtp("llama", str(tmp_path / "hf"))
    t = load_file(os.path.join(hf, "model.safetensors"))
    del t["model.layers.1.self_attn.k_proj.weight"]
    save_file(t, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MilesError, match="lacks tensor model.layers.1.self_attn.k_proj.weight"):
        hf_to_torch_dist(hf, str(tmp_path / "out"))
    with pytest.raises(MilesError, match="not a torch_dist checkpoint"):
        torch_dist_to_hf(hf, str(tmp_path / "back"))
    with pytest.raises(MilesError, match="does not exist"):
        TorchDistCheckpoint(str(tmp_path / "nope"))


def test_unexpected_or_quantized_tensors_are_refused_not_dropped(tmp_path):
    from safetensors.torch import save_file

    hf, _ = _hf_with_mtp("llama", str(tmp_path / "hf"))
    t = load_file(os.path.join(hf, "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(t, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MilesError, match="quantized"):
        hf_to_torch_dist(hf, str(tmp_path / "out"))
    del t["model.layers.0.mlp.down_proj.weight_scale_inv"]
    t["model.layers.5.mlp.down_proj.weight"] = torch.ones(1, 1)
    save_file(t, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MilesError, match="model.layers.5.mlp.down_proj.weight that LlamaForCausalLM does not use"):
        hf_to_torch_dist(hf, str(tmp_path / "out"))


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    hf, _ = _hf_with_mtp("qwen3", str(tmp_path / "hf"))
    out = hf_to_torch_dist(hf, str(tmp_path / "td"))
    with pytest.raises(MilesError, match="already exists"):
        hf_to_torch_dist(hf, out)
    hf_to_torch_dist(hf, out, overwrite=True)


# ---- crash safety ---------------------------------------------------------------------------------

_SLOW_CONVERT = """
import sys, time
from miles_core.checkpoint import safetensors_io
read = safetensors_io.SafetensorsReader.read
def slow_read(self, name, rows=None):
    time.sleep(0.02)
    return read(self, name, rows)
safetensors_io.SafetensorsReader.read = slow_read
from miles_core.checkpoint import hf_to_torch_dist
hf_to_torch_dist(sys.argv[1], sys.argv[2], max_file_bytes=20_000)
"""


def test_conversion_killed_midway_leaves_no_valid_output_and_rerun_succeeds(tmp_path):
    hf, _ = _hf_with_mtp("qwen3_moe", str(tmp_path / "hf"))
    out = str(tmp_path / "td")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, hf, out], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not glob.glob(str(tmp_path / ".td.tmp-*" / "iter_0000000" / "*.distcp")):
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before it could be killed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert glob.glob(str(tmp_path / ".td.tmp-*" / "iter_0000000" / "*.distcp"))  # it was killed mid-write
    assert not os.path.exists(out)
    visible = [p for p in os.listdir(tmp_path) if not p.startswith(".")]
    assert sorted(visible) == ["hf"]
    with pytest.raises(MilesError):
        torch_dist_to_hf(out, str(tmp_path / "back"))
    hf_to_torch_dist(hf, out)  # rerun succeeds, and clears the dead temporary folder
    assert not glob.glob(str(tmp_path / ".td.tmp-*"))
    back = torch_dist_to_hf(out, str(tmp_path / "back"))
    a, b = _tensors(hf), _tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a)
