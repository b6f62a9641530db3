"""The pipeline's stages as plain functions: `stage(out_dir, **inputs, **params) -> metrics`.

Each writes one artifact into `out_dir` (a local folder the caller publishes) and returns a dict of
metrics; inputs are local paths of upstream artifacts. They know nothing of Prefect: tasks/ wraps
them with retries, caching and the manifest, and tests call them directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

Progress = Callable[[float], None] | None


def _fraction(on_progress: Progress):
    if on_progress is None:
        return None
    return lambda done, total: on_progress(done / max(total, 1))


def build_base(out_dir: str, demo: dict[str, Any], on_progress: Progress = None) -> dict[str, Any]:
    """The demo base model (see miles_core.demo)."""
    from miles_core.demo import build_demo_base

    return build_demo_base(out_dir, demo, on_progress)


def convert(out_dir: str, hf: str, mtp_num_layers: int = 0, on_progress: Progress = None) -> dict[str, Any]:
    """HF checkpoint -> torch_dist (iter_0000000), the training state's format."""
    from miles_core.checkpoint import hf_to_torch_dist

    hf_to_torch_dist(hf, out_dir, mtp_num_layers=mtp_num_layers, overwrite=True, progress=_fraction(on_progress))
    return {"bytes": _size(out_dir)}


def rollout_weights(out_dir: str, ckpt: str, format: str = "int4", group_size: int = 128) -> dict[str, Any]:
    """torch_dist checkpoint -> the rollout engine's weights: FP8 / INT4 HF checkpoint, or bf16/fp32 HF.

    This is the artifact form of weight sync: after each train step the new checkpoint is
    re-quantized exactly as the trainer's QAT fake-quant sees it.
    """
    if format == "none":
        from miles_core.checkpoint import torch_dist_to_hf

        torch_dist_to_hf(ckpt, out_dir, overwrite=True)
    else:
        from miles_core.quant import quantize_checkpoint

        quantize_checkpoint(ckpt, out_dir, format=format, group_size=group_size, overwrite=True)
    return {"format": format, "bytes": _size(out_dir)}


def select_prompts(data: dict[str, Any], iteration: int, seed: int) -> list:
    """Iteration i's prompts: the train source minus the excluded sources, in a seeded order, the i-th
    slice of `prompts_per_iteration` (wrapping around), so every iteration (and a retrain's new ones)
    gets its own prompts, the same on every rerun."""
    import random

    from miles_core.data import load_prompts
    from miles_core.errors import MilesError

    pool, _ = load_prompts(data["train_source"])
    excluded = set()
    for spec in data.get("exclude_sources") or []:
        excluded |= {p.prompt_id for p in load_prompts(spec)[0]}
    pool = [p for p in pool if p.prompt_id not in excluded]
    if not pool:
        raise MilesError(
            f"no training prompts left in {data['train_source']} after excluding {data['exclude_sources']}"
        )
    random.Random(seed * 1_000_003 + data.get("seed", 0)).shuffle(pool)
    n = data["prompts_per_iteration"]
    start = ((iteration - 1) * n) % len(pool)
    return [pool[(start + j) % len(pool)] for j in range(min(n, len(pool)))]


def _sampling_params(sampling: dict[str, Any]):
    from miles_core.rollout.sampling import SamplingParams

    return SamplingParams(
        temperature=sampling["temperature"],
        top_p=sampling.get("top_p", 1.0),
        top_k=sampling.get("top_k", 0),
        min_p=sampling.get("min_p", 0.0),
        max_new_tokens=sampling["max_new_tokens"],
    )


def _engine_config(longest_prompt: int, params, sampling: dict[str, Any], seed: int, iteration: int):
    from miles_core.rollout.engine import EngineConfig

    return EngineConfig(
        max_slots=sampling.get("max_slots", 256),
        max_len=longest_prompt + params.max_new_tokens + 1,
        seed=seed * 7919 + iteration,
    )


def _progress(total: int, on_progress: Progress):
    done = [0]

    def on_step(_, finished):
        done[0] += len(finished)
        if on_progress is not None:
            on_progress(min(1.0, done[0] / max(total, 1)))

    return on_step


def _rollout_metrics(rows: list[dict], prompts: list, seconds: float) -> dict[str, Any]:
    tokens = sum(len(r["response_tokens"]) for r in rows)
    rewards = [r["reward"] for r in rows]
    return {
        "samples": len(rows),
        "prompts": len(prompts),
        "reward_mean": sum(rewards) / max(len(rewards), 1),
        "response_tokens": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "samples_per_s": len(rows) / max(seconds, 1e-9),
        "generate_seconds": seconds,
    }


def _generate(weights: str, prompts: list, sampling: dict[str, Any], n_samples: int, iteration: int, seed: int,
              reward: str, out: str | None, on_progress: Progress):  # fmt: skip
    """Samples from the engine on the rollout weights; rows written to `out` (a rollouts iter folder)."""
    import time

    from miles_core.data import encode_prompt, write_rollouts
    from miles_core.model import load_tokenizer
    from miles_core.rollout.generate import generate_rollouts
    from miles_core.train.checkpoint import load_policy

    model, tok = load_policy(weights), load_tokenizer(weights)  # HF, FP8/INT4 HF or torch_dist
    params = _sampling_params(sampling)
    engine = _engine_config(max(len(encode_prompt(p, tok)) for p in prompts), params, sampling, seed, iteration)
    start = time.time()
    on_step = _progress(len(prompts) * n_samples, on_progress)
    rows = generate_rollouts(model, tok, prompts, params, n_samples, iteration=iteration, reward=reward,
                             engine_config=engine, on_step=on_step)  # fmt: skip
    if out is not None:
        write_rollouts(rows, os.path.join(out, "part-0.parquet"))
    return rows, _rollout_metrics(rows, prompts, time.time() - start)


CARRY_FILE = "carry.pkl"


def _partial_round(out_dir: str, weights: str, prompts: list, sampling: dict[str, Any], iteration: int, seed: int,
                   reward: str, carry: str | None, on_progress: Progress) -> dict[str, Any]:  # fmt: skip
    """One partial-rollout round: resume the previous iteration's carried samples first (their new
    tokens under this iteration's weights, version iteration-1), start this iteration's prompts,
    stop at the token budget; write the groups that finished, pickle the rest for the next round."""
    import pickle
    import time

    from miles_core.data import encode_prompt, write_rollouts
    from miles_core.model import load_tokenizer
    from miles_core.rollout.generate import build_engine, generate_rollouts
    from miles_core.rollout.partial import Budget, PartialRollout
    from miles_core.train.checkpoint import load_policy

    carried = []
    if carry is not None and os.path.exists(os.path.join(carry, CARRY_FILE)):
        with open(os.path.join(carry, CARRY_FILE), "rb") as f:
            carried = pickle.load(f)  # our own artifact, written below
    model, tok = load_policy(weights), load_tokenizer(weights)  # HF, FP8/INT4 HF or torch_dist
    params = _sampling_params(sampling)
    longest = max([len(encode_prompt(p, tok)) for p in prompts] + [len(s.prompt_tokens) for s in carried])
    engine = build_engine(model, tok, _engine_config(longest, params, sampling, seed, iteration))
    engine.update_weights(model, version=iteration - 1)  # same object: only the version tag changes
    partial = PartialRollout(engine, Budget(tokens=sampling["partial_budget_tokens"]))
    partial.restore(carried)
    start = time.time()
    n = sampling["n_samples"]
    rows = generate_rollouts(None, tok, prompts, params, n, iteration=iteration, reward=reward, partial=partial,
                             on_step=_progress((len(prompts) + len(carried)) * n, on_progress))  # fmt: skip
    if rows:
        write_rollouts(rows, os.path.join(out_dir, "part-0.parquet"))
    state = partial.state()
    with open(os.path.join(out_dir, CARRY_FILE), "wb") as f:
        pickle.dump(state, f)
    metrics = _rollout_metrics(rows, prompts, time.time() - start)
    resumed = sum(1 for r in rows if len(set(list(r.get("logprob_versions", ())))) > 1)  # tokens of 2+ versions
    metrics.update(carried_in=len(carried), carried_out=len(state), resumed_samples=resumed)
    return metrics


def rollout(
    out_dir: str,
    weights: str,
    data: dict[str, Any],
    sampling: dict[str, Any],
    iteration: int,
    seed: int,
    carry: str | None = None,
    on_progress: Progress = None,
) -> dict[str, Any]:
    """Generate the iteration's groups on the current rollout weights into a rollouts folder
    (`part-0.parquet`: tokens, log-probs, routed experts, rewards, statuses, weight version).

    With `sampling["partial_budget_tokens"]` the round stops at that many generated tokens; groups
    still unfinished are saved in `carry.pkl` and resumed first by the next iteration (`carry` is
    the previous rollouts folder), their old tokens tagged with the older weight version."""
    prompts = select_prompts(data, iteration, seed)
    if sampling.get("partial_budget_tokens"):
        return _partial_round(out_dir, weights, prompts, sampling, iteration, seed, data["reward"], carry, on_progress)
    _, metrics = _generate(
        weights, prompts, sampling, sampling["n_samples"], iteration, seed, data["reward"], out_dir, on_progress
    )
    return metrics


def train(
    out_dir: str, ckpt: str, rollouts: str, train: dict[str, Any], iteration: int, on_progress: Progress = None
) -> dict[str, Any]:
    """One iteration of GRPO on the rollouts, from checkpoint `ckpt` (optimizer state resumed) to `out_dir`."""
    from miles_core.train.config import TrainConfig
    from miles_core.train.trainer import train as run_train

    cfg = TrainConfig(**train)
    if not any(f.startswith("part-") for f in os.listdir(rollouts)):
        # A partial-rollout round can finish no group at all: nothing to learn from, the policy
        # (and its optimizer state) carries over unchanged.
        import shutil

        shutil.copytree(ckpt, out_dir, dirs_exist_ok=True)
        return {"optimizer_steps": 0, "empty_rollout": 1}
    progress = None if on_progress is None else (lambda done, total, _m: on_progress(done / max(total, 1)))
    steps = run_train(ckpt, rollouts, out_dir, cfg, device="cpu", progress=progress)
    return summarize_steps(steps)


def summarize_steps(steps: list[dict[str, float]]) -> dict[str, Any]:
    """Mean of each metric over the optimizer steps, plus the step count and skipped updates."""
    out: dict[str, Any] = {"optimizer_steps": len(steps)}
    keys = sorted({k for s in steps for k in s})
    for k in keys:
        vals = [float(s[k]) for s in steps if k in s and s[k] is not None]
        if vals:
            out[k] = sum(vals) / len(vals)
    out["skipped_steps"] = sum(1 for s in steps if s.get("skipped"))
    return out


def evaluate(out_dir: str, weights: str, eval: dict[str, Any], seed: int, on_progress: Progress = None) -> dict:
    """pass@k / maj@k / mean reward of the weights on the eval source: samples + results + summary."""
    import pyarrow as pa

    from miles_core.data import load_prompts, rollouts_table
    from miles_core.eval.evaluate import evaluate_samples
    from miles_core.eval.store import write_evaluation

    prompts, _ = load_prompts(eval["source"])
    sampling = {
        "temperature": eval["temperature"],
        "max_new_tokens": eval["max_new_tokens"],
        "max_slots": eval.get("max_slots", 256),
    }
    rows, gen = _generate(
        weights,
        prompts,
        sampling,
        eval["n_samples"],
        0,
        seed + 104729,
        eval["reward"],
        os.path.join(out_dir, "samples"),
        on_progress,
    )
    table = rollouts_table(rows)
    table = table.append_column("source", pa.array([p.source for p in _expand(prompts, rows)], pa.string()))
    result = evaluate_samples(table, eval["k"])
    write_evaluation(result, out_dir)
    overall = result.summary["overall"]
    return {
        **{k: v for k, v in overall.items() if isinstance(v, (int, float))},
        "eval_tokens_per_s": gen["tokens_per_s"],
    }


def _expand(prompts: list, rows: list[dict]) -> list:
    """The prompt of each row (rows carry prompt_id)."""
    by_id = {p.prompt_id: p for p in prompts}
    return [by_id[r["prompt_id"]] for r in rows]


def compare_evals(before: str, after: str, seed: int = 0) -> dict[str, Any]:
    """Per-metric `after - before` with a paired bootstrap 95% interval, from two evaluation folders."""
    from miles_core.eval.compare import compare_evaluations
    from miles_core.eval.store import read_evaluation

    cmp = compare_evaluations(read_evaluation(before), read_evaluation(after), seed=seed)
    return {m: {"delta": v["delta"], "low": v["ci_low"], "high": v["ci_high"]} for m, v in cmp["metrics"].items()}


def export(out_dir: str, ckpt: str) -> dict[str, Any]:
    """The final torch_dist checkpoint -> HF safetensors (loadable by transformers)."""
    from miles_core.checkpoint import torch_dist_to_hf

    torch_dist_to_hf(ckpt, out_dir, overwrite=True)
    return {"bytes": _size(out_dir)}


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
