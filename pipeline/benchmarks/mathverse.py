"""MathVerse testmini (AI4Math/MathVerse): 788 problems, each in five versions; two are shipped here.

Data: the Hub dataset `AI4Math/MathVerse`, config `testmini`, split `testmini` (3,940 rows: 788
problems x Text Dominant, Text Lite, Vision Intensive, Vision Dominant, Vision Only). Columns:
sample_index, problem_index, problem_version, question, image (Image), answer, question_type
("multi-choice" | "free-form"), metadata {split, source, subject, subfield}, query_wo, query_cot,
question_for_eval (the problem's full text, also for Vision Only rows whose `question` is empty).
`mathverse-vision-only` keeps the "Vision Only" rows (the whole problem is in the diagram),
`mathverse-text-lite` the "Text Lite" rows (the question keeps only what the diagram cannot show).

Prompt: the row's `query_wo`. The authors' README (ZrrSkywalker/MathVerse) takes the "w/o" score
(no CoT evaluation) as the leaderboard's primary metric and says to send `query_wo` for it;
`query_cot` is for their CoT-E score (GPT-4 step scoring, not released). The run's system prompt
still asks for the `<reasoning>`/`<answer>` format the adapter is trained to.

Scorer: the official pipeline is two GPT calls (evaluation/extract_answer_s1.py pulls the answer out
of the response, score_answer_s2.py asks GPT whether it is "consistent" with the gold answer).
Here both are rules: the answer is the `<answer>` block, else the last `\\boxed{}`, else what
follows the last "answer is"/"Answer:", else the last line. multi-choice rows (gold: a letter)
are right when the answer names that option by letter ("C", "(C)", "C.", "C: √3") or by its text,
the options read from the `Choices:` block of question_for_eval; free-form rows are right when the
number equals the gold number exactly (units, `\\frac`, `\\sqrt` read by pipeline.scoring; "L = 14
cm" reads 14) or the normalised text is the same (spaces, `$`, case ignored). What GPT judges and
rules do not: equivalent expressions written differently ("0.5m" vs "50cm", "y=2x+1" vs
"2x-y+1=0", intervals), and answers stated in prose without an answer phrase. Published MathVerse
numbers are GPT-judged "w/o" accuracy per version; expect this scorer to be at or slightly below
them on free-form rows, the same on multi-choice rows.

Breakdown: subject and subfield (metadata), question_type, as score_answer_s2.py reports.
Output: the authors' results file (output_templates/output_testmini.json: the row's fields plus
`model_answer`, then `extraction` and `judgement` as their two steps add them), with `category`
(= metadata), the key their score_answer_s2.py reads its breakdown from, so it re-scores the file
unchanged (`--quick_match --cache`).
"""

from __future__ import annotations

import re
from decimal import Decimal

from pipeline.answer_format import extract_answer
from pipeline.benchmarks import Benchmark, Row
from pipeline.scoring import MAX_ANSWER_CHARS, named_options, normalise_text, numbers_match, parse_number

HUB_ID = "AI4Math/MathVerse"
# AI4Math/MathVerse's main as pinned by two public evaluation repositories (found in the code corpus;
# the Hub itself could not be reached to confirm it)
REVISION = "3bc86196678bad115a923d2851c6821dbe235939"
COLUMNS = ("sample_index", "problem_index", "problem_version", "question", "image", "answer", "question_type",
           "metadata", "query_wo", "query_cot", "question_for_eval")
VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")

_CHOICES_RE = re.compile(r"(?:^|\n)\s*Choices?\s*:?\s*\n(?P<block>.*)$", re.S | re.I)
_OPTION_RE = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：)]\s*(.*?)\s*$")
_ANSWER_PHRASE_RE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(?P<rest>[^\n]*)", re.I)


def prompt(row: Row) -> str:
    return str(row.get("query_wo") or row.get("question") or "")


def choices(row: Row) -> list[str]:
    """The options of a multi-choice row, from the `Choices:` block of its question text (A: …, B. …)."""
    for column in ("question_for_eval", "question"):
        text = row.get(column)
        if not isinstance(text, str):
            continue
        match = _CHOICES_RE.search(text)
        if not match:
            continue
        options: list[str] = []
        for line in match.group("block").splitlines():
            option = _OPTION_RE.match(line)
            if option and ord(option.group(1)) - ord("A") == len(options):
                options.append(option.group(2))
            elif option or not line.strip():
                continue
            elif options:  # an option's text that runs onto the next line
                options[-1] = f"{options[-1]} {line.strip()}"
        if options:
            return options
    return []


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    brace = text.find("{", start) if start >= 0 else -1
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[brace + 1:index].strip()
    return None


def extraction(response: str | None) -> str:
    """The answer a response states, by rules (the official step 1 asks GPT): the `<answer>` block,
    else the last `\\boxed{}`, else what follows the last "answer is"/"Answer:", else the last line."""
    if not response:
        return ""
    tagged = extract_answer(response)
    if tagged is not None:
        return tagged
    boxed = _last_boxed(response)
    if boxed:
        return boxed
    phrases = list(_ANSWER_PHRASE_RE.finditer(response))
    if phrases and phrases[-1].group("rest").strip():
        return phrases[-1].group("rest").strip()
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _number(text: str) -> Decimal | None:
    """The number an answer states; "L = 14 cm" and "x \\approx 14" state 14."""
    value = parse_number(text)
    if value is None:
        for separator in ("\\approx", "≈", "="):
            if separator in text:
                value = parse_number(text.rsplit(separator, 1)[1])
                break
    return value


def _compact(text: str) -> str:
    return normalise_text(text).replace(" ", "")


def judge(extracted: str, row: Row) -> bool:
    """The deterministic part of score_answer_s2.py's judgement: extracted answer vs the gold answer."""
    gold = str(row.get("answer") or "").strip()
    extracted = extracted.strip()
    if not gold or not extracted or len(extracted) > MAX_ANSWER_CHARS:
        return False
    if row.get("question_type") == "multi-choice":
        options = choices(row)
        letter = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", gold)
        if options and letter:
            gold_index = ord(letter.group(1).upper()) - ord("A")
            return named_options(extracted, options) == {gold_index}
        # no options could be read: letters compare as letters, like the judge's exact match
        return _compact(extracted).strip("()") == _compact(gold).strip("()")
    gold_value = parse_number(gold)
    if gold_value is not None:
        value = _number(extracted)
        return value is not None and numbers_match(value, gold_value, "integer", None)
    return _compact(extracted) == _compact(gold)


def score(response: str | None, row: Row) -> bool:
    try:
        return judge(extraction(response), row)
    except Exception:  # noqa: BLE001 - a scorer never stops an evaluation for one odd answer
        return False


def official_output(rows, responses, verdicts) -> list[dict]:
    """MathVerse's results file: each sample's fields, `model_answer` (the response), `extraction` and
    `judgement` (0/1), as extract_answer_s1.py and score_answer_s2.py leave them."""
    out = []
    for row, response, verdict in zip(rows, responses, verdicts, strict=True):
        sample = {key: row.get(key) for key in COLUMNS}
        sample["image"] = row.get("image") if isinstance(row.get("image"), str) else None
        sample.update(category=row.get("metadata"), model_answer=response or "",
                      extraction=extraction(response), judgement=int(bool(verdict)))
        out.append(sample)
    return out


def _version(name: str):
    def keep(row: Row) -> bool:
        return row.get("problem_version") == name
    return keep


_NOTES = (
    "revision: 3bc86196678bad115a923d2851c6821dbe235939, AI4Math/MathVerse's main as pinned by public "
    "evaluation code (not confirmed against the Hub from here). Prompt: query_wo (the authors' primary 'w/o' "
    "score). The official metric extracts the answer and judges it with GPT (ChatGPT/GPT-4); here both steps "
    "are rules: options by letter or text, exact numbers, normalised text. Equivalent forms a judge accepts "
    "(50cm for 0.5m, rearranged equations, answers in prose) count wrong here.")

BENCHMARKS = [
    Benchmark(
        name=f"mathverse-{slug}", hub_id=HUB_ID, revision=REVISION, split="testmini", config="testmini",
        id_column="sample_index", image_column="image", prompt=prompt, score=score, keep=_version(version),
        breakdown=("metadata.subject", "metadata.subfield", "question_type"),
        official_output=official_output, output_file=f"mathverse_{slug.replace('-', '_')}_output.json",
        notes=_NOTES,
    )
    for slug, version in (("vision-only", "Vision Only"), ("text-lite", "Text Lite"))
]
