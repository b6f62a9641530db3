"""`miles eval`: evaluate samples (pass@k, maj@k, mean reward per source) and compare runs.

    miles eval --rollouts runs/x/rollouts/iter_3 --k 1,4,8 --out runs/x/eval/iter_3
    miles eval --rollouts ... --source reasoning_gym:chain_sum?size=200&split=eval --reward auto
    miles eval --rollouts ... --out runs/y/eval --compare-to runs/x/eval/iter_3
    miles eval --model ckpt/hf --source 'reasoning_gym:chain_sum?size=100' --n-samples 8 --k 1,4,8 \\
        --out runs/x/eval/base

The work is `miles_core.eval.evaluate_rollouts` / `evaluate_model`; this module parses options
and prints. With --model, sources default to their eval split (reasoning-gym) and the samples are
kept under OUT/rollouts/.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from miles_core.errors import MilesError

console = Console()


def _show(table: Table) -> None:
    """Print a table; into a file or pipe (logs, CI) at full width, since nobody can widen those."""
    (console if console.is_terminal else Console(width=200)).print(table)


def parse_ks(text: str) -> list[int]:
    """`1,4,8` -> [1, 4, 8]; anything else is a user error."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise MilesError(f"--k must be comma-separated positive integers like 1,4,8, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise MilesError(f"--k must be comma-separated positive integers like 1,4,8, got {text!r}")
    return ks


def eval_command(
    rollouts: str = typer.Option(None, "--rollouts", help="Rollouts Parquet: a part file or a folder of parts."),
    k: str = typer.Option("1", "--k", help="Comma-separated k values for pass@k and maj@k, e.g. 1,4,8."),
    out: str = typer.Option(None, "--out", help="Folder (fsspec URL) for results.parquet and summary.json."),
    source: list[str] = typer.Option(
        None, "--source", help="Prompt source(s): generate from (--model) or re-score against (--rollouts)."
    ),
    reward: str = typer.Option(None, "--reward", help="auto | math | reasoning_gym | package.module:function"),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first reward error instead of counting."),
    threshold: float = typer.Option(1.0, "--correct-threshold", help="Reward at or above which a sample is correct."),
    compare_to: str = typer.Option(None, "--compare-to", help="A previous evaluation folder to compare with."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling (and of the engine with --model)."),
    model: str = typer.Option(None, "--model", help="HF checkpoint folder to generate samples with."),
    n_samples: int = typer.Option(None, "--n-samples", help="Samples per prompt with --model (default: largest k)."),
    size: int = typer.Option(None, "--size", help="Prompts per source (required for reasoning-gym)."),
    split: str = typer.Option("eval", "--split", help="Split of reasoning-gym sources (train | eval)."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature with --model."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda, with --model."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16, with --model."),
) -> None:
    """Evaluate samples (given, or generated with --model): mean reward, pass@k, maj@k per source."""
    from miles_core.eval import evaluate_model, evaluate_rollouts

    ks = parse_ks(k)
    if model is not None and rollouts is not None:
        raise MilesError("pass either --model (generate, then evaluate) or --rollouts (evaluate), not both")
    if model is not None:
        run = evaluate_model(
            model, source or [], out, ks, n_samples=n_samples, size=size, split=split, temperature=temperature,
            max_new_tokens=max_new_tokens, seed=seed, reward=reward or "auto", correct_threshold=threshold,
            compare_to=compare_to, device=device, dtype=dtype,
        )  # fmt: skip
    elif rollouts is not None:
        run = evaluate_rollouts(
            rollouts, out, ks, sources=source, size=size, split=split, reward=reward, strict=strict,
            correct_threshold=threshold, compare_to=compare_to, seed=seed,
        )  # fmt: skip
    else:
        raise MilesError("nothing to evaluate: pass --rollouts URL, or --model DIR with --source")
    _print_summary(run.result.summary, ks)
    if run.comparison is not None:
        _print_comparison(run.comparison)
    if out:
        console.print(f"wrote {out}")


def _print_summary(summary: dict, ks: list[int]) -> None:
    metrics = ["mean_reward", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in ks)]
    table = Table(title=f"{summary['n_prompts']} prompts, {summary['n_samples']} samples")
    table.add_column("source")
    table.add_column("prompts", justify="right")
    for m in metrics:
        table.add_column(m, justify="right")
    rows = [("all", summary["overall"]), *summary["by_source"].items()]
    for name, agg in rows:
        table.add_row(name, str(agg["n_prompts"]), *(f"{agg[m]:.4f}" for m in metrics))
    _show(table)
    counts = summary.get("score_counts")
    if counts:
        console.print(f"re-scored {counts['samples']} samples: {counts['errors']} reward error(s)")
    if summary.get("status_counts"):
        console.print("status: " + ", ".join(f"{k}={v}" for k, v in summary["status_counts"].items()))


def _print_comparison(comparison: dict) -> None:
    pct = int(round(comparison["confidence"] * 100))
    table = Table(title=f"new - base on {comparison['n_paired']} shared prompts ({pct}% paired bootstrap CI)")
    for col in ("metric", "base", "new", "delta", "CI"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in comparison["metrics"].items():
        ci = f"[{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]" + (" *" if m["significant"] else "")
        table.add_row(name, f"{m['base']:.4f}", f"{m['new']:.4f}", f"{m['delta']:+.4f}", ci)
    _show(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
