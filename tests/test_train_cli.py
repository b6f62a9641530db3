"""`miles train` end to end: HF checkpoint + rollout Parquet -> torch_dist checkpoint, then resume from it."""

import json
import os

import torch

from flows.cli import main
from miles_core.data.rollouts import rollout_part_url, write_rollouts
from miles_core.train import load_policy
from tests.test_train_support import random_prompts, rows_from, sample
from tests.tiny_models import qwen3_moe_config, save_hf


def _rollouts(model, root, iterations):
    for it in iterations:
        ids, lp, experts = sample(model, random_prompts(4, 4, seed=it), 4, 5, seed=it)
        rewards = torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(it))
        write_rollouts(rows_from(ids, lp, experts, 4, rewards, 4, iteration=it), rollout_part_url(root, it, 0))


def test_miles_train_from_hf_then_resume_from_its_torch_dist_checkpoint(tmp_path, capsys):
    hf, _ = save_hf(qwen3_moe_config(), str(tmp_path / "hf"))
    model = load_policy(hf)
    _rollouts(model, str(tmp_path / "rollouts"), [0, 1])
    out = str(tmp_path / "ckpt")
    args = ["train", "--ckpt", hf, "--rollouts", str(tmp_path / "rollouts"), "--out", out, "--lr", "1e-3",
            "--micro-batch-tokens", "64", "--set", "eps_clip_high=0.3", "--tis"]  # fmt: skip
    assert main(args) == 0
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "2"  # one optimizer step per rollout iteration
    with open(os.path.join(out, "train_metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert [m["rollout_iteration"] for m in lines] == [0.0, 1.0] and "off_policy/tis_weight_mean" in lines[0]
    assert "train steps" in capsys.readouterr().out

    _rollouts(model, str(tmp_path / "more"), [2])
    args = ["train", "--ckpt", out, "--rollouts", str(tmp_path / "more"), "--out", out, "--lr", "1e-3", "--tis"]
    assert main(args) == 0
    with open(os.path.join(out, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "3"  # resumed at step 2
    assert sorted(d for d in os.listdir(out) if d.startswith("iter_")) == ["iter_0000002", "iter_0000003"]
    assert load_policy(out) is not None


def test_miles_train_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--ckpt", str(tmp_path / "nope"), "--rollouts", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["train", "--ckpt", "x", "--rollouts", "y", "--out", "z", "--set", "lr=-1"]) == 2
    assert "lr" in capsys.readouterr().err


def test_resumed_run_keeps_the_starting_policy_as_kl_reference(tmp_path):
    hf, _ = save_hf(qwen3_moe_config(), str(tmp_path / "hf"))
    model = load_policy(hf)
    _rollouts(model, str(tmp_path / "r0"), [0])
    _rollouts(model, str(tmp_path / "r1"), [1])
    out = str(tmp_path / "ckpt")
    common = ["--out", out, "--lr", "5e-2", "--kl-coef", "0.1", "--micro-batch-tokens", "256"]
    assert main(["train", "--ckpt", hf, "--rollouts", str(tmp_path / "r0"), *common]) == 0
    assert main(["train", "--ckpt", out, "--rollouts", str(tmp_path / "r1"), *common]) == 0
    with open(os.path.join(out, "train_metrics.jsonl")) as f:
        first, resumed = [json.loads(x) for x in f]
    assert first["kl"] == 0.0  # step 0: the policy is its reference
    assert resumed["kl"] > 1e-4  # after resuming, KL is still measured against the base model
