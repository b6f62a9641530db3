"""Multi-token prediction (MTP) layers, DeepSeek-V3 style, and the MTP loss.

MTP layer k (k = 1..K) at position t combines the previous depth's hidden state h^{k-1}_t (h^0 is
the last decoder layer's output, before the final norm) with the embedding of token t+k:

    h^k_t = Layer_k( eh_proj( [enorm(emb(x_{t+k})) ; hnorm(h^{k-1}_t)] ) )
    logits^k_t = lm_head( final_norm_k(h^k_t) )          # predicts x_{t+k+1}

The embedding and the output head are shared with the main model (HF DeepSeek-V3 checkpoints store
copies under each MTP layer; miles loads the main model's and writes copies back on export).
Sequences keep length T: the ids are shifted left and the tail positions, which have no target,
are masked out of the loss. Causal attention keeps those tail positions from affecting the rest.

Fresh MTP layers (a model whose checkpoint has none) are initialised like decoder layers: weights
normal(0, initializer_range), norms to one (see `init_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.model.config import ModelConfig
from miles_core.model.layers import RMSNorm


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        from miles_core.model.transformer import DecoderLayer

        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        # DeepSeek-V3's MTP layer uses the MoE MLP whenever the main model's later layers do.
        self.layer = DecoderLayer(cfg, moe=cfg.is_moe and layer_index >= min(cfg.moe_layers, default=0))
        self.final_norm = RMSNorm(h, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(self, h_prev, emb_next, cos, sin):
        """h_prev, emb_next: [B, T, H] -> h [B, T, H]."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        x, _ = self.layer(x, cos, sin)
        return x


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(num_layers))


def mtp_logits(model, input_ids: torch.Tensor, hidden: torch.Tensor, detach_trunk: bool = False):
    """Logits of every MTP depth: list of K tensors [B, T, V]; depth k at t predicts input_ids[t+k+1].

    `detach_trunk` (draft-only training): the trunk's hidden states, the shared embedding and the
    shared head are used without gradient, so only MTP parameters receive gradients.
    """
    if model.mtp is None:
        from miles_core.errors import MilesError

        raise MilesError("this model has no MTP layers; load it with mtp_num_layers=N to create them")
    b, t = input_ids.shape
    emb_w, head_w = model.model.embed_tokens.weight, model.lm_head.weight
    if detach_trunk:
        hidden, emb_w, head_w = hidden.detach(), emb_w.detach(), head_w.detach()
    pos = torch.arange(t, device=input_ids.device)[None].expand(b, t)
    cos, sin = model.model.rotary(pos, hidden.dtype)
    out, h = [], hidden
    for k, layer in enumerate(model.mtp.layers, start=1):
        shifted = torch.roll(input_ids, shifts=-k, dims=1)  # [B, T]: x_{t+k}; tail wraps, masked later
        h = layer(h, F.embedding(shifted, emb_w), cos, sin)
        out.append(F.linear(layer.final_norm(h), head_w))
    return out


def mtp_loss(
    model,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    detach_trunk: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy over MTP depths and valid positions.

    input_ids: [B, T]; hidden: [B, T, H] (ModelOutput.hidden_states); loss_mask: [B, T] marks the
    positions whose *targets* count (1 = keep), aligned with input_ids. Returns a scalar.
    """
    b, t = input_ids.shape
    losses = []
    for k, logits in enumerate(mtp_logits(model, input_ids, hidden, detach_trunk), start=1):
        n = t - k - 1  # positions with a target x_{t+k+1}
        if n <= 0:
            continue
        target = input_ids[:, k + 1 :]  # [B, n]
        ce = F.cross_entropy(logits[:, :n].flatten(0, 1).float(), target.flatten(), reduction="none").view(b, n)
        m = torch.ones_like(ce) if loss_mask is None else loss_mask[:, k + 1 :].to(ce.dtype)
        losses.append((ce * m).sum() / m.sum().clamp(min=1))
    if not losses:
        return hidden.new_zeros(())
    return torch.stack(losses).mean()
