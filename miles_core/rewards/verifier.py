"""The math verifier: is a response's final answer equal to the reference?

Equal means equal as numbers where both sides are numbers, after normalising how people write
them: thousands separators (`1,000`, `1 000`), leading zeros, decimals (`.5`, `0.50`),
fractions (`3/4`, `\\frac{3}{4}`, `\\dfrac34`), percentages (`50%` matches `50` and `0.5`),
LaTeX wrappers (`$...$`, `\\text{}`, `\\left(`), units in `\\text{}`, scientific notation and
`x = 5`. Numbers are parsed exactly (as fractions), so values with a finite decimal form
compare exactly (2203636302 != 2203636303, -127.2111 != -127.2110) and only values without one
get a relative tolerance (`0.3333333` equals `1/3`). Anything else is compared as a normalised string.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from miles_core.rewards.extract import extract_answer

__all__ = ["REL_TOL", "answer_key", "answers_match", "math_reward", "normalize", "parse_number"]

REL_TOL = 1e-6
_LATEX_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", "~", r"\displaystyle", "^\\circ", "^{\\circ}")
_FRAC_RE = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$|^(-?)\\frac(\d)(\d)$")
_SCI_RE = re.compile(r"^(.+?)(?:\\times|\\cdot|\*|x)10\^\{?([+-]?\d+)\}?$")
_GROUPED_RE = re.compile(r"^-?\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?$")
_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")


def normalize(answer: str) -> str:
    """A canonical string form: LaTeX noise, `$`, trailing periods and `x =` removed."""
    s = answer.strip().replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _LATEX_DROP:
        s = s.replace(token, "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("°", "")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*", "", s)  # `x = 5`
    s = s.rstrip(".").strip()
    return s


def parse_number(answer: str) -> tuple[Fraction, bool] | None:
    """(exact value, written as a percentage) or None when `answer` is not a single number."""
    s = normalize(answer)
    value = _parse_plain(s)
    if value is None:  # `5\text{ cm}`: drop the unit text and try again
        unwrapped = _WRAP_RE.sub("", s).strip()
        value = _parse_plain(unwrapped) if unwrapped != s else None
    return value


def _parse_plain(s: str) -> tuple[Fraction, bool] | None:
    s = _WRAP_RE.sub(lambda m: m.group(1), s).strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    m = _FRAC_RE.match(s)
    if m:
        sign, num, den = (m.group(1), m.group(2), m.group(3)) if m.group(2) else m.group(4, 5, 6)
        top, bottom = _exact(num), _exact(den)
        if top is None or bottom is None or bottom == 0:
            return None
        return (-1 if sign else 1) * top / bottom, percent
    m = _SCI_RE.match(s.replace(" ", ""))
    if m:
        mantissa = _exact(m.group(1))
        return None if mantissa is None else (mantissa * Fraction(10) ** int(m.group(2)), percent)
    value = _exact(s)
    return None if value is None else (value, percent)


def _exact(s: str) -> Fraction | None:
    """An exact rational from `12`, `007`, `-.5`, `1,234.50`, `1 000`, `3/4`, `1.5e-3`, else None."""
    s = s.strip().replace("{", "").replace("}", "") if s.count("{") == s.count("}") else s.strip()
    if _GROUPED_RE.match(s):
        s = s.replace(",", "").replace(" ", "")
    if "/" in s:
        num, _, den = s.partition("/")
        top, bottom = _exact(num), _exact(den)
        return None if top is None or bottom is None or bottom == 0 else top / bottom
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", s):
        return None
    try:
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError):
        return None


def _close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    """Exact when both have a finite decimal form; relative tolerance otherwise (`0.3333333` ~ 1/3).

    A value that can be written exactly (an integer, -127.2111) must be written exactly: a
    relative tolerance would accept -127.2110 or 2203636303 for them.
    """
    if a == b:
        return True
    if _terminating(a) and _terminating(b):
        return False
    return abs(float(a) - float(b)) <= rel_tol * max(abs(float(a)), abs(float(b)))


def _terminating(x: Fraction) -> bool:
    """Whether x has a finite decimal expansion (its denominator has no prime but 2 and 5)."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _candidates(value: Fraction, percent: bool) -> tuple[Fraction, ...]:
    return (value, value / 100) if percent else (value,)


def answers_match(pred: str, ref: str, rel_tol: float = REL_TOL) -> bool:
    """Whether two extracted answers are the same (numerically, else as normalised strings)."""
    p, r = parse_number(pred), parse_number(ref)
    if p is not None and r is not None:
        return any(_close(a, b, rel_tol) for a in _candidates(*p) for b in _candidates(*r))
    if p is not None or r is not None:
        return False
    return _string_key(pred) == _string_key(ref) or _lists_match(pred, ref, rel_tol)


def _string_key(s: str) -> str:
    s = re.sub(r"\s+", "", normalize(s)).lower()
    m = re.fullmatch(r"\(?([a-z])\)?", s)  # `(A)` vs `A`
    return m.group(1) if m else s


def _lists_match(pred: str, ref: str, rel_tol: float) -> bool:
    """`(1, 2)` against `1,2`: element-wise, when both are comma-separated lists of equal length."""
    a, b = _items(pred), _items(ref)
    if a is None or b is None or len(a) != len(b):
        return False
    return all(answers_match(x, y, rel_tol) for x, y in zip(a, b, strict=True))


def _items(s: str) -> list[str] | None:
    s = normalize(s).strip("()[]{} ")
    parts = [p.strip() for p in s.split(",")]
    return parts if len(parts) > 1 and all(parts) else None


def reference_answer(answer: str) -> str:
    """A reference may be a worked solution (`... #### 72`, `... \\boxed{72}`): keep its answer."""
    if "####" in answer or "\\boxed" in answer:
        return extract_answer(answer) or answer
    return answer


def math_reward(response: str, answer: str | None, rel_tol: float = REL_TOL) -> float:
    """1.0 if the response's final answer equals the reference, else 0.0.

    A missing reference is a data error (the caller counts it), not a wrong answer.
    """
    if answer is None:
        raise ValueError("the math verifier needs a reference answer; this prompt has none")
    pred = extract_answer(response)
    return 1.0 if pred is not None and answers_match(pred, reference_answer(answer), rel_tol) else 0.0


def answer_key(response: str) -> str | None:
    """The voting key of a response for maj@k: its answer as a canonical number or string."""
    pred = extract_answer(response)
    if pred is None:
        return None
    number = parse_number(pred)
    if number is None:
        return _string_key(pred)
    value = number[0]
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
