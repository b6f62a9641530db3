"""The demo's base model: a tiny Qwen3-MoE trained from scratch with a short SFT warm-up.

Why a warm-up that stops early: RL needs a policy that already answers in the right format and is
sometimes right, so that groups of samples carry a learning signal. The warm-up therefore runs
supervised fine-tuning on one slice of the task's train split until a greedy validation accuracy
target (or a step cap) is reached, and the pipeline's RL stage then trains on *other* train-split
prompts, rewarded only by the verifier; evaluation uses the eval split, which neither saw.

The result is an ordinary HF checkpoint (config.json, safetensors, a real tokenizer.json).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from miles_core.data import Prompt, encode_prompt
from miles_core.model import build_model, init_weights
from miles_core.model.config import ModelConfig


def demo_hf_config(
    vocab_size: int,
    hidden: int,
    layers: int,
    experts: int,
    top_k: int,
    expert_hidden: int,
    heads: int,
    kv_heads: int,
    eos_id: int,
    pad_id: int,
) -> dict:
    """config.json of the demo model: a Qwen3MoeForCausalLM, every layer MoE."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * expert_hidden,
        "moe_intermediate_size": expert_hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def sft_batch(prompts: list[Prompt], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids of prompt + answer + eos, and a [B, T] mask of the answer+eos targets."""
    seqs, starts = [], []
    for p in prompts:
        prompt_ids = encode_prompt(p, tokenizer)
        answer_ids = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt_ids + answer_ids)
        starts.append(len(prompt_ids))
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), tokenizer.pad_token_id, dtype=torch.long)
    target_mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts, strict=False)):
        ids[i, : len(s)] = torch.tensor(s)
        target_mask[i, start : len(s)] = True
    return ids, target_mask


def sft_loss(model, ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions. ids, target_mask: [B, T]."""
    logits = model(ids[:, :-1]).logits  # [B, T-1, V] predicts ids[:, 1:]
    mask = target_mask[:, 1:]
    return F.cross_entropy(logits[mask].float(), ids[:, 1:][mask])


@torch.no_grad()
def greedy_accuracy(
    model, tokenizer, prompts: list[Prompt], score: Callable[[Prompt, str], float], max_new_tokens: int = 8
) -> float:
    """Greedy-decode short answers for a batch (left-padded, no cache: answers are a few tokens)."""
    encoded = [encode_prompt(p, tokenizer) for p in prompts]
    t = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), t), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, t - len(e) :], mask[i, t - len(e) :] = torch.tensor(e), 1
    out = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        nxt = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)  # [B]
        for i in range(len(prompts)):
            if not done[i]:
                if int(nxt[i]) == tokenizer.eos_token_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
    texts = [tokenizer.decode(o) for o in out]
    return sum(score(p, s) for p, s in zip(prompts, texts, strict=False)) / max(len(prompts), 1)


def warmup(
    model,
    tokenizer,
    train: list[Prompt],
    val: list[Prompt],
    score: Callable[[Prompt, str], float],
    *,
    batch_size: int,
    lr: float,
    max_steps: int,
    target_accuracy: float,
    eval_every: int,
    seed: int,
    on_progress: Callable[[int, float, float], None] | None = None,
) -> dict:
    """SFT until greedy accuracy on `val` reaches `target_accuracy` or `max_steps`. AdamW, warm-up + cosine."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, max_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, max_steps) / max_steps))
    )
    start, acc, loss = time.time(), 0.0, float("nan")
    step = 0
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen).tolist()
        ids, tmask = sft_batch([train[i] for i in idx], tokenizer)
        model.train()
        loss_t = sft_loss(model, ids, tmask)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = loss_t.item()
        if step % eval_every == 0 or step == max_steps:
            model.eval()
            acc = greedy_accuracy(model, tokenizer, val, score)
            if on_progress is not None:
                on_progress(step, loss, acc)
            if acc >= target_accuracy:
                break
    model.eval()
    return {"sft_steps": step, "sft_loss": loss, "sft_val_greedy_accuracy": acc, "sft_seconds": time.time() - start}


def new_demo_model(hf_config: dict, seed: int):
    model = build_model(ModelConfig.from_hf(hf_config), dtype=torch.float32)
    return init_weights(model, seed=seed)
