"""score_samples: user reward functions by dotted path; errors counted, never lost; strict mode."""

import json
import textwrap

import pytest

from miles_core.data import Prompt, rollouts_table, validate_rollouts
from miles_core.errors import MilesError
from miles_core.rewards import annotate_rows, load_reward_fn, resolve_reward, score_samples

USER_MODULE = '''
import math

CALLS = []

def length_reward(prompts, responses):
    CALLS.append(len(prompts))
    return [float(len(r)) for r in responses]

def fragile(prompts, responses):
    """Fails on any batch holding a response with 'boom'; returns NaN for 'nan'."""
    if any("boom" in r for r in responses):
        raise RuntimeError("cannot parse boom")
    return [math.nan if r == "nan" else 1.0 for r in responses]

def short(prompts, responses):
    return [1.0] * (len(responses) - 1) if len(responses) > 1 else ["one"]

not_callable = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i}", "test", answer=str(i), text=f"what is {i}?") for i in range(n)]


def test_user_reward_fn_by_dotted_path_is_called_once_per_batch(user_module):
    fn = load_reward_fn(f"{user_module}:length_reward")
    result = score_samples(_prompts(3), ["a", "bb", "ccc"], f"{user_module}:length_reward")
    assert result.rewards == [1.0, 2.0, 3.0] and result.n_errors == 0
    assert fn.__module__ == user_module
    assert __import__(user_module).CALLS == [3]
    assert load_reward_fn(f"{user_module}.length_reward") is fn  # dotted form works too


def test_raising_reward_fn_marks_only_the_failing_samples_and_counts_them(user_module):
    responses = ["fine", "boom here", "ok", "nan", "also boom"]
    result = score_samples(_prompts(5), responses, f"{user_module}:fragile")
    assert result.rewards == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert result.statuses == ["ok", "reward_error", "ok", "reward_error", "reward_error"]
    assert "RuntimeError: cannot parse boom" in result.errors[1]
    assert "not a finite number" in result.errors[3]
    assert result.counts() == {"samples": 5, "scored": 2, "errors": 3}


def test_strict_mode_raises_with_the_sample_and_count(user_module):
    with pytest.raises(MilesError, match=r"failed on 2 sample\(s\); first: sample 1 \(prompt p1\)"):
        score_samples(_prompts(3), ["x", "boom", "boom"], f"{user_module}:fragile", strict=True)


def test_wrong_batch_length_falls_back_per_sample_and_flags_bad_values(user_module):
    result = score_samples(_prompts(3), ["a", "b", "c"], f"{user_module}:short")
    assert result.rewards == [0.0, 0.0, 0.0]
    assert result.n_errors == 3 and all("not a finite number" in e for e in result.errors)


def test_missing_reference_answer_is_an_error_for_the_math_verifier():
    prompts = [Prompt("a", "s", answer="4", text="2+2"), Prompt("b", "s", answer=None, text="?")]
    result = score_samples(prompts, ["\\boxed{4}", "\\boxed{4}"], "math")
    assert result.rewards == [1.0, 0.0]
    assert result.errors[0] is None and "reference answer" in result.errors[1]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_module_xyz:fn", "cannot import"),
        ("json:no_such_fn", "no callable"),
        ("justaname", "package.module:function"),
    ],
)
def test_bad_reward_specs_are_user_errors(spec, match):
    with pytest.raises(MilesError, match=match):
        resolve_reward(spec)


def test_not_callable_attribute_is_rejected(user_module):
    with pytest.raises(MilesError, match="no callable"):
        load_reward_fn(f"{user_module}:not_callable")


def test_mismatched_lengths_are_rejected():
    with pytest.raises(MilesError, match="2 prompts but 1 responses"):
        score_samples(_prompts(2), ["x"])


def test_annotated_rollout_rows_keep_the_error_and_stay_valid(user_module):
    rows = [
        {
            "prompt_id": f"p{i}", "sample_index": 0, "iteration": 0, "prompt_tokens": [1, 2],
            "response_tokens": [3], "response": r, "rollout_logprobs": [-0.5], "reward": 0.0,
            "status": "completed", "weight_version": 0, "metadata": json.dumps({"source": "test"}),
        }
        for i, r in enumerate(["fine", "boom"])
    ]  # fmt: skip
    result = score_samples(_prompts(2), [r["response"] for r in rows], f"{user_module}:fragile")
    out = annotate_rows(rows, result)
    assert [r["reward"] for r in out] == [1.0, 0.0]
    assert out[0]["metadata"]["reward_status"] == "ok" and out[0]["metadata"]["source"] == "test"
    assert out[1]["metadata"]["reward_status"] == "reward_error"
    assert "boom" in out[1]["metadata"]["reward_error"]
    assert [r["status"] for r in out] == ["completed", "completed"]  # generation status untouched
    table = rollouts_table(out)
    validate_rollouts(table)
    assert json.loads(table.column("metadata")[1].as_py())["reward_status"] == "reward_error"
