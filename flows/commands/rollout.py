"""`miles rollout`: generate scored samples from a checkpoint into rollout Parquet parts.

    miles rollout --model ckpt/hf --source data/math.jsonl --out runs/x/rollouts --n-samples 8 --max-new-tokens 512
    miles rollout --model ckpt/int4 --source 'reasoning_gym:chain_sum?size=64' --out memory://r \\
        --n-samples 4 --max-new-tokens 32 --partial-budget 2000 --temperature 0.8

With `--partial-budget` (tokens like 2000, or seconds like 30s) generation runs in rounds: each
round's finished groups are written as one part (`iter_N/part-K.parquet`), unfinished samples
are resumed first in the next round. The work is `miles_core.rollout`; this module parses
options and shows progress.
"""

from __future__ import annotations

import os
import time

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from miles_core.errors import MilesError

console = Console()

_DTYPES = ("float32", "bfloat16", "float16")


def rollout_command(
    model: str = typer.Option(..., "--model", help="HF checkpoint folder (bf16/fp32, FP8 or INT4) with its tokenizer."),
    source: list[str] = typer.Option(
        ..., "--source", help="Prompt source(s): JSONL/Parquet URL or reasoning_gym:NAME."
    ),
    out: str = typer.Option(..., "--out", help="Rollouts root (fsspec URL); parts go to OUT/iter_N/part-K.parquet."),
    n_samples: int = typer.Option(1, "--n-samples", min=1, help="Samples per prompt (a GRPO group)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    partial_budget: str = typer.Option(None, "--partial-budget", help="Per-round budget: 2000 (tokens) or 30s."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", min=0),
    min_p: float = typer.Option(0.0, "--min-p"),
    seed: int = typer.Option(0, "--seed", help="Engine seed (per-sample seeds derive from it)."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    size: int = typer.Option(None, "--size", help="Prompts per source (required for reasoning-gym)."),
    iteration: int = typer.Option(0, "--iteration", min=0),
    reward: str = typer.Option("auto", "--reward", help="auto | math | reasoning_gym | pkg.mod:fn | none"),
    max_slots: int = typer.Option(64, "--max-slots", min=1, help="Samples decoded together."),
    max_len: int = typer.Option(None, "--max-len", help="Cache positions per slot (default: longest prompt + new)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    dtype: str = typer.Option(
        None, "--dtype", help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)."
    ),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Decode under CUDA graphs (CUDA only)."),
    quantize: str = typer.Option(None, "--quantize", help="fp8 | int4: run quantized layers (quantize_model_)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the parts already in OUT/iter_N."),
) -> None:
    """Generate samples with the embedded engine and write scored rollout Parquet parts."""
    import torch

    from miles_core.data.sources import load_sources
    from miles_core.model import load_tokenizer
    from miles_core.rollout import Budget, EngineConfig, PartialRollout, SamplingParams, build_engine, requests_for
    from miles_core.rollout.writer import RolloutWriter

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in _DTYPES:
        raise MilesError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if cuda_graphs and not device.startswith("cuda"):
        raise MilesError("--cuda-graphs needs --device cuda")
    if quantize not in (None, "fp8", "int4"):
        raise MilesError(f"--quantize must be fp8 or int4, got {quantize!r}")
    sampling = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_new_tokens=max_new_tokens, stop=stop or []
    )
    budget = Budget.parse(partial_budget)
    if not os.path.isdir(model):
        raise MilesError(f"--model {model} is not a folder; pass an HF checkpoint folder (config.json, safetensors)")
    writer = RolloutWriter(out, iteration, overwrite=overwrite)  # refuse a used iter_N before loading anything
    prompts, report = load_sources(list(source), size=size)
    if not prompts:
        raise MilesError(f"no prompts in {', '.join(source)}")
    tokenizer = load_tokenizer(model)
    requests = requests_for(prompts, tokenizer, sampling, n_samples)
    longest = max(len(r.prompt_tokens) for r in requests)
    config = EngineConfig(
        max_slots=max_slots, max_len=max_len or longest + max_new_tokens, seed=seed, cuda_graphs=cuda_graphs
    )
    engine = build_engine(model, tokenizer, config, device, getattr(torch, dtype), quantize)
    engine.warmup()  # with --cuda-graphs: every length bucket's graph now, not mid-run (else nothing)
    partial = PartialRollout(engine, budget)
    stats = _run(partial, requests, writer, None if reward == "none" else reward, iteration)
    _print_summary(stats, writer)


def _run(partial, requests, writer, reward, iteration: int) -> dict:
    """Rounds until every group is finished; each round's finished groups become one part."""
    from miles_core.rollout.writer import sample_row, score_rows

    total = sum(r.n_samples for r in requests)
    stats = {"samples": 0, "tokens": 0, "rounds": 0, "aborted": 0, "rewards": [], "statuses": {}}
    start = time.monotonic()
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("rollout", total=total, rate="")

        def on_step(n_tokens, finished):
            stats["tokens"] += n_tokens
            elapsed = max(time.monotonic() - start, 1e-9)
            done = bar.tasks[0].completed + len(finished)
            rate = f"{done / elapsed:.1f} samples/s  {stats['tokens'] / elapsed:.0f} tok/s"
            bar.update(task, advance=len(finished), rate=rate)

        pending = requests
        while pending is not None or partial.carried:
            result = partial.run_round(pending, on_step=on_step)
            pending = None
            stats["rounds"] += 1
            stats["aborted"] += len(result.aborted)
            samples = [s for g in result.groups for s in g]
            rows = score_rows([sample_row(s, iteration) for s in samples], samples, reward)
            writer.write(rows)
            stats["samples"] += len(rows)
            stats["rewards"] += [r["reward"] for r in rows]
            for r in rows:
                stats["statuses"][r["status"]] = stats["statuses"].get(r["status"], 0) + 1
            bar.update(task, description=f"rollout (round {stats['rounds']}, {partial.carried} carried)")
    stats["seconds"] = time.monotonic() - start
    return stats


def _print_summary(stats: dict, writer) -> None:
    secs = max(stats["seconds"], 1e-9)
    rewards = stats["rewards"]
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    statuses = ", ".join(f"{k}={v}" for k, v in sorted(stats["statuses"].items()))
    console.print(
        f"{stats['samples']} samples, {stats['tokens']} tokens in {secs:.1f}s "
        f"({stats['samples'] / secs:.1f} samples/s, {stats['tokens'] / secs:.0f} tok/s); "
        f"{stats['rounds']} round(s), {stats['aborted']} interruption(s); mean reward {mean:.4f}; {statuses}"
    )
    for url in writer.urls:
        console.print(f"wrote {url}")


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout_command)
