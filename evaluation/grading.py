"""Grading a reasoning model's reply: its final answer, and whether that answer is right.

    answer = final_answer(reply)          # FinalAnswer(text="\\frac{5}{6}", truncated=False)
    is_correct(answer, gold="5/6")        # True: math-verify compares the two as mathematics
    chosen_option(final_answer(reply))    # "B", for a multiple-choice question (GPQA)

The answer is what follows the last `</think>`: a reply whose `<think>` never closes is graded wrong
and counted as truncated (the token cap cut it), whatever it says inside, since an answer taken from
inside the thinking is how a grader credits a model for a guess it never gave. In what follows the
thinking, the `<answer>...</answer>` span is taken if there is one (the recipe's data closes every reply
that way), and inside that the last `\\boxed{...}` if there is one. Mathematical equality is math-verify's
(`parse` of both sides, `verify(gold, prediction)`): it uses `signal.alarm` for its time limits, so it
runs in the main thread of the main process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_ANSWER_SPAN = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_OPTION = re.compile(r"\b([A-D])\b")


@dataclass(frozen=True)
class FinalAnswer:
    """The part of a reply that is graded (None: there is none), and whether the reply was cut off
    inside its thinking."""

    text: str | None
    truncated: bool = False


def final_answer(reply: str) -> FinalAnswer:
    """The graded part of `reply` (module doc): after the last </think>, the <answer> span, the last
    \\boxed{} in it."""
    if THINK_CLOSE in reply:
        tail = reply.rsplit(THINK_CLOSE, 1)[1]
    elif THINK_OPEN in reply:
        return FinalAnswer(None, truncated=True)
    else:
        tail = reply
    span = _ANSWER_SPAN.search(tail)
    if span:
        tail = span.group(1)
    boxed = last_boxed(tail)
    text = (boxed if boxed is not None else tail).strip()
    return FinalAnswer(text or None)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if
    there is none, or it never closes."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = text.index("{", start)
    depth = 0
    for i in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[opening + 1 : i]
    return None


def is_correct(answer: FinalAnswer, gold: str) -> bool:
    """Whether the answer equals `gold` as mathematics (math-verify: 5/6, \\frac{5}{6} and \\dfrac{5}{6}
    agree); a missing answer never does; a gold answer math-verify cannot read is a ValueError. Main
    thread only (math-verify's alarms)."""
    from math_verify import parse, verify

    expected = parse(_as_latex(gold))
    if not expected:  # a zero for every reply would hide it
        raise ValueError(f"the gold answer {gold!r} is no mathematics math-verify can read")
    return answer.text is not None and verify(expected, parse(_as_latex(answer.text)))


def gold_is_readable(gold: str) -> bool:
    """Whether math-verify reads `gold` as mathematics (`is_correct` refuses a gold answer it cannot)."""
    from math_verify import parse

    return bool(gold.strip()) and bool(parse(_as_latex(gold)))


def _as_latex(text: str) -> str:
    """math-verify's LaTeX extraction reads math between delimiters: a bare answer gets them."""
    stripped = text.strip()
    return stripped if stripped.startswith(("$", "\\(", "\\[")) else f"${stripped}$"


def chosen_option(answer: FinalAnswer) -> str | None:
    """The option letter (A-D) the answer names: the last one standing alone ("B", "(B)", "B. 42"),
    or None."""
    if answer.text is None:
        return None
    letters = _OPTION.findall(answer.text)
    return letters[-1] if letters else None
