"""Shared pieces of the rollout tests: tiny checkpoints (cached per session), a char tokenizer,
one-thread torch (tiny ops are dominated by thread wake-ups on 2 busy cores), and a check that
the char tokenizer round-trips (so the tests that decode text can trust it)."""

import atexit
import pathlib
import shutil
import tempfile

import pytest
import torch

from miles_core.model import load_model
from tests.tiny_models import CONFIGS, save_hf

_CACHE: dict = {}
_ROOT = pathlib.Path(tempfile.mkdtemp(prefix="miles-rollout-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(arch: str, seed: int = 0, **kw):
    """(path, hf_model, miles_model) of a tiny random checkpoint, built once per (arch, seed, kw)."""
    key = (arch, seed, tuple(sorted(kw.items())))
    if key not in _CACHE:
        name = f"{arch}-{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
        path, hf = save_hf(CONFIGS[arch](**kw), str(_ROOT / name), seed=seed)
        _CACHE[key] = (path, hf, load_model(path).eval())
    return _CACHE[key]


def char_tokenizer():
    from miles_core.demo.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def ragged_prompts(lengths, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_char_tokenizer_round_trips_text():
    tok = char_tokenizer()
    ids = tok("12 + 7 = 19", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("12 + 7 = 19")
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "12 + 7 = 19"
