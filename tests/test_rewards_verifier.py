"""The math verifier: a table of (response, reference, expected) pairs, right and wrong."""

import pytest

from miles_core.rewards.extract import extract_answer, extract_boxed, last_number
from miles_core.rewards.verifier import answer_key, answers_match, math_reward, parse_number

# (response, reference answer, expected reward)
CASES = [
    # answer markers
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("#### 72", "72", 1.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", 1.0),
    ("<think>2+2</think><answer>-4</answer>", "-4", 1.0),
    ("<answer>12</answer> and later 13", "12", 1.0),
    ("The final answer is: 12.", "12", 1.0),
    ("The answer is 42. Check: 42+1=43", "42", 1.0),
    ("The total is 17 apples", "17", 1.0),
    ("I think 42. Check: 42+1=43", "42", 0.0),  # no marker: the last number (43) is taken
    ("\\boxed{12}", "Worked solution ... #### 12", 1.0),  # reference given as a worked solution
    # commas, spaces, leading zeros
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1 000 000}", "1000000", 1.0),
    ("The answer is 007", "7", 1.0),
    ("\\boxed{1,234.50}", "1234.5", 1.0),
    ("\\boxed{1,001}", "1000", 0.0),
    ("\\boxed{1,2}", "12", 0.0),
    # fractions and decimals
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac34}", "0.75", 1.0),
    ("\\boxed{-\\frac{2}{3}}", "-2/3", 1.0),
    ("\\boxed{0.50}", "1/2", 1.0),
    ("\\boxed{.5}", "0.5", 1.0),
    ("\\boxed{0.3333333}", "1/3", 1.0),
    ("\\boxed{3/4}", "4/3", 0.0),
    ("\\boxed{0.5}", "0.05", 0.0),
    ("\\boxed{1/0}", "0", 0.0),
    # percentages
    ("\\boxed{50\\%}", "0.5", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("It is 25%", "0.25", 1.0),
    ("\\boxed{50\\%}", "5", 0.0),
    # LaTeX wrappers, units, signs, notation
    ("\\boxed{$5$}", "5", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{\\$18}", "18", 1.0),
    ("\u22125 is what I get; \\boxed{\u22125}", "-5", 1.0),
    ("\\boxed{1.2 \\times 10^{3}}", "1200", 1.0),
    ("\\boxed{1.5e-3}", "0.0015", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{(B)}", "B", 1.0),
    ("\\boxed{-5}", "5", 0.0),
    # finite decimals compare exactly; only values like 1/3 get a 1e-6 relative tolerance
    ("2203636303", "2203636302", 0.0),
    ("\\boxed{74.9162}", "74.9161", 0.0),
    ("\\boxed{-127.2110}", "-127.2111", 0.0),  # within 1e-6 relative, but written exactly
    ("\\boxed{-127.21110}", "-127.2111", 1.0),
    ("\\boxed{41}", "42", 0.0),
    # no answer at all
    ("no number here", "5", 0.0),
    ("\\boxed{5", "5", 0.0),  # cut off inside the box: no answer
    ("", "5", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),  # a rounded decimal is not the fraction
    ("\\boxed{25\\%}", "0.5", 0.0),
    ("<answer>B</answer>", "(C)", 0.0),
    ("\\boxed{(1, 3)}", "(1,2)", 0.0),
]


@pytest.mark.parametrize(("response", "answer", "expected"), CASES)
def test_math_reward_table(response, answer, expected):
    assert math_reward(response, answer) == expected


def test_table_has_forty_pairs_both_right_and_wrong():
    assert len(CASES) >= 40
    assert sum(e == 1.0 for *_, e in CASES) >= 20 and sum(e == 0.0 for *_, e in CASES) >= 15


def test_missing_reference_is_an_error_not_a_wrong_answer():
    with pytest.raises(ValueError, match="reference"):
        math_reward("\\boxed{1}", None)


def test_extract_boxed_keeps_nested_braces_and_takes_the_last_box():
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert extract_boxed("\\boxed 7 done") == "7"
    assert extract_boxed("no box") is None


def test_extract_answer_prefers_explicit_markers_over_the_last_number():
    assert extract_answer("<answer>3</answer> (checked with 4)") == "3"
    assert extract_answer("#### 8\nextra 9") == "8"
    assert extract_answer("so 1, 2, then 3.") == "3"
    assert last_number("a 1,234 b -0.5 c") == "-0.5"


def test_parse_number_is_exact_for_decimals():
    value, percent = parse_number("0.1")
    assert value.numerator == 1 and value.denominator == 10 and not percent
    assert parse_number("12%")[1] is True
    assert parse_number("apple") is None


def test_answers_match_large_integers_exactly():
    assert answers_match("123456789012345678901", "123456789012345678901")
    assert not answers_match("123456789012345678902", "123456789012345678901")


def test_answer_key_unifies_equal_numbers_for_voting():
    assert answer_key("\\boxed{0.50}") == answer_key("#### 1/2") == "1/2"
    assert answer_key("\\boxed{1,000}") == answer_key("The answer is 1000") == "1000"
    assert answer_key("nothing") is None
