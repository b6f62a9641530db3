"""The pipeline's Prefect tasks, one per stage, each a thin wrapper over one miles_core function.

Every task: retries with backoff on transient errors only, a cache key from its inputs' content
hashes + parameters + the stage function's source, a small `ArtifactRef` as return value (paths and
hashes, never tensors), a table artifact with the stage's metrics and a progress artifact while
it runs. The work itself is `tasks.common.run_stage` around a function of `miles_core.stages`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from miles_core import stages
from miles_core.artifacts import ArtifactRef, Manifest, stage_key
from tasks.common import RETRIES, RETRY_DELAYS, prefect_cache_key, retry_transient, run_stage, source_hash


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class _Progress:
    """A Prefect progress artifact updated at most every half second."""

    def __init__(self, key: str, description: str):
        self.id = create_progress_artifact(progress=0.0, key=key, description=description)
        self.last = 0.0

    def __call__(self, fraction: float) -> None:
        now = time.time()
        if now - self.last >= 0.5 or fraction >= 1.0:
            self.last = now
            update_progress_artifact(self.id, progress=round(100 * min(max(fraction, 0.0), 1.0), 1))


def _body(fn: Callable, name: str, key: str, out_url: str, run_root: str, inputs: dict, params: dict, run: str):
    progress = _Progress(artifact_key(run, name, "progress"), f"{name}: progress")
    ref = run_stage(name, fn, out_url, run_root, inputs, params, key=key, on_progress=progress)
    progress(1.0)
    row = {"stage": name, "seconds": round(ref.seconds, 2), **_flat(ref.metrics)}
    create_table_artifact([row], key=artifact_key(run, name.split("/")[0]), description=f"{name} metrics")
    return ref


def _flat(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, float):
            out[k] = round(v, 5)
        elif isinstance(v, (int, str, bool)) or v is None:
            out[k] = v
    return out


def _make(stage: str, fn: Callable):
    @task(
        name=stage,
        task_run_name="{name}",
        retries=RETRIES,
        retry_delay_seconds=RETRY_DELAYS,
        retry_condition_fn=retry_transient,
        cache_key_fn=prefect_cache_key,
        persist_result=True,
    )
    def stage_task(name: str, key: str, out_url: str, run_root: str, inputs: dict, params: dict, run: str):
        return _body(fn, name, key, out_url, run_root, inputs, params, run)

    stage_task.stage_fn = fn
    return stage_task


build_base = _make("build-base", stages.build_base)
convert = _make("convert", stages.convert)
quantize = _make("quantize", stages.rollout_weights)
rollout = _make("rollout", stages.rollout)
train = _make("train", stages.train)
sync = _make("sync", stages.rollout_weights)
evaluate = _make("evaluate", stages.evaluate)
export = _make("export", stages.export)


def call(
    stage_task, name: str, out_url: str, run_root: str, inputs: dict[str, ArtifactRef], params: dict, run: str
) -> ArtifactRef:
    """Run a stage task. Prefect's cache is bypassed when the manifest does not hold this stage with
    this key, so a stale Prefect cache entry can never return an artifact that is gone."""
    key = stage_key(name, params, [r.content_hash for r in inputs.values()], source_hash(stage_task.stage_fn))
    fresh = Manifest(run_root).finished(name, key) is None
    runner = stage_task.with_options(refresh_cache=True) if fresh else stage_task
    return runner(name=name, key=key, out_url=out_url, run_root=run_root, inputs=inputs, params=params, run=run)
