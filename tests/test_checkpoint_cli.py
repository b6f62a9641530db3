"""`miles convert ...`: both directions through the CLI's own entry point; bad input -> one line, exit 2."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from flows import cli
from tests.tiny_models import CONFIGS, save_hf


@pytest.fixture
def main(monkeypatch):
    # only this module's commands: the test does not depend on other stages' modules importing
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["flows.commands.convert"])
    monkeypatch.setattr(cli, "app", cli.typer.Typer(name="miles", no_args_is_help=True, add_completion=False))
    return cli.main


def test_cli_converts_both_ways_with_mtp(main, tmp_path):
    hf, _ = save_hf(CONFIGS["qwen3_moe"](), str(tmp_path / "hf"))
    td, back = str(tmp_path / "td"), str(tmp_path / "back")
    assert main(["convert", "hf-to-torch-dist", "--hf", hf, "--out", td, "--mtp-num-layers", "1"]) == 0
    assert os.path.exists(os.path.join(td, "iter_0000000", ".metadata"))
    assert main(["convert", "torch-dist-to-hf", "--ckpt", td, "--out", back, "--include-mtp"]) == 0
    a = load_file(os.path.join(hf, "model.safetensors"))
    b = {}
    for f in glob.glob(os.path.join(back, "*.safetensors")):
        b.update(load_file(f))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.3.eh_proj.weight" in b


def test_cli_bad_input_is_one_line_and_exit_2(main, tmp_path, capsys):
    assert main(["convert", "hf-to-torch-dist", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not exist" in err and len(err.splitlines()) == 1
    assert main(["convert", "torch-dist-to-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a torch_dist checkpoint" in capsys.readouterr().err


def test_cli_help_lists_both_commands(main, capsys):
    assert main(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "hf-to-torch-dist" in out and "torch-dist-to-hf" in out
