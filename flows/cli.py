"""The `miles` command line.

`miles pipeline` runs the whole DAG through Prefect; the stage commands (`convert`, `quantize`,
`rollout`, `train`, `eval`, `bench`) call miles_core directly, with no server to start. Each stage
registers its commands from its own module in flows/commands/, listed in COMMAND_MODULES.
A `MilesError` (a user mistake) is printed as one line with a non-zero exit.
"""

from __future__ import annotations

import importlib
import sys

import typer

from miles_core.errors import MilesError

app = typer.Typer(
    name="miles",
    help="RL post-training for MoE language models: convert, quantize, rollout, train, eval, pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines `register(app: typer.Typer) -> None`.
COMMAND_MODULES = [
    "flows.commands.pipeline",
    "flows.commands.bench",
    "flows.commands.eval",
    "flows.commands.quantize",
    "flows.commands.convert",
    "flows.commands.rollout",
    "flows.commands.train",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


def main(argv: list[str] | None = None) -> int:
    _register_all()
    try:
        app(args=argv, standalone_mode=False)
    except MilesError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.secho("aborted", err=True)
        return 130
    except Exception as e:  # click usage errors arrive as ClickException
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
