"""reasoning-gym prompt sources: determinism, disjoint train/eval splits, spec parsing."""

import pytest

from miles_core.data import check_disjoint, gym_prompts, load_prompts, split_of
from miles_core.data.gym import _cached_dataset
from miles_core.errors import MilesError


@pytest.mark.parametrize("task", ["chain_sum", "gsm_symbolic"])
def test_same_seed_gives_identical_prompts(task):
    a = gym_prompts(task, size=50, seed=7)
    _cached_dataset.cache_clear()  # a fresh generator, not the cached one
    b = gym_prompts(task, size=50, seed=7)
    assert a == b
    assert [p.prompt_id for p in a] == [p.prompt_id for p in b]


def test_smaller_size_is_a_prefix_of_a_larger_one():
    # gsm_symbolic precomputes per-index templates for its size: item i must not depend on it.
    small = gym_prompts("gsm_symbolic", size=20, seed=4)
    _cached_dataset.cache_clear()
    large = gym_prompts("gsm_symbolic", size=300, seed=4)
    assert large[:20] == small


def test_different_seeds_give_different_prompts():
    a = gym_prompts("chain_sum", size=30, seed=1)
    b = gym_prompts("chain_sum", size=30, seed=2)
    assert [p.question() for p in a] != [p.question() for p in b]


@pytest.mark.parametrize("task", ["chain_sum", "basic_arithmetic", "gsm_symbolic"])
def test_train_and_eval_never_share_a_question_across_seeds(task):
    # Different seeds, the classic way to leak: item i of seed s is item i-1 of seed s+1.
    train = gym_prompts(task, size=300, seed=0, split="train", eval_fraction=0.3)
    evals = gym_prompts(task, size=100, seed=1, split="eval", eval_fraction=0.3)
    check_disjoint(train, evals)
    assert not {p.question() for p in train} & {p.question() for p in evals}
    assert all(split_of(p.question(), 0.3) == "train" for p in train)
    assert all(split_of(p.question(), 0.3) == "eval" for p in evals)


def test_check_disjoint_catches_overlap():
    a = gym_prompts("chain_sum", size=5, seed=0)
    with pytest.raises(MilesError, match="both sets"):
        check_disjoint(a, a[2:])


def test_questions_within_a_split_are_distinct_and_ids_stable():
    prompts = gym_prompts("chain_sum", size=200, seed=3, config={"min_digits": 1, "max_digits": 1})
    assert len({p.question() for p in prompts}) == 200
    assert len({p.prompt_id for p in prompts}) == 200
    assert all(p.prompt_id.startswith("chain_sum-") for p in prompts)


def test_prompt_carries_answer_system_prompt_and_scorer_metadata():
    p = gym_prompts("chain_sum", size=1, seed=0)[0]
    assert p.source == "reasoning_gym:chain_sum"
    assert p.messages[0]["role"] == "system" and "<answer>" in p.messages[0]["content"]
    assert p.messages[-1]["role"] == "user"
    assert p.answer is not None and int(p.answer) == int(p.answer)
    assert p.metadata["reasoning_gym"]["dataset"] == "chain_sum"
    bare = gym_prompts("chain_sum", size=1, seed=0, system_prompt=None)[0]
    assert len(bare.messages) == 1 and bare.prompt_id == p.prompt_id


def test_spec_query_string_sets_size_seed_split_and_task_config():
    prompts, report = load_prompts("reasoning_gym:chain_sum?size=12&seed=5&split=eval&min_terms=4&max_terms=4")
    assert len(prompts) == 12 and report.n_loaded == 12 and report.n_malformed == 0
    assert all(p.metadata["reasoning_gym"]["split"] == "eval" for p in prompts)
    assert all(p.metadata["reasoning_gym"]["entry_metadata"]["num_terms"] == 4 for p in prompts)
    same, _ = load_prompts("reasoning_gym:chain_sum?min_terms=4&max_terms=4", size=12, seed=5, split="eval")
    assert same == prompts


def test_too_small_question_space_is_a_clear_error():
    with pytest.raises(MilesError, match="distinct"):
        gym_prompts("chain_sum", size=500, seed=0, config={"min_terms": 2, "max_terms": 2,
                                                           "min_digits": 1, "max_digits": 1})  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("reasoning_gym:no_such_task?size=3", "cannot create"),
        ("reasoning_gym:chain_sum", "needs a size"),
        ("reasoning_gym:chain_sum?size=3&split=test", "split"),
        ("reasoning_gym:chain_sum?size=3&eval_fraction=1.5", "eval_fraction"),
    ],
)
def test_bad_gym_specs_raise_miles_error(spec, match):
    with pytest.raises(MilesError, match=match):
        load_prompts(spec)
