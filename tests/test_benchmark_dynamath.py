"""DynaMath: the authors' prompt, their answer rules (JSON short answer, float within 0.001, choice
letter, text containment) on hand-made answers, average- and worst-case accuracy on hand-made verdicts,
their report keys, rows in the Hub's schema."""

from __future__ import annotations

import json

import pytest

from pipeline.benchmarks import dynamath

MC = {"id": "2", "question": "Is this a periodic function? Choices: (A) Yes (B) No", "ground_truth": "A",
      "answer_type": "multiple choice"}
FLOAT = {"id": "1", "question": "What is the period of this function? Answer the question with a floating-point "
         "number.", "ground_truth": "2.0944", "answer_type": "float"}
TEXT = {"id": "3", "question": "Which month is the hottest on average in Cape Town?", "ground_truth": "May",
        "answer_type": "text"}
INT = {"id": "4", "question": "What is the sum of all elements in the matrix A?",
       "ground_truth": "-15.700000000000001", "answer_type": "int"}


def _json(short: str) -> str:
    return json.dumps({"solution": "Step by step.", "short answer": short}, indent=4)


def sample_rows(image_png: bytes) -> dict[str, list[dict]]:
    """Rows in DynaMath/DynaMath_Sample's schema (every column; `decoded_image` an Image feature): two
    variants of a float seed question, a multiple-choice one, a text one."""
    rows = [
        {**FLOAT, "image": "image/variant1/image1.png", "subject": "analytic geometry",
         "knowledge_level": "high school"},
        {**FLOAT, "ground_truth": "3.1416", "image": "image/variant2/image1.png", "subject": "analytic geometry",
         "knowledge_level": "high school"},
        {**MC, "image": "image/variant1/image2.png", "subject": "analytic geometry", "knowledge_level": "high school"},
        {**TEXT, "image": "image/variant1/image3.png", "subject": "statistics", "knowledge_level": "elementary school"},
    ]
    return {"dynamath": [dict(row, decoded_image={"bytes": image_png, "path": row["image"].split("/")[-1]})
                         for row in rows]}


@pytest.mark.parametrize(("response", "row", "expected"), [
    # the JSON the prompt asks for, bare or inside the answer block
    pytest.param(_json("2.094"), FLOAT, True, id="json-float-within-0.001"),
    pytest.param(_json("2.096"), FLOAT, False, id="json-float-outside-0.001"),
    pytest.param(f"<reasoning>x</reasoning><answer>{_json('2.0944')}</answer>", FLOAT, True, id="json-in-block"),
    pytest.param("<answer>2.094</answer>", FLOAT, True, id="block-float"),
    pytest.param("<answer>2.094 units</answer>", FLOAT, True, id="float-with-unit"),
    pytest.param("<answer>\\frac{2}{3}π</answer>", FLOAT, True, id="latex-fraction-times-pi"),
    pytest.param("<answer>\\frac{2}{3}</answer>", FLOAT, False, id="latex-fraction-without-pi"),
    pytest.param("<answer>0.667π</answer>", FLOAT, False, id="pi-product-off-by-more-than-0.001"),
    pytest.param("<answer>0.6667π</answer>", FLOAT, True, id="pi-product-their-transfer"),
    pytest.param("<answer>\\boxed{2.094}</answer>", FLOAT, True, id="boxed-float"),
    pytest.param("<answer>about two</answer>", FLOAT, False, id="float-not-a-number"),
    pytest.param(_json("A"), MC, True, id="json-letter"),
    pytest.param(_json("(A)"), MC, True, id="json-parenthesised-letter"),
    pytest.param(_json("A. Yes"), MC, True, id="letter-with-option-text"),
    pytest.param("<answer>a</answer>", MC, True, id="lowercase-letter"),
    pytest.param("<answer>B</answer>", MC, False, id="wrong-letter"),
    pytest.param("<answer>Yes</answer>", MC, False, id="option-text-alone-is-not-their-rule"),
    pytest.param("<answer>Answer: A</answer>", MC, True, id="answer-prefix"),
    pytest.param("<answer>Cannot tell</answer>", {**MC, "ground_truth": "C"}, False, id="word-starting-with-letter"),
    pytest.param(_json("May"), TEXT, True, id="text-exact"),
    pytest.param(_json("May is the hottest"), TEXT, True, id="text-contained"),
    pytest.param("<answer>may</answer>", TEXT, True, id="text-case-insensitive"),
    pytest.param(_json("June"), TEXT, False, id="text-wrong"),
    pytest.param(_json("-15.7"), INT, True, id="int-by-value"),
    pytest.param(_json("-15"), INT, False, id="int-wrong-value"),
    pytest.param("The period is 2π/3, so about 2.094.\n2.094", FLOAT, True, id="free-text-last-line"),
    pytest.param("", FLOAT, False, id="empty"),
    pytest.param(None, MC, False, id="no-generation"),
])
def test_the_scorer_follows_the_authors_rules(response, row, expected):
    assert dynamath.score(response, row) is expected


def test_the_prompt_is_the_authors():
    expected = (
        "## Question\nWhat is the period of this function? Answer the question with a floating-point number."
        "Please answer in a floating-point number.\n"
        "## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere \n"
        "to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key "
        "can contain \ndetailed steps needed to solve the question, and the 'short answer' key should provide a "
        "concise response. If the problem is a multiple choice problem, just provide the corresponing choice "
        "option, \nsuch as 'A', 'B', 'C', or 'D'. If the answer is a numerical value, format it as a three-digit "
        "floating-point number.\n\nExample of expected JSON response format:\n\n"
        '{\n    "solution": "[Detailed step-by-step explanation]",\n    "short answer": "[Concise Answer]"\n}')
    assert dynamath.prompt(FLOAT) == expected
    assert dynamath.prompt(MC).startswith("## Question\nIs this a periodic function? Choices: (A) Yes (B) No\n##")


def test_average_and_worst_case_accuracy():
    # seed 1: 10 variants, 9 right; seed 2: 10 variants, all right; seed 3: 10 variants, none right
    rows = [{"id": seed} for seed in ("1", "2", "3") for _ in range(10)]
    verdicts = [k != 4 for k in range(10)] + [True] * 10 + [False] * 10
    metrics = dynamath.composite(rows, verdicts)
    assert metrics == {"seeds": 3, "average_case_accuracy": round(19 / 30, 4), "worst_case_accuracy": round(1 / 3, 4),
                       "reasoning_robustness": round((1 / 3) / (19 / 30), 4)}
    assert dynamath.composite([{"id": "1"}], [False])["reasoning_robustness"] == 0.0


def test_the_official_output_is_the_authors_report_per_variant():
    rows = [{k: v for k, v in row.items() if k != "decoded_image"} for row in sample_rows(b"png")["dynamath"]]
    responses = [_json("2.094"), _json("1"), _json("A"), _json("May")]
    out = dynamath.official_output(rows, responses, [True, False, True, True])
    assert set(out) == {"variant1", "variant2"} and set(out["variant1"]) == {"1", "2", "3"}
    record = out["variant2"]["1"]
    assert set(record) == {"question", "subject", "knowledge level", "Ground truth", "image", "response", "result"}
    assert record["result"] == "fail" and record["Ground truth"] == "3.1416"
    assert record["response"]["short answer"] == "1"


def test_the_sample_rows_are_complete_and_scored():
    rows = sample_rows(b"png")["dynamath"]
    assert all(set(row) == set(rows[0]) for row in rows) and len(rows[0]) == 8
    assert all(dynamath.score(_json(row["ground_truth"]), row) for row in rows)
    [benchmark] = dynamath.BENCHMARKS
    assert benchmark.image_column in rows[0] and benchmark.id_column in rows[0]
    assert benchmark.split == "+".join(f"sample_variant{k}" for k in range(1, 11))
