"""Turning a `Prompt` into the model's input: the tokenizer's chat template when it has one.

Instruction-tuned checkpoints are trained on their own chat format, and a prompt rendered any
other way is off-distribution, so the template shipped with the tokenizer always wins. Base
models (no template) get plain text: a text prompt as is, chat messages as `Role: content`
blocks ending in `Assistant:` so that the model continues as the assistant.
"""

from __future__ import annotations

from typing import Any

from miles_core.data.prompt import Prompt

__all__ = ["has_chat_template", "render_prompt", "encode_prompt"]


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_prompt(prompt: Prompt, tokenizer: Any = None) -> str:
    """The prompt as the string the model sees, generation prompt included."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt.chat(), tokenize=False, add_generation_prompt=True)
    if prompt.text is not None:
        return prompt.text
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in prompt.chat()]
    return "\n\n".join([*blocks, "Assistant:"])


def encode_prompt(prompt: Prompt, tokenizer: Any) -> list[int]:
    """Token ids of the rendered prompt.

    A chat template writes its own special tokens (BOS and role markers), so the tokenizer adds
    none on top; plain text gets the tokenizer's usual special tokens.
    """
    text = render_prompt(prompt, tokenizer)
    add_special = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
