"""Build the demo base model into an HF checkpoint folder (the pipeline's `base` stage)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from miles_core.data import load_prompts
from miles_core.demo.base_model import demo_hf_config, new_demo_model, warmup
from miles_core.demo.tokenizer import build_char_tokenizer
from miles_core.model.saving import save_hf_checkpoint
from miles_core.rewards import math_reward


def build_demo_base(out_dir: str, demo: dict, on_progress: Callable[[float], None] | None = None) -> dict:
    """Tokenizer + fresh tiny MoE + SFT warm-up -> HF checkpoint in `out_dir`. Returns warm-up metrics.

    demo: a DemoModelConfig as a dict (see miles_core.config).
    """
    torch.manual_seed(demo["seed"])
    tok = build_char_tokenizer()
    cfg = demo_hf_config(
        len(tok),
        demo["hidden_size"],
        demo["num_layers"],
        demo["num_experts"],
        demo["top_k"],
        demo["expert_hidden"],
        demo["num_heads"],
        demo["num_kv_heads"],
        tok.eos_token_id,
        tok.pad_token_id,
    )
    model = new_demo_model(cfg, demo["seed"])
    train, _ = load_prompts(demo["warmup_source"])
    val, _ = load_prompts(demo["val_source"])

    def progress(step: int, loss: float, acc: float) -> None:
        if on_progress is not None:
            on_progress(min(1.0, max(step / demo["max_steps"], acc / demo["target_accuracy"])))

    metrics = warmup(
        model,
        tok,
        train,
        val,
        lambda p, s: math_reward(s, p.answer),
        batch_size=demo["batch_size"],
        lr=demo["lr"],
        max_steps=demo["max_steps"],
        target_accuracy=demo["target_accuracy"],
        eval_every=demo["eval_every"],
        seed=demo["seed"],
        on_progress=progress,
    )
    save_hf_checkpoint(model, out_dir, tokenizer=tok, overwrite=True)
    return metrics
