"""`miles convert`: HF safetensors <-> torch_dist (megatron-core names and layout), with MTP layers.

    miles convert hf-to-torch-dist --hf models/Qwen3-30B-A3B --out ckpt/qwen3 [--mtp-num-layers 1]
    miles convert torch-dist-to-hf --ckpt ckpt/qwen3 --out hf/qwen3 [--iteration 200] [--include-mtp]

The work is `miles_core.checkpoint.hf_to_torch_dist` / `torch_dist_to_hf`; this module parses options
and draws the progress bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

console = Console(stderr=True)


@contextlib.contextmanager
def _bar(label: str, unit: str) -> Iterator:
    """Yields a callback `(done, total)` for miles_core's `progress=`; the rich bar appears on the first
    call, so an input error is printed alone."""
    columns = [BarColumn(), DownloadColumn() if unit == "bytes" else MofNCompleteColumn(), TimeElapsedColumn()]
    state: dict = {}

    def update(done: int, total: int) -> None:
        if not state:
            state["progress"] = Progress("[bold]{task.description}", *columns, console=console)
            state["progress"].start()
            state["task"] = state["progress"].add_task(label, total=total)
        state["progress"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if state:
            state["progress"].stop()


def hf_to_torch_dist_command(
    hf: str = typer.Option(..., "--hf", help="HF checkpoint folder (config.json + *.safetensors)."),
    out: str = typer.Option(..., "--out", help="Output folder for the torch_dist checkpoint."),
    mtp_num_layers: int = typer.Option(
        0, "--mtp-num-layers", help="Create N fresh MTP layers when the checkpoint has none."
    ),
    release: bool = typer.Option(False, "--release", help="Write release/ (what Megatron-LM loads) not iter_0000000/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Convert an HF checkpoint to torch_dist (Megatron-core names and layout), streaming."""
    from miles_core.checkpoint import hf_to_torch_dist

    with _bar("hf -> torch_dist", "bytes") as update:
        path = hf_to_torch_dist(
            hf, out, mtp_num_layers=mtp_num_layers, iteration=None if release else 0, overwrite=overwrite,
            progress=update,
        )  # fmt: skip
    console.print(f"wrote {path}")


def torch_dist_to_hf_command(
    ckpt: str = typer.Option(
        ..., "--ckpt", help="torch_dist checkpoint folder (with latest_checkpointed_iteration.txt)."
    ),
    out: str = typer.Option(..., "--out", help="Output folder for the HF checkpoint."),
    iteration: int = typer.Option(None, "--iteration", help="Iteration to export (default: the latest)."),
    include_mtp: bool = typer.Option(False, "--include-mtp", help="Also export the MTP layers (model.layers.{L+k})."),
    max_shard_gb: float = typer.Option(2.0, "--max-shard-gb", help="Largest safetensors shard, in GiB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Convert a torch_dist checkpoint back to HF safetensors (sharded, with an index)."""
    from miles_core.checkpoint import torch_dist_to_hf

    with _bar("torch_dist -> hf", "tensors") as update:
        path = torch_dist_to_hf(
            ckpt, out, iteration=iteration, include_mtp=include_mtp, overwrite=overwrite,
            max_shard_bytes=int(max_shard_gb * 2**30), progress=update,
        )  # fmt: skip
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    convert = typer.Typer(
        help="Convert checkpoints: HF safetensors <-> torch_dist (Megatron-core).", no_args_is_help=True
    )
    convert.command("hf-to-torch-dist")(hf_to_torch_dist_command)
    convert.command("torch-dist-to-hf")(torch_dist_to_hf_command)
    app.add_typer(convert, name="convert")
