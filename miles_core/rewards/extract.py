"""Finding the final answer in a model's response.

Models state answers in several conventions; the verifier looks for them in order of how
deliberate they are: `\\boxed{...}` (MATH-style), `<answer>...</answer>` (reasoning-gym's
prompts), `#### ...` (GSM8K), "the answer is ...", and only then the last number in the text.
An explicit marker wins because responses often write other numbers (checks, units, a
restated question) after their answer.
"""

from __future__ import annotations

import re

__all__ = ["NUMBER", "extract_answer", "extract_boxed", "last_number"]

# A number as written in prose: 1,234.5 | -3 | .5 | 2/3 | 1.5e-3 | 45% (the order matters).
NUMBER = (
    r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?"
    r"|-?\d+(?:\.\d+)?[eE][+-]?\d+"
    r"|-?\d+(?:\.\d+)?(?:/\d+)?%?"
    r"|-?\.\d+%?"
)
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{NUMBER})")
_TAG_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_PHRASE_RE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces kept), or `\\boxed 5`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.index("{", start) if "{" in text[start : start + 8] else -1
    if i < 0:  # `\boxed 5`
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unbalanced: no answer rather than a guess


def last_number(text: str) -> str | None:
    """The last number written in `text` (see NUMBER), or None."""
    matches = _NUMBER_RE.findall(text.replace("\u2212", "-"))
    return matches[-1] if matches else None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response as a string, or None when it states none."""
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None or "\\boxed{" in text:  # an unclosed box is a cut-off answer: none
        return boxed
    tags = _TAG_RE.findall(text)
    if tags:
        return tags[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
    phrases = _PHRASE_RE.findall(text)
    if phrases:
        tail = phrases[-1].strip().rstrip(".")
        number = _NUMBER_RE.search(tail)
        return number.group(0) if number and number.start() < 3 else tail
    return last_number(text)
