"""We-Math: the authors' prompt, their option-letter matching on hand-made answers, their
four-dimensional metrics on hand-made verdicts, their output keys, and rows in the Hub's schema."""

from __future__ import annotations

import pytest

from pipeline.benchmarks import wemath

OPTION = "A. 300, 400;B. 400, 300;C. 3000, 4000;D. 4000, 3000; E. No correct answer"


def _row(answer: str = "C", option: str = OPTION, **extra) -> dict:
    return {"ID": "2steps_1", "split": "testmini", "knowledge concept": "Conversion Rates and Calculations Between "
            "Length Units", "question": "According to the diagram and the length information provided: OA = ( ) m, "
            "AB = ( ) m", "option": option, "answer": answer, "key": "2steps_1", "question number": 1,
            "knowledge concept description": "Conversion Rates …", **extra}


def sample_rows(image_png: bytes) -> dict[str, list[dict]]:
    """Rows in We-Math/We-Math's testmini schema (every column; `image_path` an Image feature): one
    two-step problem, its two sub-problems and the composite one."""
    description = ("Conversion Rates and Calculations Between Length Units:\n1. Conversion Rates between Length "
                   "Units: 1 kilometer (km) = 1000 meters (m)")
    base = {"split": "testmini", "knowledge concept": "Conversion Rates and Calculations Between Length Units",
            "knowledge concept description": description}
    rows = [
        {"ID": "2steps_1", **base, "question": "According to the diagram and the length information provided: "
         "OA = ( ) m, AB = ( ) m", "option": OPTION, "answer": "C", "key": "2steps_1", "question number": 1},
        {"ID": "2steps_1", **base, "question": "How long is OA in kilometres?",
         "option": "A. 3;B. 30;C. 0.3;D. 300; E. No correct answer", "answer": "A", "key": "2steps_2",
         "question number": 361},
        {"ID": "2steps_1", **base, "question": "What is the total distance OB in metres?",
         "option": "A. 700;B. 7000;C. 70;D. 70000; E. No correct answer", "answer": "B", "key": "2steps_multi",
         "question number": 721},
    ]
    return {"wemath-testmini": [dict(row, image_path={"bytes": image_png, "path": f"2steps/image/1-{i}.png"})
                                for i, row in zip(("1", "2", "multi"), rows, strict=True)]}


@pytest.mark.parametrize(("response", "row", "expected"), [
    # the authors' template: the text after the last "Answer", `<>:.` dropped, its first letter
    pytest.param("<Thought process>: <<3 km is 3000 m>> <Answer>: <<C>>", _row(), True, id="template"),
    pytest.param("<Thought process>: <<...>> <Answer>: <C. 3000, 4000>", _row(), True, id="template-letter-text"),
    pytest.param("<Thought process>: <<...>> <Answer>: <<D>>", _row(), False, id="template-wrong-letter"),
    pytest.param("<reasoning>3 km</reasoning><answer>C</answer>", _row(), True, id="answer-block-letter"),
    pytest.param("<reasoning>x</reasoning><answer>(C)</answer>", _row(), True, id="answer-block-parenthesised"),
    pytest.param("<answer>c</answer>", _row(), True, id="lowercase-letter"),
    pytest.param("<answer>C.</answer>", _row(), True, id="letter-with-dot"),
    pytest.param("<answer>3000, 4000</answer>", _row(), True, id="option-text"),
    pytest.param("<answer>4000, 3000</answer>", _row(), False, id="other-option-text"),
    pytest.param("<answer>No correct answer</answer>", _row("E"), True, id="option-e-by-text"),
    pytest.param("Answer: C", _row(), True, id="free-text-answer-colon"),
    pytest.param("The lengths are 3000 m and 4000 m.\nAnswer: C", _row(), True, id="free-text-last-answer"),
    pytest.param("Because 1 km is 1000 m, OA is 3000 m.", _row(), False, id="first-char-is-not-a-letter-choice"),
    pytest.param("C", _row(), True, id="bare-letter"),
    pytest.param("<answer>A or C</answer>", _row(), False, id="two-letters"),
    pytest.param("<answer></answer>", _row(), False, id="empty-block"),
    pytest.param(None, _row(), False, id="no-generation"),
    pytest.param("<answer>F</answer>", _row("F", option="A. ①, ③, ④ ; B. ②; C. ①, ③; D. ④; E. ①; "
                                             "F. Cannot be determined; G. No correct answer"), True, id="letter-f"),
    pytest.param("<answer>①, ③</answer>", _row("C", option="A. ①, ③, ④ ; B. ②; C. ①, ③; D. ④; E. ①; "
                                              "F. Cannot be determined; G. No correct answer"), True,
                 id="circled-option-text"),
])
def test_the_scorer_follows_the_authors_matching(response, row, expected):
    assert wemath.score(response, row) is expected


def test_the_prompt_is_the_authors_template():
    row = _row()
    assert wemath.prompt(row) == (
        "Now, we require you to solve a multiple-choice math question.\n"
        "Please briefly describe your thought process and provide the final answer(option).\n"
        "Question: According to the diagram and the length information provided: OA = ( ) m, AB = ( ) m\n"
        "Option: A. 300, 400;B. 400, 300;C. 3000, 4000;D. 4000, 3000; E. No correct answer\n"
        "Regarding the format, please answer following the template below, and be sure to include two <> symbols:\n"
        "<Thought process>: <<your thought process>> <Answer>: <<your option>>")


def _group(steps: int, ident: int, parts: list[bool], multi: bool) -> list[tuple[dict, bool]]:
    rows = [({"ID": f"{steps}steps_{ident}", "key": f"{steps}steps_{i}"}, verdict)
            for i, verdict in enumerate(parts, start=1)]
    return rows + [({"ID": f"{steps}steps_{ident}", "key": f"{steps}steps_multi"}, multi)]


def test_the_four_dimensional_metrics_are_the_authors():
    pairs = (_group(2, 1, [True, True], True)        # CM strict and loose
             + _group(2, 2, [True, False], True)     # RM strict, CM loose
             + _group(2, 3, [True, True], False)     # IG
             + _group(2, 4, [False, False], True)    # RM strict and loose
             + _group(3, 1, [False, True, True], False)  # IK
             + _group(3, 2, [True, True, True], True)    # CM strict and loose
             + [({"ID": "3steps_3", "key": "3steps_1"}, True)])  # incomplete: left out
    rows, verdicts = [r for r, _ in pairs], [v for _, v in pairs]
    metrics = wemath.composite(rows, verdicts)
    # n = 6; IK 1, IG 1; strict: CM 2, RM 2; loose: CM 3, RM 1
    assert metrics["groups"] == 6
    assert metrics["IK_strict"] == metrics["IK_loose"] == round(1 / 6, 4)
    assert metrics["IG_strict"] == metrics["IG_loose"] == round(1 / 6, 4)
    assert metrics["CM_strict"] == round(2 / 6, 4) and metrics["CM_loose"] == 0.5
    assert metrics["RM_strict"] == 0.5 and metrics["RM_loose"] == 0.25  # RM / (CM + RM)
    assert metrics["score_strict"] == round((6 - 0.5 - 2 - 1) / 6, 4)
    assert metrics["score_loose"] == round((6 - 0.5 - 1 - 1) / 6, 4)
    # S1: sub-problems 2+1+2+0+2+3 = 10 of 2+2+2+2+3+3 = 14 right; S2: 3 of 4 composites; S3: 1 of 2
    assert metrics["S1"] == round(10 / 14, 4) and metrics["S2"] == 0.75 and metrics["S3"] == 0.5


def test_no_complete_group_gives_no_rates():
    assert wemath.composite([{"ID": "2steps_1", "key": "2steps_1"}], [True]) == {"groups": 0}


def test_the_official_output_has_the_authors_keys():
    row = {k: v for k, v in sample_rows(b"png")["wemath-testmini"][2].items() if k != "image_path"}
    [record] = wemath.official_output([row], ["<Answer>: <B>"], [True])
    assert set(record) >= {"ID", "split", "knowledge concept", "question", "option", "answer", "image_path", "key",
                           "question number", "knowledge concept description", "response"}
    assert record["image_path"] == "2steps/image/1-multi.png" and record["response"] == "<Answer>: <B>"
    assert record["extraction"] == "B" and record["joker"] is True


def test_the_sample_rows_are_complete_and_scored():
    rows = sample_rows(b"png")["wemath-testmini"]
    assert all(set(row) == set(rows[0]) for row in rows) and len(rows[0]) == 10
    assert all(wemath.score(f"<answer>{row['answer']}</answer>", row) for row in rows)
    [benchmark] = wemath.BENCHMARKS
    assert benchmark.image_column in rows[0] and benchmark.id_column in rows[0]
