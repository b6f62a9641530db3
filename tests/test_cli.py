"""The `miles` command: every DESIGN.md command is there with --help; user mistakes are one line."""

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
