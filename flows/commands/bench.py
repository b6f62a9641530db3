"""`miles bench NAME [ARGS...]`: run one of the benchmark scripts in bench/ (they print a table).

    miles bench forward --layers 8 --batch 64 --seq 512 --compile
    miles bench rollout --batch 64 256
    miles bench train
    miles bench quant
    miles bench convert

The scripts live in the repository (not in the installed package), so run this from its root.
"""

from __future__ import annotations

import os
import runpy
import sys

import typer

from miles_core.errors import MilesError

NAMES = ("forward", "rollout", "train", "quant", "convert", "decode_kernels")


def register(app: typer.Typer) -> None:
    app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        help=f"Run a benchmark script from bench/ ({', '.join(NAMES)}); extra arguments go to the script.",
    )(bench)


def bench(ctx: typer.Context, name: str = typer.Argument(..., help=f"one of: {', '.join(NAMES)}")) -> None:
    if name not in NAMES:
        raise MilesError(f"unknown benchmark {name!r}; choose one of {', '.join(NAMES)}")
    script = os.path.join("bench", f"{name}.py")
    if not os.path.exists(script):
        raise MilesError(f"{script} not found: run `miles bench` from the miles repository root")
    sys.path.insert(0, os.getcwd())
    sys.argv = [script, *ctx.args]
    runpy.run_path(script, run_name="__main__")
