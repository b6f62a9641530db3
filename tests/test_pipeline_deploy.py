"""Deployments for real: a `prefect server`, prefect.yaml deployed to a process pool, a worker, and a
`miles-rl` run triggered with parameters through the API. Slow (a server, a worker, a flow run)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "fixtures", "tiny_pipeline.yaml")
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout: float = 90) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("prefect server did not start")


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    proc = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_healthy(url)
        yield url, env
    finally:
        os.killpg(proc.pid, 9)


def test_deploy_trigger_miles_rl_and_retrain_schedule(server, tmp_path):
    url, env = server
    run = lambda *a: subprocess.run([PREFECT, *a], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("work-pool", "create", "miles-process", "--type", "process")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("--no-prompt", "deploy", "--all")
    assert r.returncode == 0, r.stdout + r.stderr
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "miles-process"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        import asyncio

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with open(TINY) as f:
            params = yaml.safe_load(f)
        params["artifact_root"] = str(tmp_path / "art")
        params["iterations"] = 1

        async def go():
            async with get_client() as client:
                dep = await client.read_deployment_by_name("miles-rl/miles-rl")
                fr = await client.create_flow_run_from_deployment(dep.id, parameters={"config": params})
                deadline = time.time() + 600
                while time.time() < deadline:
                    fr = await client.read_flow_run(fr.id)
                    if fr.state and fr.state.is_final():
                        break
                    await asyncio.sleep(2)
                retrain = await client.read_deployment_by_name("miles-retrain/miles-retrain")
                return fr, retrain

        with temporary_settings({PREFECT_API_URL: url}):
            fr, retrain = asyncio.run(go())
        assert fr.state.is_completed(), fr.state
        assert os.path.exists(tmp_path / "art" / "runs" / "tiny" / "export" / "config.json")
        crons = [getattr(s.schedule, "cron", None) for s in retrain.schedules]
        assert "0 3 * * *" in crons
    finally:
        os.killpg(worker.pid, 9)
