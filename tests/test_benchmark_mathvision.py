"""MATH-Vision (pipeline/benchmarks/mathvision.py): the prompt is the one MATH-V's generation scripts
send, the scorer's verdicts follow MATH-V's evaluation/evaluate.py on hand-made answers (its answer
extraction, then the same text or the same value to 2 decimals, by letter or by the option's text),
the output records have evaluate.py's keys, and `sample_rows` gives rows in the Hub dataset's exact
schema for the suite's integration test (tests/test_benchmark_suite.py)."""

from __future__ import annotations

import pytest

from pipeline.benchmarks import registry
from pipeline.benchmarks.mathvision import BENCHMARKS, COLUMNS, model_answer, official_output, prompt, score

INSTRUCTION = ('Please solve the problem step by step and put your answer in one "\\boxed{}". '
               'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".\n')


def _row(id_: str, question: str, options: list[str], answer: str, level: int, subject: str,
         decoded_image=None, solution: str | None = None) -> dict:
    """A row in MathLLMs/MathVision's schema (every column, in the dataset's order)."""
    row = {"id": id_, "question": question, "options": options, "image": f"images/{id_}.jpg",
           "decoded_image": decoded_image, "answer": answer, "solution": solution, "level": level, "subject": subject}
    assert tuple(row) == COLUMNS
    return row


def sample_rows(image_png: bytes) -> dict[str, list[dict]]:
    """Each MATH-V split's raw rows, `decoded_image` as the dataset's Image feature stores it: a
    free-form row, a multiple-choice row with option texts, one whose options are drawn in the image."""
    def rows(ids: tuple[str, str, str, str]) -> list[dict]:
        image = {"bytes": image_png, "path": "decoded_image.png"}
        return [
            _row(ids[0], "How many different digits can you find in this picture?\n<image1>", [], "6", 1, "counting",
                 image),
            _row(ids[1], "Which number do you have to write in the last daisy?\n<image1>",
                 ["48", "51", "61", "62", "74"], "C", 2, "arithmetic", image,
                 "Each number is 13 more than the one before it."),
            _row(ids[2], "In which picture can we see the kittens of Misty?\n<image1>", ["A", "B", "C", "D", "E"],
                 "D", 3, "logic", image),
            _row(ids[3], "What is the length of the diagonal?\n<image1>", [], "2\\sqrt{3}", 4,
                 "metric geometry - length", image),
        ]

    return {"mathvision-testmini": rows(("4", "5", "6", "90")), "mathvision-test": rows(("1", "2", "3", "7"))}


FREE = _row("4", "How many different digits can you find in this picture?\n<image1>", [], "6", 1, "counting")
OPTIONS = _row("5", "Which number?\n<image1>", ["1", "2", "3", "4", "5"], "C", 2, "arithmetic")
LETTERS = _row("6", "Which picture?\n<image1>", ["A", "B", "C", "D", "E"], "D", 3, "logic")
SURD = _row("90", "Diagonal?\n<image1>", [], "2\\sqrt{3}", 4, "metric geometry - length")
PAIR = _row("91", "Coordinates of P?\n<image1>", [], "(1,2)", 3, "analytic geometry")
HALF = _row("92", "Probability?\n<image1>", [], "\\frac{1}{2}", 2, "combinatorics")
ANGLE = _row("93", "Angle x?\n<image1>", [], "60", 3, "metric geometry - angle")

CASES = [
    # free-form numbers
    ("6", FREE, True, "number"),
    ("\\boxed{6}", FREE, True, "boxed"),
    ("<answer>6</answer>", FREE, True, "answer-block"),
    ("I count the digits 1, 2, 3, 5, 7 and 9.\nThe answer is 6.", FREE, True, "free-text-the-answer-is"),
    ("So the final answer is 6. Each digit appears once.", FREE, True, "free-text-first-sentence-after-flag"),
    ("There are 6 different digits", FREE, False, "free-text-without-answer-phrase"),
    ("x = 6", FREE, True, "value-after-equals"),
    ("\\boxed{6 \\text{ digits}}", FREE, False, "boxed-text-unit-left-as-braces-by-math-v"),
    ("\\boxed{6 \\text{km}}", FREE, True, "boxed-km-dropped-by-math-v"),
    ("6 cm", FREE, True, "unit-word-accepted"),
    ("\\boxed{5}", FREE, False, "wrong-number"),
    ("First \\boxed{5}, on reflection \\boxed{6}", FREE, True, "last-of-several-boxes"),
    ("6.0", FREE, True, "trailing-zero"),
    ("6.004", FREE, True, "equal-to-two-decimals"),
    ("6.01", FREE, False, "different-at-two-decimals"),
    # multiple choice with option texts: by letter or by the gold option's text
    ("C", OPTIONS, True, "mc-letter"),
    ("(C)", OPTIONS, True, "mc-letter-in-parentheses"),
    ("C.", OPTIONS, True, "mc-letter-trailing-period"),
    ("c", OPTIONS, True, "mc-lowercase-letter"),
    ("\\boxed{C}", OPTIONS, True, "mc-boxed-letter"),
    ("<answer>(C)</answer>", OPTIONS, True, "mc-answer-block"),
    ("3", OPTIONS, True, "mc-option-text"),
    ("\\boxed{3}", OPTIONS, True, "mc-boxed-option-text"),
    ("The daisies grow by one each time, so the correct answer is (C).", OPTIONS, True, "mc-free-text-trailing-letter"),
    ("(B)", OPTIONS, False, "mc-wrong-letter"),
    ("2", OPTIONS, False, "mc-wrong-option-text"),
    ("Answer: C", OPTIONS, False, "mc-answer-colon-not-read-by-math-v"),
    # options drawn in the image: letters only
    ("D", LETTERS, True, "letters-only-letter"),
    ("\\boxed{d}", LETTERS, True, "letters-only-boxed-lowercase"),
    ("E", LETTERS, False, "letters-only-wrong-letter"),
    # LaTeX values
    ("2\\sqrt{3}", SURD, True, "latex-same-text"),
    ("$\\boxed{2\\sqrt{3}}$", SURD, True, "latex-boxed-in-delimiters"),
    ("\\sqrt{12}", SURD, True, "latex-equal-value"),
    ("3.464", SURD, True, "decimal-equal-to-two-places"),
    ("3.5", SURD, False, "decimal-not-equal"),
    ("0.5", HALF, True, "decimal-for-fraction"),
    ("1/2", HALF, True, "slash-fraction"),
    ("\\dfrac{1}{2}", HALF, True, "dfrac"),
    ("\\frac{1}{3}", HALF, False, "other-fraction"),
    ("60^\\circ", ANGLE, True, "degrees-latex"),
    ("60°", ANGLE, True, "degrees-symbol"),
    # tuples: element by element, to 2 decimals
    ("(1, 2)", PAIR, True, "tuple-spacing"),
    ("(1.001, 2)", PAIR, True, "tuple-rounded"),
    ("(2, 1)", PAIR, False, "tuple-order"),
    ("[1, 2]", PAIR, False, "list-is-not-tuple"),
    (None, FREE, False, "no-generation"),
    ("", FREE, False, "empty-response"),
]


@pytest.mark.parametrize(("response", "row", "expected"), [case[:3] for case in CASES],
                         ids=[case[3] for case in CASES])
def test_the_scorer_follows_math_v_rules(response, row, expected):
    assert score(response, row) is expected


def test_the_prompt_is_math_vs():
    # models/GPT4.py and models/Qwen-VL.py geninput: the instruction, the question, the options unless "ABCDE"
    assert prompt(OPTIONS) == (
        'Please solve the problem step by step and put your answer in one "\\boxed{}". If it is a multiple choice '
        'question, only one letter is allowed in the "\\boxed{}".\nWhich number?\n<image1>\n'
        "(A) 1\n(B) 2\n(C) 3\n(D) 4\n(E) 5\n")
    assert prompt(LETTERS) == INSTRUCTION + "Which picture?\n<image1>\n"
    assert prompt(FREE) == INSTRUCTION + "How many different digits can you find in this picture?\n<image1>\n"


def test_model_answer_is_what_evaluate_py_extracts():
    assert model_answer("Thus \\boxed{\\frac{1}{2}} of the area.") == "\\frac{1}{2}"
    assert model_answer("The length is \\boxed{12 km}.") == "12"
    assert model_answer("The length is 12 km.") == "thelengthis12"  # no answer phrase: the whole text
    assert model_answer("so the answer is (D).") == "d"
    assert model_answer(None) == ""


def test_the_benchmarks_are_registered_with_the_hub_coordinates():
    shipped = registry()
    assert [b.split for b in BENCHMARKS] == ["testmini", "test"]
    for benchmark in BENCHMARKS:
        assert shipped[benchmark.name] is benchmark
        assert (benchmark.hub_id, benchmark.config) == ("MathLLMs/MathVision", None)
        assert len(benchmark.revision) == 40 and benchmark.image_column == "decoded_image"
        assert benchmark.breakdown == ("subject", "level") and benchmark.keep is None


def test_the_output_records_have_evaluate_pys_keys():
    out = official_output([FREE, OPTIONS], ["The answer is 6.", None], [True, False])
    assert out == [{"id": "4", "response": "The answer is 6.", "model_answer": "6", "correct": True},
                   {"id": "5", "response": "", "model_answer": "", "correct": False}]


def test_sample_rows_have_every_column():
    rows = sample_rows(b"\x89PNG")
    assert set(rows) == {b.name for b in BENCHMARKS}
    for benchmark_rows in rows.values():
        assert 3 <= len(benchmark_rows) <= 4
        assert any(row["options"] for row in benchmark_rows) and any(not row["options"] for row in benchmark_rows)
        for row in benchmark_rows:
            assert tuple(row) == COLUMNS and row["decoded_image"]["bytes"] == b"\x89PNG"
            assert isinstance(row["level"], int) and isinstance(row["id"], str)
