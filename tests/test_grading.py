"""evaluation/grading.py on hand-made replies: where the answer is taken from, and math-verify's
equality on the forms a reasoning model writes."""

from __future__ import annotations

import pytest

from evaluation.grading import FinalAnswer, chosen_option, final_answer, is_correct, last_boxed


@pytest.mark.parametrize(
    ("reply", "text", "truncated"),
    [
        ("<think>\n2+2</think>\n\nThe answer is \\boxed{4}.", "4", False),
        # the recipe's format: the <answer> span after the thinking, \boxed inside it
        ("<think>x</think> <answer>So \\boxed{\\dfrac{5}{6}}.</answer>", "\\dfrac{5}{6}", False),
        ("<think>x</think> <answer>42</answer>", "42", False),
        # the last </think> counts: a reply that thinks twice is graded on what follows the second
        ("<think>a</think> \\boxed{1} <think>b</think> \\boxed{2}", "2", False),
        # cut off inside the thinking: no answer, whatever the thinking says
        ("<think>\nso it is \\boxed{2}, I think", None, True),
        ("no thinking block, \\boxed{7}", "7", False),
        ("<think>x</think>   ", None, False),
        ("<think>x</think> \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}", "x^{2}", False),
    ],
)
def test_the_final_answer_is_taken_after_the_thinking(reply, text, truncated):
    assert final_answer(reply) == FinalAnswer(text, truncated)


def test_boxed_content_keeps_nested_braces_and_an_unclosed_box_is_none():
    assert last_boxed("\\boxed{\\frac{a}{b^{2}}} tail") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\fbox{3}") == "3"
    assert last_boxed("\\boxed{\\frac{1}{2}") is None and last_boxed("none") is None


@pytest.mark.parametrize(
    ("reply", "gold", "correct"),
    [
        ("<think>x</think> \\boxed{2}", "2", True),
        ("<think>x</think> <answer>\\boxed{\\dfrac{5}{6}}</answer>", "\\frac{5}{6}", True),
        ("<think>x</think> <answer>\\boxed{5/6}</answer>", "\\frac{5}{6}", True),
        ("<think>x</think> \\boxed{0.5}", "\\frac{1}{2}", True),
        ("<think>x</think> \\boxed{3}", "2", False),
        ("<think>the answer is \\boxed{2}", "2", False),  # right, but inside an unclosed <think>
        ("<think>x</think> \\boxed{x^2 + 2x + 1}", "(x+1)^2", True),
        ("<think>x</think> \\boxed{204}", "204", True),
    ],
)
def test_correctness_is_mathematical_equality_of_the_final_answer(reply, gold, correct):
    assert is_correct(final_answer(reply), gold) is correct


def test_an_unreadable_gold_answer_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="the gold answer '' is no mathematics"):
        is_correct(final_answer("<think>x</think> \\boxed{2}"), "")


def test_the_option_letter_of_a_multiple_choice_answer():
    assert chosen_option(final_answer("<think>x</think> <answer>(B)</answer>")) == "B"
    assert chosen_option(final_answer("<think>x</think> The answer is \\boxed{C}")) == "C"
    assert chosen_option(final_answer("<think>A or B?")) is None
    assert chosen_option(FinalAnswer("none of them")) is None
