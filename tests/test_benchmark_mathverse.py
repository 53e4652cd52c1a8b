"""MathVerse testmini (pipeline/benchmarks/mathverse.py): the prompt is the authors' `query_wo`, `keep`
picks one problem version, the scorer's verdicts follow MathVerse's judging rules on hand-made
answers (the deterministic part: options by letter or text, exact numbers, normalised text), the
results file has the keys of the authors' output template, and `sample_rows` gives rows in the Hub
dataset's exact schema for the suite's integration test (tests/test_benchmark_suite.py)."""

from __future__ import annotations

import pytest

from pipeline.benchmarks import registry
from pipeline.benchmarks.mathverse import BENCHMARKS, COLUMNS, choices, extraction, official_output, prompt, score

VISION_ONLY, TEXT_LITE = (next(b for b in BENCHMARKS if b.name == name)
                          for name in ("mathverse-vision-only", "mathverse-text-lite"))
MC_QUERY = ("Please directly answer the question and provide the correct option letter, e.g., A, B, C, D.\n"
            "Question: ")
FREE_QUERY = "Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.\nQuestion: "
VISION_MC_QUERY = ("According to the question shown in the image, please directly answer the question and provide "
                   "the correct option letter, e.g., A, B, C, D.")
VISION_FREE_QUERY = ("According to the question shown in the image, please directly answer the question and provide "
                     "the final value, e.g., 1, 2.5, 300.")
CIRCLE = ("As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length of BC is ()\n"
          "Choices:\nA:2\nB:2√{3}\nC:√{3}\nD:2√{2}")
CIRCLE_LITE = ("As shown in the figure, if angle BAC = 60.0, then the length of BC is ()\n"
               "Choices:\nA:2\nB:2√{3}\nC:√{3}\nD:2√{2}")
STRAW_LITE = "The radius is 3 cm. Find L.\n\nGive your answer rounded down to the nearest cm."
STRAW = ("A soft drink can has a height of 13 cm and a radius of 3 cm. Find L, the length of the longest straw that "
         "can fit into the can (so that the straw is not bent and fits entirely inside the can).\n\nGive your answer "
         "rounded down to the nearest cm, to ensure it fits inside the can.")


def _row(sample_index: str, problem_index: str, version: str, question: str, answer: str, question_type: str,
         question_for_eval: str, subject: str = "Plane Geometry", subfield: str = "Length", image=None) -> dict:
    """A row in AI4Math/MathVerse's testmini schema (every column, in the dataset's order)."""
    multi = question_type == "multi-choice"
    if version == "Vision Only":
        query_wo = VISION_MC_QUERY if multi else VISION_FREE_QUERY
        query_cot = ("According to the question shown in the image, please first conduct reasoning, and then answer "
                     "the question and provide the correct option letter, e.g., A, B, C, D, at the end." if multi else
                     "According to the question shown in the image, please first conduct reasoning, and then answer "
                     "the question and provide the final value, e.g., 1, 2.5, 300, at the end.")
    else:
        query_wo = (MC_QUERY if multi else FREE_QUERY) + question
        query_cot = ("Please first conduct reasoning, and then answer the question and provide the correct option "
                     "letter, e.g., A, B, C, D, at the end.\nQuestion: " if multi else
                     "Please first conduct reasoning, and then answer the question and provide the final value, "
                     "e.g., 1, 2.5, 300, at the end.\nQuestion: ") + question
    row = {"sample_index": sample_index, "problem_index": problem_index, "problem_version": version,
           "question": question, "image": image, "answer": answer, "question_type": question_type,
           "metadata": {"split": "testmini", "source": "GeoQA", "subject": subject, "subfield": subfield},
           "query_wo": query_wo, "query_cot": query_cot, "question_for_eval": question_for_eval}
    assert tuple(row) == COLUMNS
    return row


def sample_rows(image_png: bytes) -> dict[str, list[dict]]:
    """Each MathVerse benchmark's raw rows, the image as the dataset's Image feature stores it. Each
    set has three rows of its own version (multi-choice and free-form) and one of another version,
    which `keep` leaves out."""
    def image(name: str) -> dict:
        return {"bytes": image_png, "path": name}

    return {
        "mathverse-vision-only": [
            _row("5", "1", "Vision Only", "", "C", "multi-choice", CIRCLE, image=image("image_1.png")),
            _row("3425", "685", "Vision Only", "", "14", "free-form", STRAW, "Solid Geometry",
                 image=image("image_685.png")),
            _row("4015", "804", "Vision Only", "", "22.3", "free-form", "Find the distance d, to one decimal place.",
                 "Plane Geometry", "Angle", image=image("image_804.png")),
            _row("3422", "685", "Text Lite", STRAW_LITE, "14", "free-form", STRAW_LITE, "Solid Geometry",
                 image=image("image_685.png")),
        ],
        "mathverse-text-lite": [
            _row("2", "1", "Text Lite", CIRCLE_LITE, "C", "multi-choice", CIRCLE_LITE, image=image("image_1.png")),
            _row("3422", "685", "Text Lite", STRAW_LITE, "14", "free-form", STRAW_LITE, "Solid Geometry",
                 image=image("image_685.png")),
            _row("4012", "804", "Text Lite", "Find the distance d, to one decimal place.", "22.3", "free-form",
                 "Find the distance d, to one decimal place.", "Plane Geometry", "Angle", image=image("image_804.png")),
            _row("3425", "685", "Vision Only", "", "14", "free-form", STRAW, "Solid Geometry",
                 image=image("image_685.png")),
        ],
    }


MC = _row("2", "1", "Text Lite", CIRCLE_LITE, "C", "multi-choice", CIRCLE_LITE)
MC_VISION = _row("5", "1", "Vision Only", "", "C", "multi-choice", CIRCLE)
FREE = _row("3422", "685", "Text Lite", STRAW_LITE, "14", "free-form", STRAW_LITE, "Solid Geometry")
DECIMAL = _row("4012", "804", "Text Lite", "Find d.", "22.3", "free-form", "Find d.")
EXPRESSION = _row("100", "20", "Text Lite", "Find the equation of f.", "f(x)=-x^2-2x+1", "free-form",
                  "Find the equation of f.", "Functions", "Expression")

CASES = [
    # multiple choice: the gold answer is a letter, options are read from the Choices: block
    ("C", MC, True, "mc-letter"),
    ("(C)", MC, True, "mc-letter-in-parentheses"),
    ("C.", MC, True, "mc-letter-trailing-period"),
    ("c", MC, True, "mc-lowercase-letter"),
    ("<answer>C</answer>", MC, True, "mc-answer-block"),
    ("<reasoning>BC = √3</reasoning><answer>(B)</answer>", MC, False, "mc-answer-block-wrong-letter"),
    ("√{3}", MC, True, "mc-option-text"),
    ("$\\sqrt{3}$", MC, True, "mc-option-text-as-latex-value"),
    ("C:√{3}", MC, True, "mc-letter-and-option-text"),
    ("B:2√{3}", MC, False, "mc-judge-example-wrong-letter-and-text"),
    ("C: 2", MC, False, "mc-letter-with-another-options-text"),
    ("The answer is C.", MC, True, "mc-free-text-answer-phrase"),
    ("Angle BOC is 120°, so BC = √3.\nTherefore the length of BC is:\n\nC. √{3}", MC, True, "mc-free-text-last-line"),
    ("So BC = \\sqrt{3}, which is \\boxed{C}", MC, True, "mc-boxed-letter"),
    ("E", MC, False, "mc-letter-beyond-options"),
    ("B or C", MC, False, "mc-two-options"),
    ("null", MC, False, "mc-judge-example-null"),
    ("C", MC_VISION, True, "mc-vision-only-options-from-question-for-eval"),
    ("√{3}", MC_VISION, True, "mc-vision-only-option-text"),
    (None, MC, False, "no-generation"),
    ("", MC, False, "empty-response"),
    # free-form numbers: exact value; units, LaTeX, an equation's right side
    ("14", FREE, True, "number"),
    ("14 cm", FREE, True, "number-with-unit"),
    ("14.0", FREE, True, "number-trailing-zero"),
    ("$14$", FREE, True, "number-in-math-delimiters"),
    ("L = 14 cm", FREE, True, "equation-right-side"),
    ("L \\approx 14", FREE, True, "approximation-right-side"),
    ("<answer>14</answer>", FREE, True, "number-answer-block"),
    ("<answer>15</answer>", FREE, False, "wrong-number-answer-block"),
    ("L = √205 ≈ 14.32, rounded down the answer is 14.", FREE, True, "free-text-answer-phrase"),
    ("The longest straw is \\boxed{14} cm long.", FREE, True, "free-text-boxed"),
    ("14.3", FREE, False, "unrounded-number"),
    ("14 or 15", FREE, False, "two-numbers"),
    ("22.3", DECIMAL, True, "decimal"),
    ("22.30 m", DECIMAL, True, "decimal-trailing-zero-unit"),
    ("\\frac{223}{10}", DECIMAL, True, "decimal-as-fraction"),
    ("22.34", DECIMAL, False, "decimal-not-equal-no-tolerance"),
    # free-form text: normalised (spaces, case, delimiters) exact match
    ("f(x) = -x^2 - 2x + 1", EXPRESSION, True, "expression-spacing"),
    ("$F(x)=-x^2-2x+1$", EXPRESSION, True, "expression-case-and-delimiters"),
    ("f(x) = -(x+1)^2 + 2", EXPRESSION, False, "equivalent-expression-needs-the-gpt-judge"),
]


@pytest.mark.parametrize(("response", "row", "expected"), [case[:3] for case in CASES],
                         ids=[case[3] for case in CASES])
def test_the_scorer_follows_mathverse_rules(response, row, expected):
    assert score(response, row) is expected
    assert TEXT_LITE.score(response, row) is expected


def test_the_prompt_is_the_authors_query_wo():
    # output_templates/output_testmini.json, sample 3422 (Text Lite) and 3425 (Vision Only)
    assert prompt(FREE) == ("Please directly answer the question and provide the final value, e.g., 1, 2.5, 300.\n"
                            "Question: The radius is 3 cm. Find L.\n\nGive your answer rounded down to the nearest cm.")
    vision = _row("3425", "685", "Vision Only", "", "14", "free-form", STRAW)
    assert VISION_ONLY.prompt(vision) == ("According to the question shown in the image, please directly answer the "
                                          "question and provide the final value, e.g., 1, 2.5, 300.")


def test_the_options_are_read_from_the_question():
    assert choices(MC) == ["2", "2√{3}", "√{3}", "2√{2}"]
    assert choices(MC_VISION) == ["2", "2√{3}", "√{3}", "2√{2}"]  # question is empty: question_for_eval
    assert choices(FREE) == []


@pytest.mark.parametrize("benchmark", BENCHMARKS, ids=lambda b: b.name)
def test_keep_selects_the_benchmarks_problem_version(benchmark):
    version = {"mathverse-vision-only": "Vision Only", "mathverse-text-lite": "Text Lite"}[benchmark.name]
    rows = [_row(str(i), "1", v, "q", "1", "free-form", "q") for i, v in enumerate(
        ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"))]
    assert [row["problem_version"] for row in rows if benchmark.keep(row)] == [version]
    kept = [row for row in sample_rows(b"png")[benchmark.name] if benchmark.keep(row)]
    assert len(kept) == 3 and {row["question_type"] for row in kept} == {"multi-choice", "free-form"}


def test_the_benchmarks_are_registered_with_the_hub_coordinates():
    shipped = registry()
    for benchmark in BENCHMARKS:
        assert shipped[benchmark.name] is benchmark
        assert (benchmark.hub_id, benchmark.config, benchmark.split) == ("AI4Math/MathVerse", "testmini", "testmini")
        assert len(benchmark.revision) == 40 and benchmark.id_column == "sample_index"
        assert benchmark.breakdown == ("metadata.subject", "metadata.subfield", "question_type")


def test_the_output_file_has_the_authors_keys():
    template_keys = {"sample_index", "problem_index", "problem_version", "question", "image", "answer",
                     "question_type", "metadata", "query_wo", "query_cot", "model_answer"}
    rows = [MC, FREE]
    responses = ["<reasoning>…</reasoning><answer>C</answer>", None]
    out = official_output(rows, responses, [True, False])
    assert len(out) == 2
    for sample in out:
        # the template's keys, then what extract_answer_s1.py and score_answer_s2.py add
        assert template_keys | {"extraction", "judgement"} <= set(sample)
        assert sample["category"] == sample["metadata"]  # what score_answer_s2.py reads its breakdown from
    assert out[0]["model_answer"] == responses[0] and out[0]["extraction"] == "C" and out[0]["judgement"] == 1
    assert out[1]["model_answer"] == "" and out[1]["extraction"] == "" and out[1]["judgement"] == 0
    assert extraction("The answer is 14.") == "14."


def test_sample_rows_have_every_column():
    rows = sample_rows(b"\x89PNG")
    assert set(rows) == {b.name for b in BENCHMARKS}
    for benchmark_rows in rows.values():
        assert 3 <= len(benchmark_rows) <= 4
        for row in benchmark_rows:
            assert tuple(row) == COLUMNS and row["image"]["bytes"] == b"\x89PNG"
