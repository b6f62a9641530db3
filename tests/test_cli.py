"""The `miles` command: every DESIGN.md command is there with --help; user mistakes are one line."""

import os
import subprocess
import sys

import pytest

from flows.cli import main

COMMANDS = ["convert", "quantize", "rollout", "train", "eval", "pipeline", "bench"]


def test_every_command_has_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name


@pytest.mark.parametrize(
    "argv,needle",
    [(["bench", "nope"], "unknown benchmark"), (["pipeline", "--config", "/no/such.yaml"], "does not exist")],
)
def test_user_mistakes_are_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.parametrize("preset,want", [(None, "120.0"), ("7", "7.0")])
def test_pipeline_gives_a_first_run_server_time_to_start_and_keeps_a_users_setting(preset, want):
    # The ephemeral server's first start migrates a new database, which once took past Prefect's 20 s default.
    # Prefect reads its settings when first imported, which `miles pipeline` does after its preamble: in a
    # fresh interpreter, as the command runs.
    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    env = {k: v for k, v in os.environ.items() if k != name} | ({name: preset} if preset else {})
    code = (
        "from flows.cli import main; assert main(['pipeline', '--config', '/no/such.yaml']) == 2; "
        "from prefect.settings import get_current_settings as s; "
        "print(float(s().server.ephemeral.startup_timeout_seconds))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == want
