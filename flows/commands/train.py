"""`miles train`: GRPO (or SFT) on rollout Parquet, from an HF or torch_dist checkpoint.

    miles train --ckpt runs/x/ckpt --rollouts runs/x/rollouts/iter_3 --out runs/x/ckpt --lr 1e-6
    miles train --ckpt base/hf --rollouts data/sft.parquet --out ckpt/sft --mode sft --lr 3e-3
    miles train --ckpt ... --config configs/demo.yaml --set eps_clip_high=0.28 --set tis=true

A torch_dist `--ckpt` written by the trainer resumes its optimizer, schedule, step and RNG; the new
checkpoint is written into `--out` as `iter_<step>/`. The work is `miles_core.train.train`; this
module parses options and shows progress.
"""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from miles_core.errors import MilesError

console = Console()

SHOWN = ("loss", "reward/mean", "grad_norm", "policy/clip_frac", "mismatch/k3_kl", "routing/mismatch_frac",
         "skipped", "tokens_per_s")  # fmt: skip


def parse_sets(items: list[str] | None) -> dict:
    """`key=value` pairs (YAML values: 1e-6, true, null) -> dict."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MilesError(f"--set takes key=value (a TrainConfig field), got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def train_command(
    ckpt: str = typer.Option(..., "--ckpt", help="HF checkpoint folder or torch_dist checkpoint (resumes it)."),
    rollouts: str = typer.Option(..., "--rollouts", help="Rollout Parquet: a part file or a folder (fsspec URL)."),
    out: str = typer.Option(..., "--out", help="Folder for the torch_dist checkpoint (iter_<step>/)."),
    config: str = typer.Option(None, "--config", help="YAML with TrainConfig fields (top level or `train:`)."),
    mode: str = typer.Option(None, "--mode", help="grpo | sft"),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate."),
    kl_coef: float = typer.Option(None, "--kl-coef", help="KL to the reference (0 = no reference model)."),
    micro_batch_tokens: int = typer.Option(None, "--micro-batch-tokens", help="Token budget per micro-batch."),
    steps_per_rollout: int = typer.Option(None, "--steps-per-rollout", help="Optimizer steps per rollout batch."),
    r3: bool = typer.Option(None, "--r3/--no-r3", help="Replay the rollout's routed experts."),
    tis: bool = typer.Option(None, "--tis/--no-tis", help="Truncated importance sampling vs rollout log-probs."),
    mis: bool = typer.Option(None, "--mis/--no-mis", help="Masked importance sampling vs rollout log-probs."),
    qat: str = typer.Option(None, "--qat", help="none | int4 | fp8 (fake-quant forward)."),
    mtp_loss_scale: float = typer.Option(None, "--mtp-loss-scale", help="Online MTP loss weight (0 = off)."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (CUDA)."),
    seed: int = typer.Option(None, "--seed"),
    sets: list[str] = typer.Option(None, "--set", help="Any TrainConfig field: key=value (repeatable)."),
    ref_ckpt: str = typer.Option(None, "--ref-ckpt", help="Reference model for KL (default: the policy at start)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Train the policy on rollouts (GRPO) or on response tokens (SFT); write a torch_dist checkpoint."""
    from miles_core.train import TrainConfig, train

    overrides = dict(mode=mode, lr=lr, kl_coef=kl_coef, micro_batch_tokens=micro_batch_tokens,
                     steps_per_rollout=steps_per_rollout, r3=r3, tis=tis, mis=mis, qat=qat,
                     mtp_loss_scale=mtp_loss_scale, bf16=bf16, seed=seed)  # fmt: skip
    overrides.update(parse_sets(sets))
    cfg = TrainConfig.load(config, **overrides)
    console.print(f"train [bold]{cfg.mode}[/]: {ckpt} + {rollouts} -> {out}")
    start = time.monotonic()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("rollout batches", total=None, info="loading")

        def progress(done: int, total: int, m: dict) -> None:
            info = f"loss {m.get('loss', 0):.4f}  reward {m.get('reward/mean', 0):.3f}"
            info += f"  {m.get('tokens_per_s', 0):.0f} tok/s"
            bar.update(task, completed=done, total=total, info=info)

        metrics = train(ckpt, rollouts, out, cfg, device=device, ref_ckpt=ref_ckpt, progress=progress)
    _print_metrics(metrics)
    console.print(f"wrote {out} (step {int(metrics[-1]['step']) if metrics else 0}) in {time.monotonic() - start:.1f}s")


def _print_metrics(metrics: list[dict]) -> None:
    if not metrics:
        return
    keys = [k for k in SHOWN if k in metrics[-1]]
    table = Table(title="train steps")
    table.add_column("step", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    for m in metrics:
        table.add_row(str(int(m["step"])), *(f"{m[k]:.4g}" for k in keys))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
