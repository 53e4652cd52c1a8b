"""Answer grading (`pipeline.scoring`): one table of cases per MathVista rule, checked twice.

Each case states our verdict and how it compares with MathVista's official scorer
(`evaluation/calculate_score.py`, ported below as `mathvista_correct`): "same", "stricter" (MathVista
pays, we do not) or "lenient" (MathVista does not pay a right answer, we do). The test proves each
claim, so every deliberate difference in docs/reward_logic.md is demonstrated, not asserted; the doc's
tables are generated from `GRADING_CASES` (tests/test_reward_docs.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mathvista_scorer import normalize

from pipeline.scoring import (
    MAX_ANSWER_CHARS,
    choice_index,
    is_correct,
    latex_number,
    parse_number,
    strip_markup,
)

# ---------------------------------------------------------------------------------------------
# rows in MathVista's schema
# ---------------------------------------------------------------------------------------------
COLORS = ["red", "green", "blue"]
LENGTHS = ["12 cm", "5 cm", "7 cm"]


def mc(answer: str, choices: list[str]) -> dict:
    return dict(answer=answer, choices=choices, question_type="multi_choice", answer_type="text", precision=None,
                unit=None)


def integer(answer: str, unit: str | None = None) -> dict:
    return dict(answer=answer, choices=None, question_type="free_form", answer_type="integer", precision=None,
                unit=unit)


def decimal(answer: str, precision: float | None) -> dict:
    return dict(answer=answer, choices=None, question_type="free_form", answer_type="float", precision=precision,
                unit=None)


def listed(answer: str) -> dict:
    return dict(answer=answer, choices=None, question_type="free_form", answer_type="list", precision=None, unit=None)


def text(answer: str) -> dict:
    return dict(answer=answer, choices=None, question_type="free_form", answer_type="text", precision=None, unit=None)


@dataclass(frozen=True)
class Case:
    rule: str  # the section of docs/reward_logic.md it illustrates
    answer: str  # the text inside <answer>…</answer>
    row: dict = field(hash=False)
    correct: bool
    why: str
    mathvista: str = "same"  # "same" | "stricter" (MathVista pays, we do not) | "lenient" (the reverse)


GRADING_CASES: list[Case] = [
    # multiple choice: the gold answer is the option's text, as in MathVista
    Case("multi_choice", "B", mc("green", COLORS), True, "the letter of the right option"),
    Case("multi_choice", "(B)", mc("green", COLORS), True, "a letter in parentheses"),
    Case("multi_choice", "B.", mc("green", COLORS), True, "a letter with a period",
         "lenient"),
    Case("multi_choice", "b", mc("green", COLORS), True, "case does not matter for a bare letter", "lenient"),
    Case("multi_choice", "Option B", mc("green", COLORS), True, "an 'Option'/'Answer:' label is dropped"),
    Case("multi_choice", "green", mc("green", COLORS), True, "the option's text"),
    Case("multi_choice", " Green. ", mc("green", COLORS), True, "text compared without case, space, end punctuation"),
    Case("multi_choice", "(B) green", mc("green", COLORS), True, "letter and text that agree"),
    Case("multi_choice", "(B) red", mc("green", COLORS), False, "letter and text that disagree name two options",
         "stricter"),
    Case("multi_choice", "A", mc("green", COLORS), False, "the letter of a wrong option"),
    Case("multi_choice", "C", mc("6", ["4", "6", "6", "8"]), True,
         "options repeat the answer's text (a few MathVista rows): either letter is right"),
    Case("multi_choice", "6", mc("6", ["4", "6", "6", "8"]), True, "the text those repeated options share"),
    Case("multi_choice", "D", mc("6", ["4", "6", "6", "8"]), False, "another option of such a row"),
    Case("multi_choice", "D", mc("green", COLORS), False, "a letter past the last option"),
    Case("multi_choice", "(B) or (C)", mc("green", COLORS), False, "two options: MathVista takes the first letter",
         "stricter"),
    Case("multi_choice", "red green blue", mc("green", COLORS), False,
         "every option listed: MathVista maps it to the nearest option", "stricter"),
    Case("multi_choice", "grn", mc("green", COLORS), False, "not an option: MathVista maps it to the nearest",
         "stricter"),
    Case("multi_choice", "", mc("red", COLORS), False, "empty: MathVista maps it to the nearest (shortest) option",
         "stricter"),
    Case("multi_choice", "I don't know", mc("red", COLORS), False, "garbage: MathVista maps it to the nearest option",
         "stricter"),
    Case("multi_choice", "5", mc("5 cm", LENGTHS), True, "a number that equals one option's value"),
    Case("multi_choice", "5.0 cm", mc("5 cm", LENGTHS), True, "the option's value written differently"),
    Case("multi_choice", "3/2", mc("1.5", ["0.5", "1.5", "2.5"]), True,
         "equal in value to one option; by edit distance all three are as near", "lenient"),
    Case("multi_choice", "A", mc("A", ["B", "A", "C"]), False,
         "a bare letter is a position, as in MathVista, even when an option's text is that letter"),
    # integer
    Case("integer", "5", integer("5"), True, "the number"),
    Case("integer", "5.0", integer("5"), True, "the same value with a decimal point"),
    Case("integer", "5 cm", integer("5"), True, "a unit after the number", "lenient"),
    Case("integer", "1,000", integer("1000"), True, "thousands separators", "lenient"),
    Case("integer", "\\boxed{5}", integer("5"), True, "LaTeX \\boxed{}", "lenient"),
    Case("integer", "$5$", integer("5"), True, "LaTeX math delimiters", "lenient"),
    Case("integer", "Answer: 5.", integer("5"), True, "a label and a final period", "lenient"),
    Case("integer", "\u22125", integer("-5"), True, "a unicode minus sign", "lenient"),
    Case("integer", "30^\\circ", integer("30", "degrees"), True, "degrees written as ^\\circ for the row's unit",
         "lenient"),
    Case("integer", "5.3", integer("5"), False, "a different number: MathVista truncates it to 5", "stricter"),
    Case("integer", "4.9", integer("4"), False, "MathVista truncates toward zero: int(4.9) is 4", "stricter"),
    Case("integer", "12 m", integer("12", "cm"), False, "a unit other than the row's (the prompt asks for cm)"),
    Case("integer", "5 or 6", integer("5"), False, "two numbers"),
    Case("integer", "x = 5", integer("5"), False, "an equation, not a number"),
    Case("integer", "five", integer("5"), False, "a number word"),
    Case("integer", "", integer("5"), False, "empty"),
    # float: both sides rounded to the row's precision
    Case("float", "1.5", decimal("1.5", 1.0), True, "the number"),
    Case("float", "1.54", decimal("1.5", 1.0), True, "rounds to the gold answer at the row's precision"),
    Case("float", "1.56", decimal("1.5", 1.0), False, "rounds to 1.6"),
    Case("float", "2.675", decimal("2.68", 2.0), True,
         "rounding is half-up on the digits written; MathVista's float round() gives 2.67", "lenient"),
    Case("float", "\\frac{3}{2}", decimal("1.5", 1.0), True, "a LaTeX fraction", "lenient"),
    Case("float", "3/2", decimal("1.5", 1.0), True, "a plain fraction", "lenient"),
    Case("float", "1.5", decimal("1.5", None), True,
         "no precision in the row: the gold answer's decimals; MathVista's round() fails on None", "lenient"),
    Case("float", "2\\sqrt{3}", decimal("3.46", 2.0), True, "a closed-form LaTeX value (math-verify)", "lenient"),
    Case("float", "1.5 or 1.6", decimal("1.5", 1.0), False, "two numbers"),
    # list: element-wise
    Case("list", "[1, 2, 3]", listed("[1, 2, 3]"), True, "the same list"),
    Case("list", "[1,2,3]", listed("[1, 2, 3]"), True, "spacing does not matter; MathVista compares strings",
         "lenient"),
    Case("list", "1, 2.0, 3", listed("[1, 2, 3]"), True, "brackets optional, each element compared as a number",
         "lenient"),
    Case("list", "[1, 3, 2]", listed("[1, 2, 3]"), False, "order matters"),
    Case("list", "[1, 2]", listed("[1, 2, 3]"), False, "a missing element"),
    # free-form text
    Case("text", "Green", text("Green"), True, "the text"),
    Case("text", "green.", text("Green"), True, "case, space and end punctuation do not matter; MathVista compares "
         "exact strings", "lenient"),
    Case("text", "the green one", text("Green"), False, "extra words"),
]


# ---------------------------------------------------------------------------------------------
# MathVista's official scorer, ported as the oracle for the "same/stricter/lenient" claims
# ---------------------------------------------------------------------------------------------
def mathvista_correct(extraction: str, row: dict) -> bool:
    """normalize_extracted_answer + safe_equal from MathVista's evaluation/calculate_score.py
    (restated in tests/mathvista_scorer.py); our rows hold precision as a float, its files an int."""
    precision = None if row["precision"] is None else int(row["precision"])
    return normalize(extraction, row["choices"], row["question_type"], row["answer_type"], precision) == row["answer"]


# ---------------------------------------------------------------------------------------------
# the tables
# ---------------------------------------------------------------------------------------------
def _case_id(case: Case) -> str:
    return f"{case.rule}:{case.answer!r}->{case.row['answer']!r}"


@pytest.mark.parametrize("case", GRADING_CASES, ids=_case_id)
def test_grading_rule(case: Case) -> None:
    assert is_correct(case.answer, case.row) is case.correct, case.why


@pytest.mark.parametrize("case", GRADING_CASES, ids=_case_id)
def test_difference_from_mathvista_is_as_documented(case: Case) -> None:
    official = mathvista_correct(case.answer, case.row)
    expected = {"same": case.correct, "stricter": True, "lenient": False}[case.mathvista]
    assert official is expected, f"MathVista says {official}; the case claims {case.mathvista!r}"
    if case.mathvista != "same":
        assert official is not case.correct


def test_every_rule_has_a_deliberate_difference_or_agreement_case() -> None:
    rules = {case.rule for case in GRADING_CASES}
    assert rules == {"multi_choice", "integer", "float", "list", "text"}
    for rule in rules:
        assert any(case.correct for case in GRADING_CASES if case.rule == rule)
        assert any(not case.correct for case in GRADING_CASES if case.rule == rule)
    assert {case.mathvista for case in GRADING_CASES} == {"same", "stricter", "lenient"}


# ---------------------------------------------------------------------------------------------
# the pieces
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [
    ("5", "5"), ("-5", "-5"), ("+5", "5"), ("5.0", "5.0"), (".5", "0.5"), ("1,234,567", "1234567"),
    ("1,234.5", "1234.5"), ("25%", "25"), ("5 cm", "5"), ("12 cm^2", "12"), ("3 m/s", "3"), ("$5", "5"),
    ("\\boxed{5}", "5"), ("\\boxed{\\frac{1}{4}}", "0.25"), ("-\\frac{1}{2}", "-0.5"), ("\\dfrac{3}{4}", "0.75"),
    ("1/8", "0.125"), ("5\\,000", "5000"), ("\\text{5 cm}", "5"), ("5 \\text{ cm}", "5"), ("1e3", "1000"),
    ("**5**", "5"), ("`5`", "5"), ("\\(5\\)", "5"), ("12345678901234567891", "12345678901234567891"),
])
def test_parse_number_reads(raw: str, expected: str) -> None:
    assert parse_number(raw) == Decimal(expected)


@pytest.mark.parametrize("raw", [
    "", "five", "5 or 6", "5, 6", "1,5", "10,00", "5 6", "x = 5", "5/0", "\\frac{1}{0}", "\\boxed{5}\\boxed{6}",
    "1e999", "nan", "inf", "5 apples and 3 pears", "(5)", "--5", "5" * (MAX_ANSWER_CHARS + 1),
])
def test_parse_number_rejects(raw: str) -> None:
    assert parse_number(raw) is None


def test_parse_number_checks_the_rows_unit() -> None:
    assert parse_number("5 cm", "cm") == 5
    assert parse_number("5 centimeters", "cm") is None
    assert parse_number("30°", "degrees") == 30
    assert parse_number("30 degrees", "°") == 30
    assert parse_number("4 units", "unit") == 4
    assert parse_number("25%", "%") == 25
    assert parse_number("25%", "cm") is None
    assert parse_number("5 cm\u00b2", "cm^2") == parse_number("5 cm^{2}", "cm\u00b2") == 5


@pytest.mark.parametrize(("raw", "expected"), [
    ("\\frac{\\sqrt{3}}{2}", 0.8660254), ("2\\sqrt{3}", 3.4641016), ("1.5 \\times 10^{3}", 1500.0),
    ("2^{10}", 1024.0), ("\\frac{\\pi}{2}", 1.5707963), ("2pi", 6.2831853),
])
def test_latex_expressions_through_math_verify(raw: str, expected: float) -> None:
    pytest.importorskip("math_verify")
    value = latex_number(raw)
    assert value is not None and math.isclose(float(value), expected, rel_tol=1e-6)


@pytest.mark.parametrize("raw", [
    "x^2", "\\sqrt{x}", "9^{9^{9}}", "10^{1000}", "\\int_0^1 x dx", "\\frac{1}{2} or \\frac{1}{3}", "\\pi" * 60,
    "2^{3^{4}}", "\\sqrt{-1}", "\\unknown{3}",
])
def test_latex_guard_keeps_sympy_bounded(raw: str) -> None:
    assert latex_number(raw) is None


def test_strip_markup_peels_wrappers() -> None:
    assert strip_markup("$\\boxed{\\text{green}}$.") == "green"
    assert strip_markup("The final answer is: 42") == "42"
    assert strip_markup("  a   b  ") == "a b"
    assert strip_markup("Choice of words") == "Choice of words"  # a label only before a lone letter


def test_choice_index() -> None:
    assert choice_index("C)", COLORS) == 2
    assert choice_index("c.", COLORS) == 2
    assert choice_index("blue", COLORS) == 2
    assert choice_index("(C) blue", COLORS) == 2
    assert choice_index("C. Blue!", COLORS) == 2
    assert choice_index("B, C", COLORS) is None
    assert choice_index("same", ["same", "same", "other"]) is None  # duplicate options name no single one
    assert choice_index("A. Lincoln", ["A. Lincoln", "Washington"]) == 0  # an option's text wins over a label


# ---------------------------------------------------------------------------------------------
# robustness: odd rows, then property tests over random input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", [
    {}, {"answer": None}, {"answer": float("nan")}, {"answer": ""}, {"answer": "  "},
    {"answer": "5", "answer_type": None, "precision": float("nan"), "unit": float("nan"), "choices": float("nan")},
    {"answer": "green", "choices": "red,green", "question_type": "multi_choice"},
    {"answer": "green", "choices": [], "question_type": "multi_choice"},
    {"answer": "green", "choices": COLORS + ["green"], "question_type": "multi_choice"},
    {"answer": "purple", "choices": COLORS, "question_type": "multi_choice"},
    {"answer": "1.5", "answer_type": "float", "precision": -1},
    {"answer": "1.5", "answer_type": "float", "precision": 1e9},
    {"answer": "1.5", "answer_type": "float", "precision": "two"},
    {"answer": "[1, 2]", "answer_type": "list", "precision": float("inf")},
])
def test_odd_rows_are_wrong_or_graded_without_raising(row: dict) -> None:
    assert is_correct("B", row) in (True, False)
    assert is_correct("5", row) in (True, False)


def test_odd_rows_that_still_grade() -> None:
    assert is_correct("5", {"answer": 5})  # no types at all: a numeric gold is compared by value
    assert is_correct("1.25", {"answer": 1.25})
    assert not is_correct("1.2", {"answer": "1.25"})
    assert is_correct("B", {"answer": "green", "choices": COLORS})  # choices without a question_type
    assert is_correct("5", {"answer": "5", "answer_type": "integer", "precision": float("nan"), "unit": ""})
    assert not is_correct(None, integer("5"))
    assert not is_correct("5", None)  # type: ignore[arg-type]
    assert not is_correct("5" + " " * MAX_ANSWER_CHARS, integer("5"))
    assert not is_correct("9" * 40 + ".5", decimal("1.5", 1.0))  # rounding a huge value is exact, not an error
    assert is_correct("1e99", decimal("1e99", 2.0))


ANY_VALUE = st.none() | st.floats() | st.integers() | st.text(max_size=20) | st.booleans() | st.lists(
    st.text(max_size=8) | st.none() | st.floats(), max_size=5)
ROWS = st.fixed_dictionaries({
    "answer": ANY_VALUE | st.sampled_from(["5", "1.5", "green", "[1, 2]", "A"]),
    "choices": ANY_VALUE | st.just(COLORS),
    "question_type": ANY_VALUE | st.sampled_from(["multi_choice", "free_form"]),
    "answer_type": ANY_VALUE | st.sampled_from(["integer", "float", "list", "text"]),
    "precision": ANY_VALUE,
    "unit": ANY_VALUE | st.sampled_from(["cm", "degrees", "%"]),
})
ANSWER_PIECES = st.sampled_from([
    "5", "1.5", "-", ",", ".", "%", " ", "cm", "\\boxed{", "}", "{", "\\frac", "$", "(", ")", "B", "green", "or",
    "\\sqrt", "^", "\\pi", "\\text{", "Answer:", "\u2212", "\u00b2", "\u00b0", "e", "1,000", "/", "[", "]",
])
ANSWERS = st.text(max_size=200) | st.lists(ANSWER_PIECES, max_size=30).map("".join)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(answer=st.none() | ANSWERS, row=ROWS)
def test_is_correct_never_raises_and_returns_a_bool(answer: str | None, row: dict) -> None:
    assert is_correct(answer, row) in (True, False)


@PROPERTY
@given(raw=ANSWERS, unit=st.none() | st.sampled_from(["cm", "%", "degrees"]))
def test_parse_number_never_raises(raw: str, unit: str | None) -> None:
    value = parse_number(raw, unit)
    assert value is None or (isinstance(value, Decimal) and value.is_finite())


@PROPERTY
@given(value=st.integers(min_value=-10**9, max_value=10**9))
def test_an_integer_matches_itself_however_written(value: int) -> None:
    row = integer(str(value))
    assert is_correct(str(value), row)
    assert is_correct(f"{value:,}", row)
    assert is_correct(f"{value}.0", row)
    assert is_correct(f"\\boxed{{{value}}}", row)
    assert not is_correct(str(value + 1), row)


@PROPERTY
@given(value=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), digits=st.integers(0, 3))
def test_a_float_matches_its_rounding(value: float, digits: int) -> None:
    gold = f"{value:.{digits}f}"
    assert is_correct(gold, decimal(gold, float(digits)))
    assert not is_correct(f"{float(gold) + 2 * 10 ** -digits:.{digits}f}", decimal(gold, float(digits)))
