"""`miles quantize`: write an FP8 or INT4 rollout checkpoint from an HF (or torch_dist) checkpoint.

    miles quantize --src ckpt/hf --out ckpt/fp8 --format fp8
    miles quantize --src ckpt/hf --out ckpt/int4 --format int4 --group-size 128
    miles quantize --src ckpt/hf --out ckpt/int4-all --format int4 --scope linear --keep lm_head --keep mlp\\.gate

The work is `miles_core.quant.quantize_checkpoint`; this module parses options and shows progress.
"""

from __future__ import annotations

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from miles_core.errors import MilesError


def quantize_command(
    src: str = typer.Option(
        ..., "--src", help="Source checkpoint folder: HF (config.json + safetensors) or torch_dist."
    ),
    out: str = typer.Option(..., "--out", help="Output folder; written atomically, must not exist (see --overwrite)."),
    fmt: str = typer.Option("fp8", "--format", help="fp8 (e4m3, 128x128 blocks) | int4 (W4A16, compressed-tensors)."),
    group_size: int = typer.Option(128, "--group-size", help="INT4 group size along the input dimension."),
    scope: str = typer.Option(None, "--scope", help="linear | experts (default: linear for fp8, experts for int4)."),
    keep: list[str] = typer.Option(
        None,
        "--keep",
        help="Regex of weights kept in high precision (repeatable; "
        "replaces the default: embeddings, lm_head, norms, routers).",
    ),
    pow2_scales: bool = typer.Option(False, "--pow2-scales", help="FP8: power-of-two block scales."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Quantize a checkpoint for rollout: FP8 (DeepSeek-V3 block format) or INT4 (W4A16)."""
    from miles_core.quant import quantize_checkpoint
    from miles_core.quant.hf_format import DEFAULT_KEEP

    if fmt not in ("fp8", "int4"):
        raise MilesError(f"--format must be fp8 or int4, got {fmt!r}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(f"quantizing to {fmt}", total=None)
        path = quantize_checkpoint(
            src, out, fmt, group_size, scope=scope, keep=keep or DEFAULT_KEEP, pow2_scales=pow2_scales,
            overwrite=overwrite, progress=lambda name: bar.update(task, description=f"{fmt}: {name}"),
        )  # fmt: skip
    typer.echo(f"wrote {fmt} checkpoint to {path}")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
