"""Evaluation of samples: metrics, per-source breakdown, results on disk, paired comparison."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest

from miles_core.data import rollout_part_url, rollouts_table, write_rollouts
from miles_core.errors import MilesError
from miles_core.eval import (
    compare_evaluations,
    evaluate_rollouts,
    evaluate_samples,
    paired_bootstrap,
    pass_at_k,
    read_evaluation,
    write_evaluation,
)
from miles_core.io import filesystem


def sample_rows(spec: dict[str, tuple[str, list[tuple[str, float]]]]) -> list[dict]:
    """Rollout rows from {prompt_id: (source, [(response, reward), ...])}."""
    rows = []
    for pid, (source, samples) in spec.items():
        for i, (response, reward) in enumerate(samples):
            rows.append(
                {
                    "prompt_id": pid, "sample_index": i, "iteration": 0, "prompt_tokens": [1, 2],
                    "response_tokens": [3], "response": response, "rollout_logprobs": [-1.0],
                    "reward": reward, "status": "completed", "weight_version": 0,
                    "metadata": {"source": source},
                }
            )  # fmt: skip
    return rows


SPEC = {
    # right answer 4; 2 of 4 correct; majority of first 3 is "5" (wrong), of 4 tied 2-2 -> "5" first
    "a": ("gsm", [("\\boxed{5}", 0.0), ("\\boxed{4}", 1.0), ("\\boxed{5}", 0.0), ("#### 4", 1.0)]),
    # all correct
    "b": ("gsm", [("\\boxed{7}", 1.0)] * 4),
    # none correct, partial credit only
    "c": ("chain", [("<answer>1</answer>", 0.25), ("no idea", 0.0), ("<answer>2</answer>", 0.25), ("x", 0.0)]),
}


def test_metrics_per_prompt_and_overall():
    result = evaluate_samples(rollouts_table(sample_rows(SPEC)), ks=[4, 1, 3])
    rows = {r["prompt_id"]: r for r in result.per_prompt.to_pylist()}
    assert rows["a"]["n"] == 4 and rows["a"]["n_correct"] == 2
    assert rows["a"]["pass@1"] == pytest.approx(0.5)
    assert rows["a"]["pass@3"] == pytest.approx(pass_at_k(4, 2, 3)) == pytest.approx(1.0)
    assert (rows["a"]["maj@1"], rows["a"]["maj@3"], rows["a"]["maj@4"]) == (0.0, 0.0, 0.0)
    assert rows["b"]["maj@4"] == 1.0 and rows["b"]["pass@4"] == 1.0
    assert rows["c"]["mean_reward"] == pytest.approx(0.125) and rows["c"]["pass@4"] == 0.0  # partial != solved
    s = result.summary
    assert s["ks"] == [1, 3, 4] and s["n_prompts"] == 3 and s["n_samples"] == 12
    assert s["overall"]["pass@1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert s["overall"]["mean_reward"] == pytest.approx((0.5 + 1.0 + 0.125) / 3)
    assert s["by_source"]["gsm"]["n_prompts"] == 2 and s["by_source"]["gsm"]["pass@1"] == pytest.approx(0.75)
    assert s["by_source"]["chain"]["pass@4"] == 0.0
    assert s["status_counts"] == {"completed": 12}


def test_lower_threshold_counts_partial_credit():
    result = evaluate_samples(rollouts_table(sample_rows(SPEC)), ks=[1], correct_threshold=0.2)
    assert result.summary["by_source"]["chain"]["pass@1"] == pytest.approx(0.5)


def test_reward_errors_are_counted_in_the_summary():
    rows = sample_rows({"a": ("s", [("1", 0.0), ("2", 1.0)])})
    rows[0]["metadata"] = {"source": "s", "reward_status": "reward_error", "reward_error": "boom"}
    assert evaluate_samples(rollouts_table(rows), ks=[1]).summary["reward_errors"] == 1


@pytest.mark.parametrize(
    ("ks", "rows_fn", "match"),
    [
        ([5], lambda: sample_rows(SPEC), "k=5 needs at least 5 samples"),
        ([0], lambda: sample_rows(SPEC), ">= 1"),
        ([1], lambda: sample_rows(SPEC) + sample_rows({"a": ("gsm", [("x", 0.0)])}), "repeated sample_index"),
        ([1], lambda: [], "no samples"),
    ],
)
def test_bad_evaluations_are_user_errors(ks, rows_fn, match):
    with pytest.raises(MilesError, match=match):
        evaluate_samples(rollouts_table(rows_fn()), ks=ks)


def test_missing_columns_are_named():
    with pytest.raises(MilesError, match="response"):
        evaluate_samples(pa.table({"prompt_id": ["a"], "sample_index": [0], "reward": [1.0]}))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_results_and_summary_round_trip(tmp_path, where):
    out = str(tmp_path / "eval") if where == "local" else f"memory://eval-{uuid.uuid4().hex[:8]}/iter_0"
    result = evaluate_samples(rollouts_table(sample_rows(SPEC)), ks=[1, 4])
    write_evaluation(result, out)
    back = read_evaluation(out)
    assert back.summary == json.loads(json.dumps(result.summary))
    assert back.per_prompt.equals(result.per_prompt)
    fs, path = filesystem(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find(path)) == ["results.parquet", "summary.json"]
    with pytest.raises(MilesError, match="not an evaluation folder"):
        read_evaluation(out + "-missing")


def test_paired_bootstrap_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    new = base + 0.1 + rng.normal(0, 0.05, 200)
    first = paired_bootstrap(base, new, n_boot=1000, seed=3)
    assert first == paired_bootstrap(base, new, n_boot=1000, seed=3)
    delta, low, high = first
    assert low < delta < high and low > 0.05 and high < 0.15


def _eval_of(correct: dict[str, list[float]]):
    return evaluate_samples(
        rollouts_table(sample_rows({p: ("s", [("x", r) for r in rs]) for p, rs in correct.items()}))
    )


def test_compare_finds_a_real_improvement_and_not_a_null_one():
    rng = np.random.default_rng(1)
    pids = [f"p{i}" for i in range(120)]
    base = _eval_of({p: [float(rng.random() < 0.3)] for p in pids})
    better = _eval_of({p: [float(rng.random() < 0.8)] for p in pids})
    same = _eval_of({p: [float(rng.random() < 0.3)] for p in pids})
    up = compare_evaluations(base, better, seed=0)["metrics"]["pass@1"]
    assert up["significant"] and up["ci_low"] > 0.2 and up["delta"] == pytest.approx(up["new"] - up["base"])
    null = compare_evaluations(base, same, seed=0)["metrics"]["pass@1"]
    assert null["ci_low"] < 0 < null["ci_high"] and not null["significant"]


def test_compare_pairs_by_prompt_and_reports_unmatched():
    a = _eval_of({"p1": [1.0], "p2": [0.0], "p3": [1.0]})
    b = _eval_of({"p2": [1.0], "p3": [1.0], "p4": [0.0]})
    out = compare_evaluations(a, b)
    assert (out["n_paired"], out["only_in_base"], out["only_in_new"]) == (2, 1, 1)
    assert out["metrics"]["pass@1"]["delta"] == pytest.approx(0.5)
    with pytest.raises(MilesError, match="share no prompt_id"):
        compare_evaluations(a, _eval_of({"zz": [1.0]}))


def test_evaluate_rollouts_rescores_against_sources_and_compares(tmp_path):
    from miles_core.data import gym_prompts

    prompts = gym_prompts("chain_sum", size=6, seed=0, split="eval")
    rollouts = str(tmp_path / "rollouts")
    rows = []
    for p in prompts:
        for i, answer in enumerate([p.answer, str(int(p.answer) + 1)]):
            rows.append(
                {**sample_rows({p.prompt_id: ("?", [(f"<answer>{answer}</answer>", 0.0)])})[0], "sample_index": i}
            )
    write_rollouts(rows, rollout_part_url(rollouts, 0, 0))
    first = evaluate_rollouts(rollouts, str(tmp_path / "eval0"), ks=[1, 2])  # stored rewards: all 0
    assert first.result.summary["overall"]["pass@2"] == 0.0
    spec = "reasoning_gym:chain_sum?size=6&seed=0&split=eval"
    run = evaluate_rollouts(
        rollouts, str(tmp_path / "eval1"), ks=[1, 2], sources=[spec], compare_to=str(tmp_path / "eval0")
    )
    s = run.result.summary
    assert s["overall"]["pass@1"] == pytest.approx(0.5) and s["overall"]["pass@2"] == 1.0
    assert s["score_counts"] == {"samples": 12, "scored": 12, "errors": 0}
    assert list(s["by_source"]) == ["reasoning_gym:chain_sum"]
    assert run.comparison["metrics"]["pass@2"]["delta"] == 1.0
    assert json.loads((tmp_path / "eval1" / "comparison.json").read_text())["n_paired"] == 6
    with pytest.raises(MilesError, match="not in"):
        evaluate_rollouts(rollouts, sources=["reasoning_gym:chain_sum?size=6&seed=0&split=train"])
    with pytest.raises(MilesError, match="needs the prompts"):
        evaluate_rollouts(rollouts, reward="math")
