"""DynaMath (DynaMath/DynaMath_Sample): 501 seed questions, each in 10 generated variants (5,010 rows).

The Hub stores one split per variant (`sample_variant1` … `sample_variant10`); the benchmark reads
all ten as one split (`sample_variant1+…+sample_variant10`), so the k-th row of a seed `id` is its
k-th variant. Breakdown: `subject`, `knowledge_level` and `answer_type`.

Prompt: the authors' (`evaluation/opensource_json_eval.py`): "## Question\\n", the question, for a
float answer "Please answer in a floating-point number.", then their answer instruction asking for a
JSON object with `solution` and `short answer`, and the JSON example.

Scorer: the authors' rules on the short answer. The short answer is the JSON's `short answer` (their
`preprocess` + `json.loads`), taken from the `<answer>` block when the response has one, else from the
whole response; a block that is not JSON is the short answer itself; a response with neither is read
by their fallback, its last line. Then, by `answer_type`:
- float: the number (units, thousands commas, fractions and LaTeX read by `pipeline.scoring.parse_number`,
  "2π" by their `transfer`) within 0.001 of the ground truth, as theirs;
- multiple choice: a single letter equal to the ground truth, or the ground truth among the first
  three characters ("(A)", "A. yes"); here that letter must stand alone ("Cannot …" is not C, which
  their `in answer[0:3]` pays), and markup ("Answer: B", `\\boxed{B}`) is stripped first;
- otherwise (text, int, single answer): the ground truth contained in the short answer, as theirs
  (case-insensitive here); where both are numbers, the values within 0.001 (their containment pays "15"
  for a gold 5).
Their JSON-less fallback cuts the last line's last character blindly ("5" becomes ""); here markup
and trailing punctuation are stripped instead. VLMEvalKit asks GPT-4o-mini to shorten an answer its
rules cannot parse; no judge here.

Composite metrics (`composite`): the authors' average-case accuracy (all rows) and worst-case
accuracy (the share of seed questions whose every variant present is right), and the reasoning
robustness worst / average.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from pipeline.answer_format import extract_answer
from pipeline.benchmarks import Benchmark, Row
from pipeline.scoring import normalise_text, parse_number, strip_markup

VARIANTS = 10
TOLERANCE = 0.001  # their |prediction - ground truth| <= 0.001
GUIDE = (
    "\n## Answer Instruction Please provide an answer to the question outlined above. Your response should adhere \n"
    "to the following JSON format, which includes two keys: 'solution' and 'short answer'. The 'solution' key can "
    "contain \ndetailed steps needed to solve the question, and the 'short answer' key should provide a concise "
    "response. If the problem is a multiple choice problem, just provide the corresponing choice option, \n"
    "such as 'A', 'B', 'C', or 'D'. If the answer is a numerical value, format it as a three-digit floating-point "
    "number.\n\nExample of expected JSON response format:\n\n"
)
EXAMPLE = json.dumps({"solution": "[Detailed step-by-step explanation]", "short answer": "[Concise Answer]"}, indent=4)
FLOAT_HINT = "Please answer in a floating-point number."
_CHOICE_RE = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)\s]|$)")


def prompt(row: Row) -> str:
    text = "## Question\n" + str(row["question"])
    if row.get("answer_type") == "float":
        text += FLOAT_HINT
    return text + GUIDE + EXAMPLE


def _json_short_answer(text: str) -> str | None:
    """Their `preprocess` (from the first "{" to the last "}", backslashes removed) and `json.loads`."""
    start, end = text.find("{"), text.rfind("}")
    if not 0 <= start < end:
        return None
    try:
        parsed = json.loads(text[start:end + 1].replace("\\", ""), strict=False)
    except ValueError:
        return None
    short = parsed.get("short answer") if isinstance(parsed, dict) else None
    return None if short is None else str(short)


def short_answer(response: str | None) -> str | None:
    """The short answer a response gives (see the module's docstring), or None."""
    if not response or not response.strip():
        return None
    block = extract_answer(response)
    text = block if block is not None else response
    short = _json_short_answer(text)
    if short is not None:
        return short.strip()
    if block is not None:
        return block
    lines = [line for line in response.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _transfer(text: str) -> float | None:
    """Their `transfer`: the first word as a float, "kπ" as k·π."""
    word = text.strip().split(" ")[0] if text.strip() else ""
    try:
        if "\u03c0" in word:
            head = word.split("\u03c0")[0]
            return (float(head) if head else 1.0) * math.pi
        return float(word)
    except ValueError:
        return None


def _number(text: str) -> float | None:
    value = parse_number(text)
    if value is not None:
        return float(value)
    return _transfer(strip_markup(text))


def _gold_number(gold: str) -> float | None:
    try:
        value = float(gold)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def score(response: str | None, row: Row) -> bool:
    short = short_answer(response)
    gold = str(row.get("ground_truth") if row.get("ground_truth") is not None else row.get("answer") or "").strip()
    if short is None or not short.strip() or not gold:
        return False
    answer_type = row.get("answer_type")
    if answer_type == "float":
        predicted, expected = _number(short), _gold_number(gold)
        return predicted is not None and expected is not None and abs(predicted - expected) <= TOLERANCE
    if answer_type == "multiple choice":
        letter = _CHOICE_RE.match(strip_markup(short))
        return bool(letter) and letter.group(1).upper() == gold.upper()
    expected = _gold_number(gold)
    if expected is not None:
        value = parse_number(short)
        if value is not None:
            return abs(float(value) - expected) <= TOLERANCE
    return normalise_text(gold) in normalise_text(short)


def composite(rows: Sequence[Row], verdicts: Sequence[bool]) -> dict[str, float]:
    """DynaMath's metrics: average-case accuracy (every row, every variant), worst-case accuracy (the
    share of seed questions, by `id`, all of whose variants present are right) and reasoning robustness
    (worst / average, 0 when the average is 0). Fractions, 4 places; `seeds` counts the seed questions."""
    by_seed: dict[str, list[bool]] = {}
    for row, verdict in zip(rows, verdicts, strict=True):
        by_seed.setdefault(str(row.get("id")), []).append(bool(verdict))
    if not by_seed:
        return {"seeds": 0}
    average = sum(map(bool, verdicts)) / len(verdicts)
    worst = sum(all(hits) for hits in by_seed.values()) / len(by_seed)
    return {"seeds": len(by_seed), "average_case_accuracy": round(average, 4),
            "worst_case_accuracy": round(worst, 4),
            "reasoning_robustness": round(worst / average, 4) if average else 0.0}


def official_output(rows, responses, verdicts) -> dict:
    """The authors' report files, one per variant (`variant<k>`), each keyed by the seed `id`:
    question, subject, knowledge level, Ground truth, image, response (the parsed JSON, or the
    short answer), result ("correct" / "fail")."""
    out: dict[str, dict] = {}
    seen: dict[str, int] = {}
    for row, response, verdict in zip(rows, responses, verdicts, strict=True):
        seed = str(row.get("id"))
        seen[seed] = seen.get(seed, 0) + 1
        short = short_answer(response)
        out.setdefault(f"variant{seen[seed]}", {})[seed] = {
            "question": row.get("question"), "subject": row.get("subject"),
            "knowledge level": row.get("knowledge_level"), "Ground truth": row.get("ground_truth"),
            "image": row.get("image"), "response": {"solution": response or "", "short answer": short},
            "result": "correct" if verdict else "fail"}
    return out


BENCHMARKS = [
    Benchmark(
        name="dynamath", hub_id="DynaMath/DynaMath_Sample", revision="172ee11086d0d2165517a2e92c9bde8bba4b7945",
        split="+".join(f"sample_variant{k}" for k in range(1, VARIANTS + 1)), id_column="id",
        image_column="decoded_image", prompt=prompt, score=score,
        breakdown=("subject", "knowledge_level", "answer_type"), official_output=official_output,
        output_file="dynamath_report.json", composite=composite,
        notes="revision 172ee110 (the last commit touching data/: every variant's parquet; main's "
              "later commits touch nothing under data/). Rule-based short-answer extraction; no GPT "
              "fallback for answers its rules cannot parse. Worst case over the variants present "
              "(all 10 on the full set).",
    ),
]

