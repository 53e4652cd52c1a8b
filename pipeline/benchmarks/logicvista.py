"""LogicVista (lscpku/LogicVista, split `test`): 448 visual logical-reasoning questions.

The options live in the image; the question says which to pick from ("Select from A-D", "which two
of the proposals A, B, C or D", "Select from 1-5"). A few answers are several letters ("A, C") and
one is a number ("3"). Breakdown: the five reasoning skills (`skill`: inductive, deductive, numerical,
spatial, mechanical) and the capabilities (`broad_capability`: diagram, ocr, diagram and ocr;
`specific_capability`), as `eval/analyze_accuracy.py` reports them.

Prompt: the question text as the dataset stores it (the authors' answer files and lmms-eval send it
unchanged).

Scorer: the authors' `eval/extract_accuracy.py` compares the set of choices the answer names with
the gold `answer` split on ", ", case-insensitively, as sorted lists: several letters must all be
named and nothing else. Their extraction asks GPT-4 which letters a free-text answer chose; here the
extraction is by rules: the `<answer>` block (else the whole response), cleaned of markup
(`\\boxed{}`, "Answer:"), is read as a list of choices ("B", "(B)", "A, C", "A and C", "B D"); failing
that, the last "answer is …" / "answer: …" / "options … are …" phrase naming such a list. An answer
that names none is wrong (their ZZZZZ). Differences: no GPT, so an answer that describes an option
without naming it is wrong; a bare letter beyond E ("G", "F", the gold of two rows) counts, where
their pre-filter turns any single letter outside a-e into ZZZZZ; the row whose gold is empty is never
correct (their code pays an empty response there).
"""

from __future__ import annotations

import re

from pipeline.benchmarks import Benchmark, Row, answer_text
from pipeline.scoring import strip_markup

_CHOICE = r"\(?(?:[A-Za-z]|\d{1,2})\)?"
_SEP = r"(?:\s*(?:,|;|/|&|\band\b|\bor\b)\s*|\s+)"  # between choices in a bare answer
_STRICT_SEP = r"(?:\s*(?:,|;|/|&)\s*|\s+and\s+|\s*,\s*and\s+)"  # inside free text: no bare spaces
_LIST_RE = re.compile(rf"^{_CHOICE}(?:{_SEP}{_CHOICE})*$")
_PHRASE_RE = re.compile(
    rf"(?:answers?|options?|choices?)\s*(?:is|are|:|=|would be|should be)\s*:?\s*(?:options?\s*|choices?\s*)?"
    rf"(?P<list>{_CHOICE}(?:{_STRICT_SEP}{_CHOICE})*)(?![A-Za-z0-9])", re.I)
_TOKEN_RE = re.compile(r"[A-Za-z]|\d{1,2}")


def prompt(row: Row) -> str:
    return str(row["question"])


def gold_choices(row: Row) -> list[str]:
    """The gold answer as the authors read it: split on ", ", lowercased, sorted."""
    return sorted(part.strip().lower() for part in str(row.get("answer") or "").split(", "))


def _tokens(text: str) -> list[str]:
    return sorted(token.lower() for token in _TOKEN_RE.findall(re.sub(r"\b(?:and|or)\b", " ", text, flags=re.I)))


def extract(response: str | None) -> list[str]:
    """The choices a response names, lowercased and sorted; [] when it names none."""
    text = answer_text(response)
    if not text or not text.strip():
        return []
    cleaned = strip_markup(text)
    if _LIST_RE.match(cleaned):
        return _tokens(cleaned)
    found = list(_PHRASE_RE.finditer(cleaned))
    return _tokens(found[-1].group("list")) if found else []


def score(response: str | None, row: Row) -> bool:
    gold = gold_choices(row)
    if not any(gold):
        return False
    return sorted(set(extract(response))) == sorted(set(gold))


def official_output(rows, responses, verdicts) -> list[dict]:
    """The authors' results table (`results/<MODEL>-accuracy-results.csv`), one record per row, with
    MODEL written as "MLLM"."""
    return [{"id": row.get("id"), "reasoning skill": row.get("skill"),
             "capability": row.get("broad_capability"), "true answer": gold_choices(row),
             "MLLM answer extracted": extract(response) or ["zzzzz"], "MLLM answer raw": response or "",
             "match?": int(bool(verdict))}
            for row, response, verdict in zip(rows, responses, verdicts, strict=True)]


BENCHMARKS = [
    Benchmark(
        name="logicvista", hub_id="lscpku/LogicVista", revision="main", split="test", id_column="id",
        image_column="image", prompt=prompt, score=score,
        breakdown=("skill", "broad_capability", "specific_capability"),
        official_output=official_output, output_file="logicvista_results.json",
        notes="revision: main (no commit of lscpku/LogicVista could be found offline; pin one with "
              "`revision:` in the suite entry). Rule-based choice extraction instead of the authors' "
              "GPT-4 one; exact set comparison as theirs.",
    ),
]
