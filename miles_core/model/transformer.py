"""The causal LM: embeddings, decoder layers (dense MLP or MoE), final norm, LM head, MTP layers.

Parameter names follow transformers' in-memory names (`model.layers.{i}.self_attn.q_proj.weight`,
`model.layers.{i}.mlp.experts.gate_up_proj`, `lm_head.weight`), so HF checkpoints map onto them with
one rule for experts (per-expert tensors on disk, stacked here). MTP layers live under `mtp.layers.{k}`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miles_core.model.attention import build_attention
from miles_core.model.config import ModelConfig
from miles_core.model.layers import MLP, RMSNorm
from miles_core.model.moe import MoE
from miles_core.model.rope import Rotary


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]
    routed_experts: torch.Tensor | None = None  # [B, T, moe_layers, k] int32
    hidden_states: torch.Tensor | None = None  # [B, T, H], last decoder layer before the final norm


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.self_attn = build_attention(cfg)
        inter = cfg.intermediate_size
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, inter, cfg.hidden_act, cfg.mlp_bias)
        self.is_moe = moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, replay=None):
        """x: [B, T, H] -> (x, experts [B*T, k] or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, experts = self.mlp(h, replay)
            return x + h, experts
        return x + self.mlp(h), None


class Backbone(nn.Module):
    """HF's `model.*`: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = set(cfg.moe_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i in moe) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)


def causal_mask(attention_mask: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """attention_mask [B, T] (1 = token, 0 = padding) -> bool [B, 1, T, T] (True = may attend), or None.

    Padding rows attend to themselves only, so no row is empty (an all-masked row gives NaN in SDPA).
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()
    causal = torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
    mask = causal[None] & keep[:, None, :]  # [B, T, T]
    mask = mask | torch.eye(t, dtype=torch.bool, device=keep.device)[None]
    return mask[:, None]


def default_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions count real tokens only, so left-padded rows start at 0 like unpadded ones."""
    if attention_mask is None:
        t = input_ids.shape[1]
        return torch.arange(t, device=input_ids.device)[None].expand(input_ids.shape[0], t)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLM(nn.Module):
    """`model(input_ids, routed_experts=None, return_routed_experts=False)` -> ModelOutput."""

    def __init__(self, cfg: ModelConfig, num_mtp_layers: int = 0):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.moe_layer_ids = [i for i, layer in enumerate(self.model.layers) if layer.is_moe]
        self.mtp = None
        if num_mtp_layers:
            from miles_core.model.mtp import MTP

            self.mtp = MTP(cfg, num_mtp_layers)

    def compile_layers(self, **kwargs) -> CausalLM:
        """torch.compile each decoder layer (CUDA prefill/training): fuses norms, rope, SwiGLU and the
        routing glue around the GEMMs. Layers of one shape share one compiled graph."""
        for layer in self.model.layers:
            layer.forward = torch.compile(layer.forward, dynamic=False, **kwargs)
        return self

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        routed_experts: torch.Tensor | None = None,
        return_routed_experts: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        compute_logits: bool = True,
        return_hidden_states: bool = False,
    ) -> ModelOutput:
        """input_ids: [B, T]; routed_experts: [B, T, moe_layers, k] to replay (R3), or None."""
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        pos = position_ids if position_ids is not None else default_positions(input_ids, attention_mask)
        cos, sin = self.model.rotary(pos, x.dtype)
        mask = causal_mask(attention_mask, t)
        replay = self._check_replay(routed_experts, b, t)
        recorded = []
        for layer in self.model.layers:
            r = replay[:, :, len(recorded)].reshape(b * t, -1) if replay is not None and layer.is_moe else None
            x, experts = layer(x, cos, sin, mask, r)
            if experts is not None:
                recorded.append(experts)
        hidden = x
        logits = self.lm_head(self.model.norm(x)) if compute_logits else None
        out = ModelOutput(logits=logits, hidden_states=hidden if return_hidden_states else None)
        if return_routed_experts and recorded:
            # [B*T, k] per MoE layer -> [B, T, moe_layers, k]
            out.routed_experts = torch.stack(recorded, dim=1).view(b, t, len(recorded), -1).to(torch.int32)
        return out

    def _check_replay(self, routed: torch.Tensor | None, b: int, t: int) -> torch.Tensor | None:
        if routed is None:
            return None
        from miles_core.errors import MilesError

        k = self.config.num_experts_per_tok
        want = (b, t, self.num_moe_layers, k)
        if tuple(routed.shape) != want:
            raise MilesError(
                f"routed_experts has shape {tuple(routed.shape)}, expected {want} [B, T, moe_layers, topk]"
            )
        if routed.numel() and (int(routed.min()) < 0 or int(routed.max()) >= self.config.num_experts):
            raise MilesError(f"routed_experts holds expert ids outside [0, {self.config.num_experts})")
        return routed.to(self.lm_head.weight.device)
