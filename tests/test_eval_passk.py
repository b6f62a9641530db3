"""pass@k against brute-force enumeration; maj@k voting rules."""

import itertools
import math
import random

import pytest

from miles_core.errors import MilesError
from miles_core.eval import maj_at_k, majority_vote, pass_at_k


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_over_all_k_subsets_on_random_cases():
    rng = random.Random(0)
    checked = 0
    for _ in range(200):
        n = rng.randint(1, 12)
        outcomes = [rng.random() < rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)
            checked += 1
    assert checked > 1000


def test_pass_at_k_equals_binomial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 4), (20, 20, 4), (7, 6, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 overflows a float; the product form stays finite and monotone in k.
    values = [pass_at_k(2000, 5, k) for k in (1, 10, 100, 1000)]
    assert all(0.0 < v <= 1.0 for v in values)
    assert values == sorted(values)
    assert values[0] == pytest.approx(5 / 2000)
    assert pass_at_k(2000, 0, 1000) == 0.0
    assert pass_at_k(2000, 1001, 1000) == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4, 2.0, 1)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(MilesError):
        pass_at_k(n, c, k)


def test_majority_vote_ignores_missing_answers_and_breaks_ties_by_first_seen():
    assert majority_vote([None, "3", "4", "4", None]) == "4"
    assert majority_vote(["5", "4", "4", "5"]) == "5"
    assert majority_vote([None, None]) is None


def test_maj_at_k_uses_the_first_k_samples():
    keys = ["1", "2", "2", "1", "1"]
    correct = [True, False, False, True, True]
    assert maj_at_k(keys, correct, 1) == 1.0  # "1"
    assert maj_at_k(keys, correct, 3) == 0.0  # "2" wins 2-1
    assert maj_at_k(keys, correct, 5) == 1.0  # "1" wins 3-2
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(keys, correct, 6)
