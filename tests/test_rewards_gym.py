"""reasoning-gym scorers as rewards, and their agreement with the math verifier."""

from decimal import Decimal

import pytest

from miles_core.data import gym_prompts, load_prompts
from miles_core.rewards import gym_answer, gym_reward, math_reward, score_samples

NUMERIC_TASKS = ["chain_sum", "basic_arithmetic", "gsm_symbolic", "products", "gcd", "lcm", "leg_counting"]


def _off_by_one_ulp(answer: str) -> str:
    """A near miss: the last written digit changed by one (integers and decimals alike)."""
    d = Decimal(answer)
    return str(d + Decimal(1).scaleb(d.as_tuple().exponent))


def _responses(answer: str) -> list[tuple[str, bool]]:
    """Responses in the forms both scorers read, with whether each is right."""
    return [
        (f"<think>working</think>\n<answer>{answer}</answer>", True),
        (f"so the result is \\boxed{{{answer}}}", True),
        (f"<answer>{_off_by_one_ulp(answer)}</answer>", False),
        (f"<answer>{int(Decimal(answer)) + 7}</answer>", False),
        ("I am not sure.", False),
    ]


@pytest.mark.parametrize("task", NUMERIC_TASKS)
def test_gym_scorer_and_math_verifier_agree_on_numeric_tasks(task):
    prompts = gym_prompts(task, size=15, seed=11, split="eval")
    compared = 0
    for prompt in prompts:
        for response, right in _responses(prompt.answer):
            gym_correct = gym_reward(prompt, response) >= 1.0
            math_correct = math_reward(response, prompt.answer) == 1.0
            assert gym_correct == math_correct == right, (task, prompt.answer, response)
            compared += 1
    assert compared == 75


def test_decimal_task_agrees_too():
    prompts, _ = load_prompts("reasoning_gym:decimal_chain_sum?size=15&seed=2")
    for prompt in prompts:
        for response, right in _responses(prompt.answer):
            assert (gym_reward(prompt, response) >= 1.0) == (math_reward(response, prompt.answer) == 1.0) == right


def test_gym_scorer_gives_its_own_partial_credit():
    prompt = gym_prompts("gsm_symbolic", size=1, seed=0)[0]
    wrong = f"<answer>{int(prompt.answer) + 1}</answer>"
    assert 0.0 < gym_reward(prompt, wrong) < 1.0  # gsm_symbolic gives 0.01 for a wrong number


def test_non_numeric_task_is_scored_by_its_own_scorer():
    prompt = gym_prompts("spell_backward", size=1, seed=0)[0]
    assert gym_reward(prompt, f"<answer>{prompt.answer}</answer>") == 1.0
    assert gym_reward(prompt, "<answer>zzzz</answer>") < 1.0


def test_gym_answer_reads_tags_then_boxes():
    assert gym_answer("<answer> 5 </answer>") == "5"
    assert gym_answer("\\boxed{6}") == "6"
    assert gym_answer("7") is None


def test_auto_reward_routes_each_prompt_to_its_scorer():
    gym = gym_prompts("gsm_symbolic", size=2, seed=0)
    responses = [f"<answer>{gym[0].answer}</answer>", f"<answer>{int(gym[1].answer) + 1}</answer>"]
    result = score_samples(gym, responses, "auto")
    assert result.rewards[0] == 1.0 and result.rewards[1] == pytest.approx(0.01)  # gym's scorer, not math
    assert result.n_errors == 0
