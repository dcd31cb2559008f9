"""Final-answer extraction and numeric comparison for math-style tasks.

A completion's final answer is the content of its LAST non-empty `\\boxed{...}` (nested braces
allowed; `\\boxed 42` also counts). Without a box, the fallback is, in order: the last
`#### N`, the last "the answer is N", then the last number anywhere in the text. Nothing here
raises on malformed text: unparsable answers come back as None and score 0.
"""

from __future__ import annotations

import math
import re

# A number as models write it: optional sign, thousands commas, decimals, or a simple fraction.
# The look-behind keeps "5-3" from reading as "-3" and "3.25" from yielding a stray "25".
_NUMBER = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_PLAIN_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_FRACTION_RE = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
# Decorations that do not change the value: currency, percent, LaTeX spacing, degrees.
_NOISE = ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\ ", "^\\circ", "^{\\circ}", "°")

_BOXED = "\\boxed"


def extract_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` (balanced braces) or `\\boxed TOKEN`, in order.

    An unterminated `\\boxed{` is ignored, so a truncated completion yields what came before it.
    """
    if not isinstance(text, str):
        return []
    out: list[str] = []
    pos = text.find(_BOXED)
    while pos != -1:
        start = pos + len(_BOXED)
        content, end = _read_box_argument(text, start)
        if content is not None:
            out.append(content)
        pos = text.find(_BOXED, max(end, start))
    return out


def _read_box_argument(text: str, start: int) -> tuple[str | None, int]:
    """The argument after `\\boxed` at `start` and where it ends; (None, start) if there is none."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j], j + 1
        return None, start  # unterminated
    if i > start:  # "\boxed 42": the argument is the next whitespace-delimited token
        match = re.match(r"[^\s$]+", text[i:])
        if match:
            return match.group(0), i + match.end()
    return None, start  # e.g. "\boxedfoo" or "\boxed" at the end


def final_answer(text: str) -> str | None:
    """The final answer as written (not yet parsed), or None if the text has none.

    The last non-empty box wins; otherwise the last `#### N`, then the last "answer is N",
    then the last number in the text.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = [b.strip() for b in extract_boxed(text) if b.strip()]
    if boxed:
        return boxed[-1]
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].strip() if numbers else None


def parse_number(s: str | None) -> float | None:
    """A number from an answer string, tolerant of "1,234", "$12", "12.0", "12%", "-3", "1/2".

    Also reads `\\frac{1}{2}`, `\\text{42 apples}`, "x = 42" (the part after the last "=") and
    a string with exactly one number in it ("42 apples"). Anything else gives None.
    """
    if not isinstance(s, str):
        return None
    cleaned = _clean(s)
    if not cleaned:
        return None
    value = _parse_plain(cleaned)
    if value is not None:
        return value
    if "=" in cleaned:
        return parse_number(cleaned.rsplit("=", 1)[1])
    numbers = _NUMBER_RE.findall(cleaned)
    if len(numbers) == 1:
        return _parse_plain(numbers[0])
    return None


def _clean(s: str) -> str:
    s = s.replace("\u2212", "-")  # unicode minus
    s = _TEXT_RE.sub(r"\1", s)
    s = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", s)
    for noise in _NOISE:
        s = s.replace(noise, "")
    s = s.strip().rstrip(".").strip()
    # "(1)/(2)" from \frac, or a fully parenthesised value: drop the simple parentheses.
    return re.sub(r"\(\s*([+-]?[\d.,]+)\s*\)", r"\1", s)


def _parse_plain(s: str) -> float | None:
    """A bare number or simple fraction filling the whole string, else None."""
    s = s.strip()
    if _PLAIN_RE.fullmatch(s):
        return _finite(float(s.replace(",", "")))
    frac = _FRACTION_RE.fullmatch(s)
    if frac:
        num, den = float(frac.group(1)), float(frac.group(2))
        return _finite(num / den) if den != 0 else None
    return None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def numbers_match(predicted: float | None, gold: float | None, rel_tol: float = 1e-6,
                  abs_tol: float = 1e-6) -> bool:
    """True when both are numbers and equal within a small tolerance."""
    if predicted is None or gold is None:
        return False
    return math.isclose(predicted, gold, rel_tol=rel_tol, abs_tol=abs_tol)


def numeric_reward(completion: str, gold: float | int | str) -> float:
    """1.0 if the completion's final answer equals `gold` numerically, else 0.0 (never raises)."""
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        gold_value: float | None = float(gold)
    else:
        gold_value = parse_number(str(gold))
    return 1.0 if numbers_match(parse_number(final_answer(completion)), gold_value) else 0.0
