"""The pipeline under real Prefect (a local server): retries, kills, caching, fsspec roots, artifacts.

One Prefect server serves the whole module (prefect_test_harness); subprocess runs of `miles pipeline`
talk to it through PREFECT_API_URL. The pipeline is tests/fixtures/tiny_pipeline.yaml (~10 s).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from miles_core.artifacts import Manifest
from miles_core.config import load_pipeline_config
from miles_core.data import read_rollouts

TINY = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_pipeline.yaml")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield PREFECT_API_URL.value()


def _config(root: str, *extra: str):
    return load_pipeline_config(TINY, [f"artifact_root={root}", *extra])


def _task_runs(flow_run_id) -> dict:
    """name -> task run of one flow run, read back from the Prefect API."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            return await client.read_task_runs(flow_run_filter=flt)

    return {tr.name: tr for tr in asyncio.run(fetch())}


def _run_inprocess(cfg):
    from flows.pipeline import rl_pipeline

    return rl_pipeline(cfg)


def _cli(root: str, api: str, env_extra: dict | None = None, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api, **(env_extra or {})}
    cmd = [sys.executable, "-m", "flows.cli", "pipeline", "--config", TINY, "--artifact-root", root, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _groups_exactly_once(cfg, root: str) -> None:
    """Every iteration's prompts appear with exactly n_samples samples, none missing, none extra."""
    from miles_core.stages import select_prompts

    table = read_rollouts(os.path.join(root, "runs", cfg.run_name, "rollouts"))
    seen = collections.Counter(
        zip(table.column("iteration").to_pylist(), table.column("prompt_id").to_pylist(), strict=False)
    )
    for i in range(1, cfg.iterations + 1):
        want = {p.prompt_id for p in select_prompts(cfg.data.model_dump(), i, cfg.seed)}
        got = {pid for (it, pid) in seen if it == i}
        assert got == want, f"iteration {i}: missing {want - got}, extra {got - want}"
    assert set(seen.values()) == {cfg.rollout.n_samples}
    idx = collections.Counter(
        zip(
            table.column("prompt_id").to_pylist(),
            table.column("iteration").to_pylist(),
            table.column("sample_index").to_pylist(),
            strict=False,
        )
    )
    assert max(idx.values()) == 1, "a (prompt, iteration, sample_index) appears twice"


def _checkpoints_valid(cfg, root: str) -> None:
    from miles_core.checkpoint import load_torch_dist
    from miles_core.model import load_model

    run = os.path.join(root, "runs", cfg.run_name)
    load_torch_dist(os.path.join(run, "checkpoints", f"iter_{cfg.iterations}"))
    load_model(os.path.join(run, "export"))


def test_transient_rollout_failure_is_retried_and_run_completes(prefect_api, tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_INJECT_FAULT", "rollout:1")
    monkeypatch.setenv("MILES_FAULT_STATE", str(tmp_path / "fault-state"))
    cfg = _config(str(tmp_path / "art"))
    from flows.pipeline import rl_pipeline

    state = rl_pipeline(cfg, return_state=True)
    summary = state.result()
    assert (tmp_path / "fault-state").read_text() == "1"  # the injected failure did happen
    rollout = _task_runs(state.state_details.flow_run_id)["rollout/iter_1"]
    assert rollout.state.is_completed() and rollout.run_count == 2  # failed once, retried once
    assert len(summary["iterations"]) == cfg.iterations
    _groups_exactly_once(cfg, str(tmp_path / "art"))


def test_bad_input_is_not_retried(prefect_api, tmp_path):
    from flows.pipeline import rl_pipeline

    cfg = _config(str(tmp_path / "art"), "data.train_source=/nonexistent/prompts.jsonl")
    state = rl_pipeline(cfg, return_state=True)
    assert state.is_failed() and "does not exist" in state.message
    rollout = _task_runs(state.state_details.flow_run_id)["rollout/iter_1"]
    assert rollout.state.is_failed() and rollout.run_count == 1  # a MilesError fails at once: no retry


@pytest.mark.parametrize("stage", ["rollout/iter_1", "train/iter_2"])
def test_sigkill_mid_stage_then_rerun_loses_and_duplicates_nothing(prefect_api, tmp_path, stage):
    root = str(tmp_path / "art")
    proc = _cli(root, prefect_api, {"MILES_TEST_PAUSE": f"{stage}:30"})
    run = os.path.join(root, "runs", "tiny")
    kind, it = stage.split("/")
    folder = os.path.join(run, "rollouts" if kind == "rollout" else "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the stage's work sits in scratch, unpublished
        if os.path.isdir(folder) and any(
            n.startswith(f".{it}.tmp-") and os.listdir(os.path.join(folder, n)) for n in os.listdir(folder)
        ):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the stage never started")
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stage not in Manifest(run).stages
    assert not os.path.exists(os.path.join(folder, it))  # nothing that looks finished
    done_before = set(Manifest(run).stages)
    rerun = _cli(root, prefect_api)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    cfg = _config(root)
    _groups_exactly_once(cfg, root)
    _checkpoints_valid(cfg, root)
    m = Manifest(run).stages
    for name in done_before:  # resumed: finished stages were not redone
        assert m[name]["finished_at"] < os.path.getmtime(os.path.join(run, "manifest.json"))


def test_invalid_config_fails_before_any_stage_with_one_line(tmp_path):
    root = str(tmp_path / "art")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "pipeline",
            "--config",
            TINY,
            "--artifact-root",
            root,
            "--set",
            "rollout.temperature=-1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "rollout.temperature" in err[0], res.stderr
    assert not os.path.exists(os.path.join(root, "runs"))


def test_rerun_of_finished_run_does_no_work_and_artifacts_show_metrics(prefect_api, tmp_path):
    from prefect.client.orchestration import get_client

    cfg = _config(str(tmp_path / "art"), "run_name=cached")
    first = _run_inprocess(cfg)
    manifest = Manifest(first["run_root"]).stages
    stamps = {k: v["finished_at"] for k, v in manifest.items()}
    start = time.time()
    second = _run_inprocess(cfg)
    assert {k: v["finished_at"] for k, v in Manifest(second["run_root"]).stages.items()} == stamps
    assert second["after"] == first["after"]
    assert time.time() - start < 30

    import asyncio

    async def fetch():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cached-iterations"]))
            )

    arts = asyncio.run(fetch())
    assert arts, "no per-iteration metrics artifact"
    latest = max(arts, key=lambda a: a.created)  # the table is re-published each iteration
    rows = latest.data if isinstance(latest.data, list) else json.loads(latest.data)
    assert [r["iteration"] for r in rows] == list(range(1, cfg.iterations + 1))
    assert {"reward_mean", "mismatch_kl", "train_s"} <= set(rows[0])


def test_memory_artifact_root(prefect_api):
    import fsspec

    root = f"memory://miles-test-{os.getpid()}"
    cfg = _config(root, "iterations=1", "run_name=mem")
    summary = _run_inprocess(cfg)
    fs = fsspec.filesystem("memory")
    run = root.removeprefix("memory://") + "/runs/mem"
    assert fs.exists(run + "/manifest.json")
    assert fs.glob(run + "/rollouts/iter_1/part-*.parquet")
    assert summary["iterations"][0]["iteration"] == 1


def test_retrain_continues_newest_checkpoint_on_fresh_prompts(prefect_api, tmp_path):
    from flows.pipeline import retrain
    from miles_core.stages import select_prompts

    cfg = _config(str(tmp_path / "art"), "iterations=1", "run_name=nightly")
    first = _run_inprocess(cfg)
    stamps = {k: v["finished_at"] for k, v in Manifest(first["run_root"]).stages.items()}
    summary = retrain(cfg, more_iterations=1)
    stages = Manifest(summary["run_root"]).stages
    assert "train/iter_2" in stages and "rollout/iter_2" in stages
    for name in ("convert", "rollout/iter_1", "train/iter_1"):  # not redone
        assert stages[name]["finished_at"] == stamps[name]
    assert stages["train/iter_2"]["inputs"][0] == stages["train/iter_1"]["content_hash"]  # from the newest
    old = {p.prompt_id for p in select_prompts(cfg.data.model_dump(), 1, cfg.seed)}
    new = {p.prompt_id for p in select_prompts(cfg.data.model_dump(), 2, cfg.seed)}
    assert not old & new


def test_partial_rollout_carries_unfinished_groups_across_iterations(prefect_api, tmp_path):
    """With a token budget per round, unfinished groups are pickled with the rollout and resumed first
    by the next iteration under the new weights: no group is lost or written twice, and resumed
    samples carry tokens of two weight versions."""
    import pickle

    from miles_core.stages import CARRY_FILE, select_prompts

    cfg = _config(str(tmp_path / "art"), "iterations=3", "run_name=partial", "rollout.partial_budget_tokens=300")
    summary = _run_inprocess(cfg)
    run = summary["run_root"]
    table = read_rollouts(os.path.join(run, "rollouts"))
    rows = table.to_pylist()
    keys = collections.Counter((r["prompt_id"], r["sample_index"]) for r in rows)
    assert keys and max(keys.values()) == 1, "a sample was written twice"
    groups = collections.Counter(r["prompt_id"] for r in rows)
    assert set(groups.values()) == {cfg.rollout.n_samples}, "a group was written incomplete"
    with open(os.path.join(run, "rollouts", f"iter_{cfg.iterations}", CARRY_FILE), "rb") as f:
        carried = {s.request.prompt_id for s in pickle.load(f)}
    selected = set()
    for i in range(1, cfg.iterations + 1):
        selected |= {p.prompt_id for p in select_prompts(cfg.data.model_dump(), i, cfg.seed)}
    assert set(groups) | carried == selected and not set(groups) & carried
    resumed = [r for r in rows if len(set(r["logprob_versions"])) > 1]
    assert resumed, "no sample spanned two rounds"
    assert all(r["weight_version"] == min(r["logprob_versions"]) < r["iteration"] - 1 for r in resumed)


def test_evaluate_flow_on_torch_dist_and_hf_checkpoints(prefect_api, tmp_path):
    from flows.pipeline import evaluate

    cfg = _config(str(tmp_path / "art"), "iterations=1", "run_name=evalme")
    run = _run_inprocess(cfg)["run_root"]
    for name, path in [("ckpt", f"{run}/checkpoints/iter_1"), ("hf", f"{run}/export")]:
        metrics = evaluate(path, cfg.eval, artifact_root=str(tmp_path / "art"), name=name)
        assert 0.0 <= metrics["pass@1"] <= 1.0 and metrics["n_prompts"] == 16
    # the trained torch_dist checkpoint and its HF export are the same model: same samples, same score
    a = json.loads((tmp_path / "art" / "evals" / "ckpt" / "result" / "summary.json").read_text())
    b = json.loads((tmp_path / "art" / "evals" / "hf" / "result" / "summary.json").read_text())
    assert a["overall"] == b["overall"]
