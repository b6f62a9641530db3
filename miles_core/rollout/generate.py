"""`generate_rollouts`: prompts in, scored rollout rows out (what the pipeline and `miles eval` call).

    rows = generate_rollouts(model, tokenizer, prompts, SamplingParams(temperature=1.0), n_samples=8)
    rows = generate_rollouts(engine, tokenizer, prompts, sampling, 8, partial=partial, out=url)

`model` is a model object (the trainer's: shared, no copy), an `Engine` to reuse (its cache and
weight version), or a checkpoint path (`load_model`, which dequantizes FP8/INT4 checkpoints).
With a `PartialRollout`, one call is one round: carried samples resume first, and only the groups
finished in this round come back (the rest stay in `partial` for the next call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from miles_core.data.chat import encode_prompt
from miles_core.data.prompt import Prompt
from miles_core.rollout.engine import Engine, EngineConfig
from miles_core.rollout.partial import PartialRollout
from miles_core.rollout.sampling import SamplingParams
from miles_core.rollout.sequence import Request, Sample
from miles_core.rollout.writer import RolloutWriter, sample_row, score_rows

__all__ = ["as_sampling", "build_engine", "fit_config", "generate_rollouts", "generation_eos_ids", "requests_for"]


def build_engine(
    model: Any,
    tokenizer: Any = None,
    config: EngineConfig | None = None,
    device="cpu",
    dtype=torch.float32,
    quantize: str | None = None,
) -> Engine:
    """An Engine on a model object, or on the checkpoint at a path (tokenizer loaded beside it if None).

    A path is loaded with `load_model` (an FP8/INT4 checkpoint is dequantized, exactly); its
    `generation_config.json` EOS ids stop generation too. `quantize` ("fp8" | "int4") swaps the
    layers for quantized ones (`miles_core.quant.quantize_model_`, default scope and keep) so that
    decode runs the low-precision kernels.
    """
    if isinstance(model, Engine):
        return model
    eos: set[int] = set()
    if isinstance(model, str):
        from miles_core.model import load_model, load_tokenizer

        path, model = model, load_model(model, device=device, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        eos = generation_eos_ids(path)
    if quantize is not None:
        from miles_core.quant import quantize_model_

        quantize_model_(model, quantize)
    return Engine(model, tokenizer, config, eos_token_ids=eos)


def generation_eos_ids(path: str) -> set[int]:
    """EOS ids from an HF checkpoint's generation_config.json (chat models often list several)."""
    import json
    import os

    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return set()
    with open(file) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list) else {int(eos)}


def as_sampling(sampling: Any) -> SamplingParams:
    """SamplingParams from itself, a dict, or any pydantic config with some of its fields (e.g. the
    pipeline's rollout config); fields SamplingParams does not know are ignored."""
    if isinstance(sampling, SamplingParams):
        return sampling
    values = sampling.model_dump() if hasattr(sampling, "model_dump") else dict(sampling or {})
    return SamplingParams(**{k: v for k, v in values.items() if k in SamplingParams.model_fields})


def requests_for(prompts: Sequence[Prompt], tokenizer: Any, sampling: Any, n_samples: int) -> list[Request]:
    """One request per prompt (tokens from `encode_prompt`: the chat template when there is one)."""
    sampling = as_sampling(sampling)
    return [Request(p.prompt_id, encode_prompt(p, tokenizer), sampling, n_samples, prompt=p) for p in prompts]


def fit_config(requests: Sequence[Request], max_slots: int = 64) -> EngineConfig:
    """A cache just big enough: max_len = longest prompt + max_new_tokens, slots <= the samples asked for."""
    longest = max((len(r.prompt_tokens) + r.sampling.max_new_tokens for r in requests), default=2)
    total = sum(r.n_samples for r in requests)
    return EngineConfig(max_slots=max(1, min(max_slots, total)), max_len=max(2, longest + 1))


def generate_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    sampling: SamplingParams | Any,
    n_samples: int = 1,
    *,
    iteration: int = 0,
    reward: Any = "auto",
    engine_config: EngineConfig | None = None,
    partial: PartialRollout | None = None,
    out: str | None = None,
    part: int = 0,
    on_step: Callable[[int, list[Sample]], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate `n_samples` per prompt; return scored rows (and write them to `out` as part `part`).

    sampling: SamplingParams, or a dict / pydantic config with its field names (see `as_sampling`).
    engine_config: the engine's capacity when one is built here (default: `fit_config`).
    reward: a spec for `miles_core.rewards.score_samples` ("auto", "math", "pkg.mod:fn", a callable)
    or None for reward 0. partial: run one round of this partial rollout (its engine is used).
    """
    if partial is not None or isinstance(model, Engine):
        engine = partial.engine if partial is not None else model
        tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        requests = requests_for(prompts, tokenizer, sampling, n_samples)
    else:
        if tokenizer is None and isinstance(model, str):
            from miles_core.model import load_tokenizer

            tokenizer = load_tokenizer(model)
        requests = requests_for(prompts, tokenizer, sampling, n_samples)
        engine = build_engine(model, tokenizer, engine_config or fit_config(requests))
    if partial is None:
        samples = engine.generate(requests, on_step=on_step)
    else:
        result = partial.run_round(requests, on_step=on_step)
        samples = [s for group in result.groups for s in group]
    rows = score_rows([sample_row(s, iteration) for s in samples], samples, reward)
    if out is not None:
        RolloutWriter(out, iteration, part).write(rows)
    return rows
