"""Bad checkpoints raise one MilesError naming the file or tensor."""

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from miles_core.errors import MilesError
from miles_core.model import load_model
from tests.tiny_models import CONFIGS, save_hf


@pytest.fixture
def ckpt(tmp_path):
    path, _ = save_hf(CONFIGS["qwen3_moe"](), str(tmp_path / "m"))
    return path


def _edit(path, fn):
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    fn(sd)
    save_file(sd, file, metadata={"format": "pt"})


def test_unknown_architecture(ckpt):
    cfg_file = os.path.join(ckpt, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg["architectures"], cfg["model_type"] = ["MambaForCausalLM"], "mamba"
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(MilesError, match="unsupported architecture MambaForCausalLM"):
        load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(
        MilesError, match=r"missing tensor model\.layers\.2\.mlp\.experts\.gate_up_proj \(expert 5, up\)"
    ):
        load_model(ckpt)


def test_missing_dense_tensor_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.pop("model.layers.0.self_attn.k_norm.weight"))
    with pytest.raises(MilesError, match=r"missing tensor model\.layers\.0\.self_attn\.k_norm\.weight"):
        load_model(ckpt)


def test_misshaped_tensor_is_named(ckpt):
    def shrink(sd):
        sd["model.layers.1.mlp.down_proj.weight"] = sd["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()

    _edit(ckpt, shrink)
    with pytest.raises(
        MilesError, match=r"model\.layers\.1\.mlp\.down_proj\.weight has shape \(64, 95\), expected \(64, 96\)"
    ):
        load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    import torch

    _edit(ckpt, lambda sd: sd.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(MilesError, match=r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight"):
        load_model(ckpt)


def test_truncated_file_is_named(ckpt):
    file = os.path.join(ckpt, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(MilesError, match="model.safetensors"):
        load_model(ckpt)


def test_garbage_file_is_named(ckpt):
    file = os.path.join(ckpt, "model.safetensors")
    with open(file, "wb") as f:
        f.write(b"\x00not a safetensors file")
    with pytest.raises(MilesError, match="corrupt or truncated"):
        load_model(ckpt)


def test_missing_shard_is_named(tmp_path):
    path, _ = save_hf(CONFIGS["qwen3"](), str(tmp_path / "s"), max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    with pytest.raises(MilesError, match=f"shard .*{shard} listed in model.safetensors.index.json is missing"):
        load_model(path)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(MilesError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(MilesError, match="no config.json"):
        load_model(str(tmp_path / "nope"))
