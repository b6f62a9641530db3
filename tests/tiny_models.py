"""Tiny random HF checkpoints built with transformers' own config and model classes.

Each builder saves `save_pretrained` output (config.json + safetensors) to a folder and returns it.
Shapes are small but exercise every switch: GQA, q/k norm, MoE with dense layers mixed in,
DeepSeek-V3 MLA with q LoRA, YaRN rope, group-limited routing, shared experts and an MTP layer.
"""

from __future__ import annotations

import os

import torch

VOCAB = 96


def qwen3_moe_config(**kw):
    from transformers import Qwen3MoeConfig

    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        decoder_sparse_step=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    base.update(kw)
    cfg = Qwen3MoeConfig(**base)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    return cfg


def deepseek_v3_config(**kw):
    from transformers import DeepseekV3Config

    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )
    base.update(kw)
    cfg = DeepseekV3Config(**base)
    cfg.architectures = ["DeepseekV3ForCausalLM"]
    return cfg


def qwen3_config(**kw):
    from transformers import Qwen3Config

    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    base.update(kw)
    cfg = Qwen3Config(**base)
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    base.update(kw)
    cfg = LlamaConfig(**base)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


CONFIGS = {
    "qwen3_moe": qwen3_moe_config,
    "deepseek_v3": deepseek_v3_config,
    "qwen3": qwen3_config,
    "llama": llama_config,
}


def build_hf_model(cfg, seed: int = 0):
    """A transformers model with random weights, including routers, norms and biases (not just init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05 if p.dim() > 1 else 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def save_hf(cfg, out_dir: str, seed: int = 0, max_shard_size: str | None = None):
    """Save a random transformers model to `out_dir`; returns (out_dir, model)."""
    model = build_hf_model(cfg, seed)
    os.makedirs(out_dir, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir, model


def add_mtp_layer(hf_dir: str, cfg, seed: int = 1) -> dict[str, torch.Tensor]:
    """Append a DeepSeek-V3 MTP layer `model.layers.{L}.*` (random values) as an extra shard + index.

    transformers does not build the MTP layer, so its tensors are written by hand with the names and
    shapes of published DeepSeek-V3 checkpoints: a full decoder layer (shaped like the last one) plus
    enorm, hnorm, eh_proj [H, 2H], shared_head.norm and copies of embed_tokens / shared_head.head.
    """
    import json

    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    main = load_file(os.path.join(hf_dir, "model.safetensors"))
    last, L, h = f"model.layers.{cfg.num_hidden_layers - 1}.", cfg.num_hidden_layers, cfg.hidden_size
    mtp = {}
    for k, v in main.items():
        if k.startswith(last):
            name = f"model.layers.{L}." + k[len(last) :]
            scale = 0.1 if "norm" in k else 0.05
            mtp[name] = (1.0 if "norm" in k else 0.0) + torch.randn(v.shape, generator=g) * scale
    for n in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{L}.{n}.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    mtp[f"model.layers.{L}.eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * 0.05
    mtp[f"model.layers.{L}.embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
    mtp[f"model.layers.{L}.shared_head.head.weight"] = main["lm_head.weight"].clone()
    save_file(mtp, os.path.join(hf_dir, "model-mtp.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model.safetensors" for k in main}
    weight_map.update({k: "model-mtp.safetensors" for k in mtp})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return mtp
