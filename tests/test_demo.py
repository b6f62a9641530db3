"""The demo's base model: a real tokenizer file, an HF checkpoint that transformers and miles load."""

import os

import torch

from miles_core.config import DemoModelConfig
from miles_core.demo import build_demo_base
from miles_core.demo.tokenizer import save_char_tokenizer


def test_char_tokenizer_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "15 - 43 = -28"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    chat = [{"role": "user", "content": "State the final answer to the following arithmetic problem: 15 - 43 ="}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "15 - 43 = "
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0


def test_build_demo_base_writes_a_loadable_hf_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from miles_core.model import load_model

    demo = DemoModelConfig(
        hidden_size=32,
        num_layers=2,
        expert_hidden=32,
        max_steps=6,
        eval_every=3,
        batch_size=16,
        warmup_source=DemoModelConfig().warmup_source.replace("size=3000", "size=64"),
        val_source=DemoModelConfig().val_source.replace("size=128", "size=16"),
    )
    out = str(tmp_path / "base")
    metrics = build_demo_base(out, demo.model_dump())
    assert metrics["sft_steps"] == 6 and metrics["sft_loss"] < 4.6  # below uniform over 98 tokens (ln 98)
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= set(os.listdir(out))
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        a = load_model(out)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
