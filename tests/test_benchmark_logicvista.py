"""LogicVista: the prompt (the question as stored), the exact-set comparison of the authors'
`extract_accuracy.py` with a rule-based choice extraction, their results keys, rows in the Hub's schema."""

from __future__ import annotations

import pytest

from pipeline.benchmarks import logicvista


def _row(answer: str = "C", **extra) -> dict:
    return {"id": "v1_0", "question": "What choice (A, B, C, or D) should be in place of the question mark that "
            "fits the pattern?", "answer": answer, **extra}


def sample_rows(image_png: bytes) -> dict[str, list[dict]]:
    """Rows in lscpku/LogicVista's `test` schema (every column; `image` an Image feature)."""
    common = {"imagesource": "aptitudetests", "sourcelink": "https://www.aptitudetests.org/logical-reasoning-test/",
              "liscenced": "false"}
    rows = [
        {"id": "v1_0", "question": "What choice (A, B, C, or D) should be in place of the question mark that fits "
         "the pattern?", "answer": "C", "reasoning": "The square moves one square each time.",
         "skill": ["inductive"], "broad_capability": ["diagram"], "specific_capability": ["sequence pattern"]},
        {"id": "v1_1", "question": "Which choices in the image (A-D) belong to the green category?",
         "answer": "A, C", "reasoning": "The green category diagrams all have an X in their center.",
         "skill": ["inductive"], "broad_capability": ["diagram"], "specific_capability": ["rule based pattern"]},
        {"id": "v1_20", "question": "Which is the correct answer according to the image? Select from 1-5",
         "answer": "3", "reasoning": "Each row adds one line.", "skill": ["numerical"],
         "broad_capability": ["diagram and ocr"], "specific_capability": ["math"]},
    ]
    return {"logicvista": [dict(row, **common, image={"bytes": image_png, "path": f"{row['id']}.png"})
                           for row in rows]}


@pytest.mark.parametrize(("response", "row", "expected"), [
    pytest.param("<answer>C</answer>", _row(), True, id="letter"),
    pytest.param("<answer>(C)</answer>", _row(), True, id="parenthesised"),
    pytest.param("<answer>c</answer>", _row(), True, id="lowercase"),
    pytest.param("<answer>\\boxed{C}</answer>", _row(), True, id="boxed"),
    pytest.param("<answer>Answer: C.</answer>", _row(), True, id="answer-prefix"),
    pytest.param("<answer>D</answer>", _row(), False, id="wrong-letter"),
    pytest.param("<answer>A, C</answer>", _row("A, C"), True, id="two-letters"),
    pytest.param("<answer>C, A</answer>", _row("A, C"), True, id="two-letters-any-order"),
    pytest.param("<answer>A and C</answer>", _row("A, C"), True, id="two-letters-and"),
    pytest.param("<answer>(A) (C)</answer>", _row("A, C"), True, id="two-letters-parenthesised"),
    pytest.param("<answer>A</answer>", _row("A, C"), False, id="one-of-two-letters"),
    pytest.param("<answer>A, B, C</answer>", _row("A, C"), False, id="one-letter-too-many"),
    pytest.param("<answer>A, C</answer>", _row(), False, id="extra-letter-for-one-gold"),
    pytest.param("<answer>3</answer>", _row("3"), True, id="number-choice"),
    pytest.param("<answer>G</answer>", _row("G"), True, id="letter-beyond-e"),
    pytest.param("The square moves right each time, so the answer is C.", _row(), True, id="free-text-answer-is"),
    pytest.param("Options B and D complete the diagram. So the answers are B and D.", _row("B, D"), True,
                 id="free-text-answers-are"),
    pytest.param("I think it is the third figure.", _row(), False, id="free-text-names-no-letter"),
    pytest.param("The answer is Because", _row("B"), False, id="a-word-is-not-a-letter"),
    pytest.param("", _row(), False, id="empty"),
    pytest.param(None, _row(), False, id="no-generation"),
    pytest.param("", _row(""), False, id="empty-gold-is-never-right"),
])
def test_the_scorer_compares_choice_sets_as_the_authors(response, row, expected):
    assert logicvista.score(response, row) is expected


def test_the_prompt_is_the_question_as_stored():
    assert logicvista.prompt(_row()) == ("What choice (A, B, C, or D) should be in place of the question mark that "
                                         "fits the pattern?")


def test_the_official_output_has_the_authors_columns():
    row = {k: v for k, v in sample_rows(b"png")["logicvista"][1].items() if k != "image"}
    [record] = logicvista.official_output([row], ["<answer>C, A</answer>"], [True])
    assert set(record) == {"id", "reasoning skill", "capability", "true answer", "MLLM answer extracted",
                           "MLLM answer raw", "match?"}
    assert record["true answer"] == ["a", "c"] and record["MLLM answer extracted"] == ["a", "c"]
    assert record["match?"] == 1 and record["reasoning skill"] == ["inductive"]
    [missed] = logicvista.official_output([row], ["no idea"], [False])
    assert missed["MLLM answer extracted"] == ["zzzzz"] and missed["match?"] == 0


def test_the_sample_rows_are_complete_and_scored():
    rows = sample_rows(b"png")["logicvista"]
    assert all(set(row) == set(rows[0]) for row in rows) and len(rows[0]) == 11
    assert all(logicvista.score(f"<answer>{row['answer']}</answer>", row) for row in rows)
    [benchmark] = logicvista.BENCHMARKS
    assert benchmark.image_column in rows[0] and benchmark.id_column in rows[0]
    assert set(benchmark.breakdown) <= set(rows[0])
