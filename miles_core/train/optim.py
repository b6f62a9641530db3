"""AdamW with a warm-up then constant / cosine / linear decay, and which parameters train.

Norms, biases and the router's correction bias get no weight decay (decaying a norm's gain
towards 0 is not regularisation). `freeze_router` keeps the MoE routers fixed: on a tiny model
GRPO's noisy gradient moves the router more than it helps (see BASELINES.md, CPU calibration).
The schedule is a pure function of the step (`lr_at`), so resuming needs only the step count;
LambdaLR's state is still saved for tools that expect it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from miles_core.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant" or not cfg.decay_steps:
        return cfg.lr
    frac = min(1.0, (step - cfg.warmup_steps) / cfg.decay_steps)
    if cfg.decay == "linear":
        scale = 1.0 - frac
    else:
        scale = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * scale


def trainable_parameters(model: nn.Module, cfg: TrainConfig, mtp_only: bool = False) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs that train; sets requires_grad on all parameters accordingly."""
    out = []
    for name, p in model.named_parameters():
        train = True
        if cfg.freeze_router and name.endswith("mlp.gate.weight"):
            train = False
        if mtp_only and not name.startswith("mtp."):
            train = False
        p.requires_grad_(train)
        if train:
            out.append((name, p))
    return out


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.dim() < 2 or "norm" in name or name.endswith(".bias")


def build_optimizer(model: nn.Module, cfg: TrainConfig, mtp_only: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused on CUDA (one kernel for all tensors)."""
    params = trainable_parameters(model, cfg, mtp_only)
    decay = [p for n, p in params if not _no_decay(n, p)]
    no_decay = [p for n, p in params if _no_decay(n, p)]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]  # fmt: skip
    cuda = any(p.is_cuda for _, p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=cuda or None
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `lr_at`; call `.step()` after each applied optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
