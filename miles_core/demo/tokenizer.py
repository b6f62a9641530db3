"""A real, self-contained character-level tokenizer for the demo model (no hub download).

Built with the `tokenizers` library and saved as `tokenizer.json` + `tokenizer_config.json`, so
`transformers.AutoTokenizer.from_pretrained(dir)` loads it like any published tokenizer. One token
per printable ASCII character, plus `<|pad|>`, `<|endoftext|>` (end of a response) and `<|unk|>`.

Its chat template renders a conversation compactly for a tiny model: the last user message only,
keeping the text after its last ':' (reasoning-gym's "State the final answer to the following
arithmetic problem: 15 - 43 =" becomes "15 - 43 =") — a small model spends no capacity on a
constant instruction. With `add_generation_prompt` a single space follows, after which the model
writes its answer.
"""

from __future__ import annotations

import os
import string

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
CHARS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]  # 95 printable ASCII incl. space

CHAT_TEMPLATE = (
    "{%- set text = messages[-1]['content'] -%}"
    "{%- if ':' in text -%}{%- set text = text.split(':')[-1] | trim -%}{%- endif -%}"
    "{{ text }}{%- if add_generation_prompt %} {% endif -%}"
)


def build_char_tokenizer():
    """A PreTrainedTokenizerFast with ids: 0 pad, 1 eos, 2 unk, then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_char_tokenizer(out_dir: str):
    os.makedirs(out_dir, exist_ok=True)
    tok = build_char_tokenizer()
    tok.save_pretrained(out_dir)
    return tok
