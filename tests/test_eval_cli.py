"""`miles eval` end to end through the real CLI entry point: files, re-scoring, comparison, --model."""

import json

import pytest

from flows.cli import main
from miles_core.data import gym_prompts, rollout_part_url, write_rollouts


def _write_gym_rollouts(root: str, right_first: bool = True) -> str:
    """4 chain_sum eval prompts x 2 samples: one right, one wrong; stored rewards all 0."""
    rows = []
    for p in gym_prompts("chain_sum", size=4, seed=0, split="eval"):
        answers = [p.answer, str(int(p.answer) + 1)]
        for i, a in enumerate(answers if right_first else answers[::-1]):
            rows.append(
                {
                    "prompt_id": p.prompt_id, "sample_index": i, "iteration": 0, "prompt_tokens": [1],
                    "response_tokens": [2], "response": f"<answer>{a}</answer>", "rollout_logprobs": [-1.0],
                    "reward": float(a == p.answer), "status": "completed", "weight_version": 0,
                    "metadata": {"source": p.source},
                }
            )  # fmt: skip
    write_rollouts(rows, rollout_part_url(root, 0, 0))
    return root


def test_eval_rollouts_writes_results_and_summary(tmp_path, capsys):
    rollouts = _write_gym_rollouts(str(tmp_path / "rollouts"))
    out = str(tmp_path / "eval")
    assert main(["eval", "--rollouts", rollouts, "--k", "1,2", "--out", out]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["overall"]["pass@1"] == 0.5 and summary["overall"]["pass@2"] == 1.0
    assert summary["overall"]["maj@1"] == 1.0  # the first sample is the right one
    assert (tmp_path / "eval" / "results.parquet").exists()
    printed = capsys.readouterr().out
    assert "pass@2" in printed and "reasoning_gym:chain_sum" in printed


def test_eval_rescores_and_compares_on_memory_urls(capsys):
    rollouts = _write_gym_rollouts("memory://cli-eval/rollouts", right_first=False)
    assert main(["eval", "--rollouts", rollouts, "--k", "1", "--out", "memory://cli-eval/base"]) == 0
    source = "reasoning_gym:chain_sum?size=4&seed=0"
    args = ["eval", "--rollouts", rollouts, "--source", source, "--reward", "math", "--k", "1,2"]
    args += ["--out", "memory://cli-eval/new", "--compare-to", "memory://cli-eval/base"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "re-scored 8 samples: 0 reward error(s)" in printed and "shared prompts" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval"], "nothing to evaluate"),
        (["eval", "--rollouts", "/no/such/rollouts"], "do not exist"),
        (["eval", "--rollouts", "x", "--k", "1,a"], "--k must be"),
        (["eval", "--rollouts", "x", "--model", "y"], "not both"),
        (["eval", "--model", "/no/such/model", "--source", "reasoning_gym:chain_sum?size=2"], "not a folder"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_too_large_k_is_a_clear_error(tmp_path, capsys):
    rollouts = _write_gym_rollouts(str(tmp_path / "r"))
    assert main(["eval", "--rollouts", rollouts, "--k", "1,4"]) == 2
    assert "k=4 needs at least 4 samples per prompt" in capsys.readouterr().err


def test_eval_model_generates_with_the_engine_then_evaluates(tmp_path):
    from miles_core.demo.tokenizer import save_char_tokenizer
    from tests.tiny_models import qwen3_config, save_hf

    model_dir = str(tmp_path / "model")
    save_hf(qwen3_config(vocab_size=98), model_dir)
    save_char_tokenizer(model_dir)
    out = tmp_path / "eval"
    args = ["eval", "--model", model_dir, "--source", "reasoning_gym:chain_sum?size=3", "--k", "1,2"]
    args += ["--max-new-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 3 and summary["n_samples"] == 6 and summary["n_samples_per_prompt"] == 2
    assert list(summary["by_source"]) == ["reasoning_gym:chain_sum"]
    assert summary["reward_errors"] == 0
    assert (out / "rollouts" / "iter_0" / "part-0.parquet").exists()
    evals = {p.prompt_id for p in gym_prompts("chain_sum", size=3, seed=0, split="eval")}
    import pyarrow.parquet as pq

    assert set(pq.read_table(out / "results.parquet").column("prompt_id").to_pylist()) == evals
