"""`miles pipeline`: run the whole RL DAG through Prefect (a local ephemeral server unless
PREFECT_API_URL points at one). With no arguments it runs configs/demo.yaml, the embedded demo."""

from __future__ import annotations

import os
import time

import typer

DEFAULT_CONFIG = os.path.join("configs", "demo.yaml")


def register(app: typer.Typer) -> None:
    app.command("pipeline")(pipeline)


def pipeline(
    config: str = typer.Option(None, "--config", "-c", help="pipeline YAML (fsspec URL); default configs/demo.yaml"),
    overrides: list[str] = typer.Option(
        None, "--set", "-s", help="override a field, e.g. --set iterations=2 --set train.lr=5e-5 (repeatable)"
    ),
    run_name: str = typer.Option(None, "--run-name", help="runs with the same name resume each other"),
    artifact_root: str = typer.Option(None, "--artifact-root", help="fsspec URL for artifacts (default ./artifacts)"),
) -> None:
    """Run convert -> quantize -> N x (rollout -> train -> sync) (+ eval) -> export as a Prefect flow.

    A killed run resumes after its last finished stage when rerun with the same run name; a finished
    run reruns with no work. Stage outputs and the run's manifest.json live under
    {artifact_root}/runs/{run_name}/.
    """
    from miles_core.config import load_pipeline_config

    # The ephemeral server's telemetry write can race the first flow run on its SQLite file
    # ("database is locked", harmless but alarming); users can still turn it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first run creates and migrates the server's database: 13 s on an idle 2-core machine, and once past
    # Prefect's 20 s default (the run then dies before its first stage) with the cores busy.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if config is None and os.path.exists(DEFAULT_CONFIG):
        config = DEFAULT_CONFIG
    extra = list(overrides or [])
    if run_name:
        extra.append(f"run_name={run_name}")
    if artifact_root:
        extra.append(f"artifact_root={artifact_root}")
    cfg = load_pipeline_config(config, extra)  # validated before any stage runs: MilesError -> one line

    from flows.pipeline import rl_pipeline

    start = time.time()
    typer.echo(f"miles pipeline: run '{cfg.run_name}' under {cfg.artifact_root} ({cfg.iterations} iterations)")
    summary = rl_pipeline(cfg)
    _print_summary(summary, time.time() - start)


def _print_summary(summary: dict, seconds: float) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    console.print(Markdown(summary["markdown"]))
    console.print(f"total wall time: {seconds:.1f} s; artifacts: {summary['run_root']}")
