"""`miles eval`: evaluate samples (pass@k, maj@k, mean reward per source) and compare runs.

    miles eval --rollouts runs/x/rollouts/iter_3 --k 1,4,8 --out runs/x/eval/iter_3
    miles eval --rollouts ... --source reasoning_gym:chain_sum?size=200&split=eval --reward auto
    miles eval --rollouts ... --out runs/y/eval --compare-to runs/x/eval/iter_3

The work is `miles_core.eval.evaluate_rollouts`; this module only parses options and prints.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from miles_core.errors import MilesError

console = Console()


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
    source: list[str] = typer.Option(None, "--source", help="Prompt source(s) to re-score against."),
    reward: str = typer.Option(None, "--reward", help="auto | math | reasoning_gym | package.module:function"),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first reward error instead of counting."),
    threshold: float = typer.Option(1.0, "--correct-threshold", help="Reward at or above which a sample is correct."),
    compare_to: str = typer.Option(None, "--compare-to", help="A previous evaluation folder to compare with."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resampling."),
    model: str = typer.Option(None, "--model", help="Checkpoint to generate samples with (needs the rollout engine)."),
    n_samples: int = typer.Option(None, "--n-samples", help="Samples per prompt when generating with --model."),
) -> None:
    """Evaluate generated samples: mean reward, pass@k, maj@k, per source; optionally compare."""
    from miles_core.eval.run import evaluate_rollouts, require_generation

    if model is not None:
        require_generation()
    if rollouts is None:
        raise MilesError("nothing to evaluate: pass --rollouts URL (or --model DIR once generation is available)")
    ks = parse_ks(k)
    run = evaluate_rollouts(
        rollouts, out, ks, sources=source, reward=reward, strict=strict,
        correct_threshold=threshold, compare_to=compare_to, seed=seed,
    )  # fmt: skip
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
    console.print(table)
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
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
