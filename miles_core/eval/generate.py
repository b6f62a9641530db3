"""`evaluate_model`: generate samples from a checkpoint with the rollout engine, then evaluate them.

The samples are ordinary rollouts (written under `out/rollouts/iter_0/` when `out` is given), so
an evaluation can be re-run, re-scored or compared later from its files alone. Prompt sources
default to their `eval` split: reasoning-gym tasks then never show an evaluation question that a
training run on the `train` split could have seen. pass@k needs n >= k samples per prompt, so
`n_samples` defaults to the largest k. The engine is imported lazily (and checked for), so the
rest of evaluation works without it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from miles_core.data.rollouts import rollouts_table
from miles_core.data.sources import load_sources
from miles_core.errors import MilesError
from miles_core.eval.evaluate import evaluate_samples
from miles_core.eval.run import EvalRun, finish_evaluation
from miles_core.io import join

__all__ = ["ENGINE_MODULE", "evaluate_model", "generation_available"]

ENGINE_MODULE = "miles_core.rollout.engine"
_DTYPES = ("float32", "bfloat16", "float16")


def generation_available() -> bool:
    """Whether the rollout engine that `evaluate_model` generates with is installed."""
    try:
        return importlib.util.find_spec(ENGINE_MODULE) is not None
    except ModuleNotFoundError:
        return False


def evaluate_model(
    model: str,
    sources: Sequence[str],
    out_url: str | None = None,
    ks: Sequence[int] = (1,),
    *,
    n_samples: int | None = None,
    size: int | None = None,
    split: str = "eval",
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    reward: str | None = "auto",
    correct_threshold: float = 1.0,
    compare_to: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_slots: int = 64,
) -> EvalRun:
    """Generate `n_samples` per prompt of `sources` with the checkpoint at `model`; evaluate at `ks`."""
    ks = sorted({int(k) for k in ks})
    n = n_samples or ks[-1]
    if n < ks[-1]:
        raise MilesError(f"--n-samples {n} is below the largest k ({ks[-1]}); pass@k needs n >= k")
    if dtype not in _DTYPES:
        raise MilesError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if not os.path.isdir(model):
        raise MilesError(f"--model {model} is not a folder; pass an HF checkpoint folder (config.json, safetensors)")
    if not generation_available():
        raise MilesError(f"generation needs the rollout engine ({ENGINE_MODULE}), which this install lacks")
    if not sources:
        raise MilesError("evaluating a model needs prompts: pass --source")
    prompts, _ = load_sources(list(sources), size=size, split=split)
    if not prompts:
        raise MilesError(f"no prompts in {', '.join(sources)}")
    rows = _generate(model, prompts, n, temperature, top_p, max_new_tokens, seed, reward, device, dtype, max_slots,
                     out=join(out_url, "rollouts") if out_url else None)  # fmt: skip
    result = evaluate_samples(rollouts_table(rows), ks, correct_threshold)
    result.summary.update(model=model, sources=list(sources), n_samples_per_prompt=n, temperature=temperature)
    if out_url:
        result.summary["rollouts"] = join(out_url, "rollouts", "iter_0")
    return finish_evaluation(result, out_url, compare_to, seed=seed)


def _generate(model, prompts, n, temperature, top_p, max_new_tokens, seed, reward, device, dtype, max_slots, out):
    """Scored rollout rows from the engine (imported here: evaluation of files must not need torch models)."""
    import torch

    from miles_core.model import load_tokenizer
    from miles_core.rollout import SamplingParams, build_engine, generate_rollouts, requests_for
    from miles_core.rollout.generate import fit_config

    tokenizer = load_tokenizer(model)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    config = fit_config(requests_for(prompts, tokenizer, sampling, n), max_slots).model_copy(update={"seed": seed})
    engine = build_engine(model, tokenizer, config, device, getattr(torch, dtype))
    return generate_rollouts(engine, tokenizer, prompts, sampling, n, reward=reward, out=out)
