"""Model configuration read from an HF `config.json`.

One transformer family covers the four supported architectures; `ModelConfig` holds the switches
that tell them apart (attention kind, router kind, which layers are MoE). Both the config.json that
transformers 5 writes (`rope_parameters`, `num_local_experts`) and the older form found in published
checkpoints (`rope_theta` + `rope_scaling`, `num_experts`, `n_routed_experts`) are accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from miles_core.errors import MilesError

SUPPORTED_ARCHITECTURES = (
    "Qwen3MoeForCausalLM",
    "DeepseekV3ForCausalLM",
    "Qwen3ForCausalLM",
    "LlamaForCausalLM",
)
_MODEL_TYPE_TO_ARCH = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    max_position_embeddings: int = 4096
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    router: str = "softmax"  # "softmax" (Qwen3-MoE) | "sigmoid" (DeepSeek-V3: correction bias, groups)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    n_shared_experts: int = 0
    moe_layers: tuple[int, ...] = ()
    # MLA (DeepSeek-V3)
    attention: str = "gqa"  # "gqa" | "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # MTP
    num_mtp_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return len(self.moe_layers) > 0

    @property
    def rope_dim(self) -> int:
        """Dimensions rotated by rope: the decoupled rope part for MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | str) -> ModelConfig:
        """Build from a config.json dict, or from a checkpoint folder / config.json path."""
        if isinstance(cfg, (str, os.PathLike)):
            cfg = read_hf_config(str(cfg))
        arch = _architecture(cfg)
        return _BUILDERS[arch](cfg, arch)


def read_hf_config(path: str) -> dict[str, Any]:
    """Read `config.json` from a checkpoint folder (or the file itself), with clear errors."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise MilesError(f"{path} is not an HF checkpoint folder: no config.json found")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MilesError(f"{file} is not valid JSON: {e}") from None


def _architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    mt = cfg.get("model_type")
    if not archs and mt in _MODEL_TYPE_TO_ARCH:
        return _MODEL_TYPE_TO_ARCH[mt]
    got = ", ".join(archs) if archs else f"model_type={mt!r}"
    raise MilesError(f"unsupported architecture {got}; miles supports {', '.join(SUPPORTED_ARCHITECTURES)}")


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """Normalise rope settings to one dict with `rope_type` and `rope_theta`."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in rp and "rope_type" not in rp:
        rp["rope_type"] = rp.pop("type")
    rp.setdefault("rope_type", "default")
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    if rp["rope_type"] not in ("default", "linear", "llama3", "yarn"):
        raise MilesError(f"unsupported rope_type {rp['rope_type']!r}; supported: default, linear, llama3, yarn")
    return rp


def _common(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    heads = cfg["num_attention_heads"]
    return dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg.get("intermediate_size", 0),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        hidden_act=cfg.get("hidden_act", "silu"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope=_rope(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        raw=dict(cfg),
    )


def _dense(cfg: dict[str, Any], arch: str) -> ModelConfig:
    return ModelConfig(**_common(cfg, arch), qk_norm=arch == "Qwen3ForCausalLM")


def _qwen3_moe(cfg: dict[str, Any], arch: str) -> ModelConfig:
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense_only = set(cfg.get("mlp_only_layers") or [])
    layers = cfg["num_hidden_layers"]
    moe = tuple(i for i in range(layers) if n_exp > 0 and i not in dense_only and (i + 1) % step == 0)
    return ModelConfig(
        **_common(cfg, arch),
        qk_norm=True,
        num_experts=n_exp,
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        router="softmax",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=moe,
    )


def _deepseek_v3(cfg: dict[str, Any], arch: str) -> ModelConfig:
    n_exp = cfg.get("n_routed_experts", cfg.get("num_local_experts", 0)) or 0
    first_dense = cfg.get("first_k_dense_replace", 0) or 0
    layers = cfg["num_hidden_layers"]
    common = _common(cfg, arch)
    common["head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    n_group = cfg.get("n_group", 1) or 1
    if n_exp % n_group:
        raise MilesError(f"n_routed_experts={n_exp} is not divisible by n_group={n_group}")
    return ModelConfig(
        **common,
        num_experts=n_exp,
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        router="sigmoid",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        n_group=n_group,
        topk_group=cfg.get("topk_group", 1) or 1,
        n_shared_experts=cfg.get("n_shared_experts", 0) or 0,
        moe_layers=tuple(range(first_dense, layers)) if n_exp > 0 else (),
        attention="mla",
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        rope_interleave=bool(cfg.get("rope_interleave", True)),
        num_mtp_layers=cfg.get("num_nextn_predict_layers", 0) or 0,
    )


_BUILDERS = {
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "DeepseekV3ForCausalLM": _deepseek_v3,
    "Qwen3ForCausalLM": _dense,
    "LlamaForCausalLM": _dense,
}
