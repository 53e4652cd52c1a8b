"""MATH-Vision (MathLLMs/MathVision): 3,040 competition problems with diagrams, 16 subjects, 5 levels.

Data: the Hub dataset `MathLLMs/MathVision` (default config), splits `test` (3,040 rows) and
`testmini` (304). Columns: id, question (with `<image1>` placeholders), options (five texts, or
[] for free-form; ["A", "B", "C", "D", "E"] when the options are drawn in the image), image (the
file's path), decoded_image (Image), answer (a letter for multiple choice), solution, level (1-5),
subject.

Prompt: the one mathllm/MATH-V's generation scripts send for their CoT runs (models/GPT4.py and
models/Qwen-VL.py `geninput`): "Please solve the problem step by step and put your answer in one
"\\boxed{}". If it is a multiple choice question, only one letter is allowed in the "\\boxed{}"."
then the question and, unless the options are just the letters A-E, "(A) …" to "(E) …", one a line.

Scorer: MATH-V's evaluation/evaluate.py is rule-based, and is restated here: the model answer is
taken from the response (a trailing " C." or "(C).", or a leading "C\\n", is the letter; else the
number after the last "is "; else what follows "the (final|correct) answer is"/"the answer should
be", to the end of its line and sentence; else the last `\\boxed{}`), cleaned as its
`find_math_answer` cleans it (lower case; the value after the last "=" or "\\approx"; no spaces,
`\\text`, `\\left`/`\\right`, degrees, "km", "m^3", "units", `$`, `\\%`), and it is right when it
equals the gold answer or the gold option's text: the same string, or tuples/values equal after
rounding to 2 decimals. The response's `<answer>` block, when there is one, is what this reads
(the run's format); without one, the whole response, as MATH-V does. Differences: value
equivalence goes through pipeline.scoring (`\\frac`, `\\sqrt`, `\\pi` through math-verify) instead
of latex2sympy + eval, and a trailing unit word ("12 cm") is accepted where latex2sympy reads
"12cm" as 12·c·m and fails; rounding is half-up on exact decimals (Python's round on floats in
MATH-V). Published MATH-V numbers (the leaderboard, Qwen's reports) are mostly test-split accuracy;
VLMEvalKit's MathVision uses a GPT extractor, so its numbers can differ from this rule-based score.

Breakdown: subject and level, as math_level_subject_acc reports. Output: MATH-V's outputs/*.jsonl
records (id, response, model_answer, correct) as a JSON list (one element per jsonl line).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.benchmarks import Benchmark, Row, answer_text
from pipeline.scoring import MAX_ANSWER_CHARS, numbers_match, parse_number

HUB_ID = "MathLLMs/MathVision"
# a commit of MathLLMs/MathVision (README update of Jun 2024; its data files are the Feb 2024 upload),
# read from the Hub's commit pages in the docs corpus; the Hub itself could not be reached to confirm it
REVISION = "0c681f39d3dacd336abf62ceb833e40320c8599f"
COLUMNS = ("id", "question", "options", "image", "decoded_image", "answer", "solution", "level", "subject")
INSTRUCTION = ('Please solve the problem step by step and put your answer in one "\\boxed{}". '
               'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".\n')
_FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")
_LETTERS = "ABCDE"


def options_of(row: Row) -> list[str]:
    value = row.get("options")
    if value is None or isinstance(value, (str, bytes)):
        return []
    return [str(option) for option in value]


def prompt(row: Row) -> str:
    options = options_of(row)
    block = ""
    if options and "".join(options) != "ABCDE":
        block = "".join(f"({chr(ord('A') + i)}) {option}\n" for i, option in enumerate(options))
    return f"{INSTRUCTION}{row['question']}\n{block}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _find_math_answer(text: str) -> str:
    """MATH-V's find_math_answer: the boxed value, after its last "=", cleaned of LaTeX and units."""
    text = text.lower().replace("{}", "")
    boxed = re.findall(r"oxed\{(.*)\}", text, flags=re.S)
    answer = boxed[-1] if boxed else text
    if "}" in answer and ("{" not in answer or answer.find("}") < answer.find("{")):
        answer = answer.split("}")[0]
    answer = answer.split("=")[-1].split("\\approx")[-1]
    for old, new in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
                     ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""),
                     ("units", ""), ("{km}", ""), ("km", ""), ("\\!", ""), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\$", ""), ("$", ""), ("\\%", "")):
        answer = answer.replace(old, new)
    answer = answer.split("\\text{ ")[0]
    if answer.startswith("."):
        answer = "0" + answer
    return answer.replace("{.", "{0.")


def model_answer(response: str | None) -> str:
    """The answer MATH-V's evaluate.py takes out of a response (its `model_answer`)."""
    text = (answer_text(response) or "").strip()
    for c in _LETTERS:
        if (text.endswith(f" {c}.") or text.endswith(f" ({c}).") or text.startswith(f"{c}\n")
                or text.startswith(f"({c})\n") or text.startswith(f"({c}) {c}\n")):
            text = c
    tail = text.split("is ")[-1].rstrip(".")
    if _is_number(tail):
        text = tail
    if "oxed{" not in text:
        for flag in _FLAGS:
            for spelled in (flag, flag.replace("the", "The")):
                found = spelled in text
                text = text.split(spelled)[-1].strip()
                if found:
                    text = text.split("\n")[0].split(". ")[0]
    elif text.count("oxed{") > 1:
        text = "\\boxed{" + text.split("oxed{")[-1]
    answer = _find_math_answer(text)
    for c in "abcde":
        answer = answer.replace(f"({c})", c).replace(f"{{{c}}}", c)
    return answer.rstrip(".").lstrip(":").strip()


def _tuple_items(text: str) -> list[str] | None:
    if len(text) > 2 and text[0] + text[-1] in ("()", "[]"):
        items = text[1:-1].split(",")
        return items if len(items) > 1 else None
    return None


def _values_equal(a: str, b: str) -> bool:
    value_a, value_b = parse_number(a), parse_number(b)
    return value_a is not None and value_b is not None and numbers_match(value_a, value_b, "float", 2)


def is_equal(answer: str, gold: str) -> bool:
    """MATH-V's is_equal: the same text (case-insensitive), the same tuple, or the same value to 2 decimals."""
    answer, gold = answer.lower(), gold.lower()
    if not answer.replace(" ", "") or not gold.replace(" ", "") or len(answer) > MAX_ANSWER_CHARS:
        return False
    if answer.strip() == gold.strip():
        return True
    items, gold_items = _tuple_items(answer.strip()), _tuple_items(gold.strip())
    if items is not None or gold_items is not None:
        if items is None or gold_items is None or len(items) != len(gold_items) or answer[0] != gold[0]:
            return False
        return all(x.strip() == y.strip() or _values_equal(x, y) for x, y in zip(items, gold_items, strict=True))
    return _values_equal(answer, gold)


def judge(extracted: str, row: Row) -> bool:
    gold = str(row.get("answer") or "").strip()
    options = options_of(row)
    gold_value = ""
    if options and len(gold) == 1 and 0 <= ord(gold.upper()) - ord("A") < len(options):
        gold_value = options[ord(gold.upper()) - ord("A")]
    return is_equal(extracted, gold) or is_equal(extracted, gold_value)


def score(response: str | None, row: Row) -> bool:
    try:
        return judge(model_answer(response), row)
    except Exception:  # noqa: BLE001 - a scorer never stops an evaluation for one odd answer
        return False


def official_output(rows: Sequence[Row], responses: Sequence[str | None],
                    verdicts: Sequence[bool]) -> list[dict[str, Any]]:
    """MATH-V's outputs/*.jsonl records after evaluate.py: id, response, model_answer, correct."""
    return [{"id": str(row["id"]), "response": response or "", "model_answer": model_answer(response),
             "correct": bool(verdict)}
            for row, response, verdict in zip(rows, responses, verdicts, strict=True)]


_NOTES = (
    "revision: 0c681f39d3dacd336abf62ceb833e40320c8599f, a MathLLMs/MathVision commit read from the Hub's "
    "commit pages (not confirmed against the Hub from here). Rule-based like the official evaluate.py; value "
    "equivalence via pipeline.scoring instead of latex2sympy, and a trailing unit word is accepted. "
    "VLMEvalKit's MathVision numbers use a GPT extractor.")

BENCHMARKS = [
    Benchmark(
        name=f"mathvision-{split}", hub_id=HUB_ID, revision=REVISION, split=split, id_column="id",
        image_column="decoded_image", prompt=prompt, score=score, breakdown=("subject", "level"),
        official_output=official_output, output_file=f"mathvision_{split}_outputs.json", notes=_NOTES,
    )
    for split in ("testmini", "test")
]
