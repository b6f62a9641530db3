"""Loading models from HF checkpoints: safetensors (single or sharded), streamed tensor by tensor.

The model is built on the meta device, materialised empty on the target device, then every tensor
is read from the memory-mapped safetensors and copied straight into its parameter (expert tensors
into their slice of the stacked weight), so loading needs no second copy of the model in memory.
Every user mistake raises `MilesError` naming the file or tensor: an unknown architecture, a
missing, unexpected or mis-shaped tensor, a missing shard, a corrupt or truncated file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from miles_core.errors import MilesError
from miles_core.model.config import ModelConfig, read_hf_config
from miles_core.model.transformer import CausalLM
from miles_core.model.weights import Target, count_mtp_layers, hf_to_miles

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of an HF checkpoint folder, from its index when it has one."""
    if not os.path.isdir(path):
        raise MilesError(f"{path} is not a directory; expected an HF checkpoint folder")
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise MilesError(f"{index} is not a valid safetensors index: {e}") from None
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.exists(f):
                raise MilesError(f"shard {f} listed in {INDEX_FILE} is missing")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise MilesError(f"{path} holds no *.safetensors weights")
    return files


def _open(file: str):
    from safetensors import safe_open

    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises SafetensorError / OSError on bad headers
        raise MilesError(f"{file} is corrupt or truncated (cannot read its safetensors header: {e})") from None


def iter_hf_tensors(path: str, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every shard, one tensor at a time (memory-mapped reads)."""
    for file in checkpoint_files(path):
        with _open(file) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if names is not None and name not in names:
                    continue
                try:
                    yield name, f.get_tensor(name)
                except Exception as e:
                    raise MilesError(f"{file}: tensor {name} cannot be read (file truncated?): {e}") from None


def hf_tensor_names(path: str) -> list[str]:
    names = []
    for file in checkpoint_files(path):
        with _open(file) as f:
            names.extend(f.keys())
    return names


def build_model(cfg: ModelConfig, device="cpu", dtype=torch.float32, num_mtp_layers: int = 0) -> CausalLM:
    """An uninitialised model (storage allocated on `device`, values arbitrary)."""
    with torch.device("meta"):
        model = CausalLM(cfg, num_mtp_layers)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty gives every parameter new storage, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    _reset_buffers(model)
    return model


def _reset_buffers(model: CausalLM) -> None:
    """Recompute non-persistent buffers lost on the meta device; routing bias stays float32."""
    from miles_core.model.rope import inverse_frequencies

    inv_freq, _ = inverse_frequencies(model.config)
    for mod in model.modules():
        if hasattr(mod, "inv_freq"):
            mod.inv_freq = inv_freq.to(mod.inv_freq.device)
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias = torch.zeros_like(mod.e_score_correction_bias, dtype=torch.float32)


def init_weights(model: nn.Module, std: float | None = None, seed: int | None = None) -> nn.Module:
    """Random init as HF does: normal(0, std) for matrices and experts, ones for norms, zeros for biases.

    `std` defaults to the config's initializer_range (0.02). Works on any submodule (fresh MTP layers).
    """
    from miles_core.model.layers import RMSNorm

    if std is None:
        std = getattr(getattr(model, "config", None), "raw", {}).get("initializer_range", 0.02)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, RMSNorm):
                    p.fill_(1.0)
                elif name == "bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def load_model(
    path: str, device="cpu", dtype: torch.dtype = torch.float32, mtp_num_layers: int | None = None
) -> CausalLM:
    """Load an HF checkpoint folder. `mtp_num_layers`: None = the MTP layers the checkpoint has,
    N = N layers (those missing from the checkpoint are freshly initialised), 0 = none."""
    raw = read_hf_config(path)
    return load_model_from_tensors(raw, iter_hf_tensors(path), device, dtype, mtp_num_layers, hf_tensor_names(path))


def load_model_from_tensors(
    config: dict,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    device="cpu",
    dtype: torch.dtype = torch.float32,
    mtp_num_layers: int | None = None,
    all_names: list[str] | None = None,
) -> CausalLM:
    """Build a model from an HF config dict and (HF on-disk name, tensor) pairs.

    `all_names` (every name the stream will yield) lets MTP layers be counted up front; without it
    `mtp_num_layers=None` means no MTP layers.
    """
    cfg = ModelConfig.from_hf(config)
    if config.get("quantization_config"):
        named_tensors = _dequantized(named_tensors, config["quantization_config"])
    found_mtp = count_mtp_layers(all_names or [], cfg.num_hidden_layers)
    n_mtp = found_mtp if mtp_num_layers is None else mtp_num_layers
    model = build_model(cfg, device, dtype, n_mtp)
    filled = _copy_tensors(model, named_tensors, cfg, n_mtp)
    _check_complete(model, filled, n_mtp, found_mtp)
    return model


def _dequantized(named_tensors, quant_config: dict):
    try:
        from miles_core.quant import dequantize_hf_tensors
    except ImportError:
        raise MilesError(
            f"checkpoint is quantized ({quant_config.get('quant_method')}) but miles_core.quant cannot read it"
        ) from None
    return dequantize_hf_tensors(named_tensors, quant_config)


def _copy_tensors(model: CausalLM, named_tensors, cfg: ModelConfig, n_mtp: int) -> set:
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled: set = set()
    with torch.no_grad():
        for hf_name, tensor in named_tensors:
            target = hf_to_miles(hf_name, cfg.num_hidden_layers, n_mtp)
            if target is None:
                continue
            if target.name not in params:
                raise MilesError(f"unexpected tensor {hf_name} for {cfg.architecture} (no parameter {target.name})")
            dest = _slot(params[target.name], target)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise MilesError(f"tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor.to(dest.dtype))
            filled.add((target.name, target.expert, target.part))
    return filled


def _slot(param: torch.Tensor, t: Target) -> torch.Tensor:
    if t.expert is None:
        return param
    if t.expert >= param.shape[0]:
        raise MilesError(f"expert {t.expert} of {t.name} is beyond num_experts={param.shape[0]}")
    w = param[t.expert]
    if t.part == "down":
        return w
    half = w.shape[0] // 2
    return w[:half] if t.part == "gate" else w[half:]


def _expected(model: CausalLM, n_mtp_loaded: int) -> Iterator[tuple[str, int | None, str | None]]:
    tied = model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if name.startswith("mtp.layers.") and int(name.split(".")[2]) >= n_mtp_loaded:
            continue
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("experts.gate_up_proj"):
            for e in range(p.shape[0]):
                yield name, e, "gate"
                yield name, e, "up"
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                yield name, e, "down"
        else:
            yield name, None, None


def _check_complete(model: CausalLM, filled: set, n_mtp: int, found_mtp: int) -> None:
    fresh_from = min(n_mtp, found_mtp)
    missing = [k for k in _expected(model, fresh_from) if k not in filled]
    if missing:
        name, e, part = missing[0]
        what = name if e is None else f"{name} (expert {e}, {part})"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MilesError(f"checkpoint is missing tensor {what}{more}")
    if n_mtp > found_mtp:
        for layer in model.mtp.layers[found_mtp:]:
            init_weights(layer, model.config.raw.get("initializer_range", 0.02))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def load_tokenizer(path: str):
    """The tokenizer stored beside the weights (transformers' AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise MilesError(f"no usable tokenizer in {path}: {e}") from None
