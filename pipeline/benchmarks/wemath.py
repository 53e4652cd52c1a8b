"""We-Math testmini (We-Math/We-Math): 1,740 multiple-choice visual-math problems, 525 of them composite.

Each composite problem (`key` `2steps_multi` / `3steps_multi`) is decomposed into one-step
sub-problems (`2steps_1`, `2steps_2`, `3steps_1` …) that share its `ID`; the authors grade the
sub-problems and the composite problem together (the four-dimensional metrics).

Prompt: the authors' generation template (We-Math paper, appendix; the authors' inference scripts;
VLMEvalKit strips its format requirement by this exact text): the question, the `option` string as
the dataset stores it ("A. …;B. …; E. No correct answer"), and the request to answer as
`<Thought process>: <<…>> <Answer>: <<your option>>`.

Scorer: the authors' string matching (`evaluation/four_dimensional_metrics.py`, `accuracy.py`): the
text after the last "Answer", stripped of `<`, `>`, `:` and `.`, whose first character is the option
letter (A-H), equal to the row's `answer`. Applied to the `<answer>` block when the response has one,
else to the whole response. Two deliberate differences: the first character counts only when it is a
letter on its own ("Because …" is not option B, which the authors' rule would pay), and an answer
their rule cannot read ("(B)", "b", or the option's text "3000, 4000") is matched against the options
by `pipeline.scoring.choice_index`, as VLMEvalKit's exact matching (its judge-free path for We-Math)
does. A response naming no option, or several, is wrong.

Composite metrics (`composite`): the authors' four dimensions over the composite problems whose
sub-problems are all present: Insufficient Knowledge (IK), Inadequate Generalization (IG), Complete
Mastery (CM) and Rote Memorization (RM), strict and loose, and their score
(n - 0.5·IG - RM - IK) / n; plus the one-step (S1), two-step (S2) and three-step (S3) accuracies of
`accuracy.py`. The authors divide by 525 (the full testmini); here n is the number of complete
groups, which is 525 on the full split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pipeline.benchmarks import Benchmark, Row, answer_text
from pipeline.scoring import choice_index

LETTERS = "ABCDEFGH"  # the authors' option letters
PROMPT = (
    "Now, we require you to solve a multiple-choice math question.\n"
    "Please briefly describe your thought process and provide the final answer(option).\n"
    "Question: {question}\n"
    "Option: {option}\n"
    "Regarding the format, please answer following the template below, and be sure to include two <> symbols:\n"
    "<Thought process>: <<your thought process>> <Answer>: <<your option>>"
)
_OPTION_RE = re.compile(r"(?:^|[;；]\s*)([A-H])[.．、]\s*")
_STRIPPED = re.compile(r"[><:.]")  # the authors' `[>><<:.]`
IMAGE_COLUMN = "image_path"  # an Image feature: {"bytes", "path"}


def prompt(row: Row) -> str:
    return PROMPT.format(question=str(row["question"]).strip(), option=str(row["option"]).strip())


def options(option: str) -> list[str]:
    """The option texts of the dataset's `option` string, in letter order ("A. 3;B. 4; E. No correct answer")."""
    text = str(option or "").strip()
    matches = list(_OPTION_RE.finditer(text))
    out = []
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        out.append(text[match.end():end].strip().rstrip(";；").strip())
    return out


def authors_letter(text: str) -> str | None:
    """The authors' extraction: after the last "Answer", drop `<>:.`, the first character if it is A-H
    (here only when it stands alone: "B", "B)", "B 12", not "Because")."""
    processed = _STRIPPED.sub("", text.split("Answer")[-1].strip()).strip()
    if not processed or processed[0] not in LETTERS:
        return None
    if len(processed) > 1 and processed[1].isalnum():
        return None
    return processed[0]


def extract(response: str | None, row: Row) -> str | None:
    """The option letter a response names, or None."""
    text = answer_text(response)
    if not text or not text.strip():
        return None
    letter = authors_letter(text)
    if letter is not None:
        return letter
    texts = options(row.get("option") or "")
    index = choice_index(text, texts) if texts else None
    return LETTERS[index] if index is not None and index < len(LETTERS) else None


def score(response: str | None, row: Row) -> bool:
    gold = str(row.get("answer") or "").strip().upper()
    return bool(gold) and extract(response, row) == gold


def _groups(rows: Sequence[Row], verdicts: Sequence[bool]) -> dict[int, list[tuple[list[bool], bool]]]:
    """steps → [(the sub-problems' verdicts, the composite problem's verdict)] for every complete group."""
    by_id: dict[tuple[int, str], dict[str, bool]] = {}
    for row, verdict in zip(rows, verdicts, strict=True):
        match = re.fullmatch(r"(\d)steps_(\d|multi)", str(row.get("key") or ""))
        if match:
            steps = int(match.group(1))
            by_id.setdefault((steps, str(row.get("ID"))), {})[match.group(2)] = bool(verdict)
    groups: dict[int, list[tuple[list[bool], bool]]] = {2: [], 3: []}
    for (steps, _), parts in sorted(by_id.items()):
        names = [str(i) for i in range(1, steps + 1)]
        if steps in groups and "multi" in parts and all(name in parts for name in names):
            groups[steps].append(([parts[name] for name in names], parts["multi"]))
    return groups


def composite(rows: Sequence[Row], verdicts: Sequence[bool]) -> dict[str, float]:
    """We-Math's metrics over (rows, verdicts), as `four_dimensional_metrics.py` and `accuracy.py`.

    Per composite problem (its sub-problems all present): IK = some sub-problem wrong and the composite
    wrong; IG = all sub-problems right, composite wrong; CM strict = all right and composite right,
    CM loose = any right and composite right; RM strict = some wrong and composite right, RM loose =
    all wrong and composite right. Rates: IK, IG, CM over the n groups; RM over CM + RM (the authors'
    definition). score_strict/loose = (n - 0.5·IG - RM - IK) / n. S1: accuracy over the sub-problems,
    S2/S3: the composite problems' accuracy among two-/three-step groups. Fractions (0-1), 4 places;
    `groups` is n. No complete group: only `groups` (0).
    """
    groups = _groups(rows, verdicts)
    every = groups[2] + groups[3]
    n = len(every)
    if not n:
        return {"groups": 0}
    counts = {"IK": 0, "IG": 0, "CM_strict": 0, "CM_loose": 0, "RM_strict": 0, "RM_loose": 0}
    for parts, multi in every:
        every_part, any_part = all(parts), any(parts)
        counts["IG"] += every_part and not multi
        counts["IK"] += (not every_part) and not multi
        counts["CM_strict"] += every_part and multi
        counts["CM_loose"] += any_part and multi
        counts["RM_strict"] += (not every_part) and multi
        counts["RM_loose"] += (not any_part) and multi

    def rate(part: float, whole: float) -> float:
        return round(part / whole, 4) if whole else 0.0

    out: dict[str, float] = {"groups": n}
    for mode in ("strict", "loose"):
        cm, rm = counts[f"CM_{mode}"], counts[f"RM_{mode}"]
        out[f"score_{mode}"] = rate(n - 0.5 * counts["IG"] - rm - counts["IK"], n)
        out[f"IK_{mode}"] = rate(counts["IK"], n)
        out[f"IG_{mode}"] = rate(counts["IG"], n)
        out[f"CM_{mode}"] = rate(cm, n)
        out[f"RM_{mode}"] = rate(rm, cm + rm)
    sub = [verdict for parts, _ in every for verdict in parts]
    out["S1"] = rate(sum(sub), len(sub))
    for steps, name in ((2, "S2"), (3, "S3")):
        if groups[steps]:
            out[name] = rate(sum(multi for _, multi in groups[steps]), len(groups[steps]))
    return out


def image_path(row: Row) -> str | None:
    """The image's path in the authors' release ("3steps/image/165-3.png"): the stored path, else
    from `ID` and `key` (the scorer's rows leave the image column out)."""
    image = row.get(IMAGE_COLUMN)
    if isinstance(image, dict) and image.get("path"):
        return str(image["path"])
    if isinstance(image, str) and image:
        return image
    ident = re.fullmatch(r"(\d)steps_(\d+)", str(row.get("ID") or ""))
    key = re.fullmatch(r"(\d)steps_(\d|multi)", str(row.get("key") or ""))
    if not ident or not key:
        return None
    return f"{ident.group(1)}steps/image/{ident.group(2)}-{key.group(2)}.png"


def official_output(rows, responses, verdicts) -> list[dict]:
    """The result JSON the authors' scripts read (README, "Response Generation"): each row's columns,
    `image_path` as the path, and `response`; plus `extraction` and `joker` (their verdict column)."""
    out = []
    for row, response, verdict in zip(rows, responses, verdicts, strict=True):
        record = {k: v for k, v in row.items() if k != IMAGE_COLUMN}
        record[IMAGE_COLUMN] = image_path(row)
        record.update(response=response or "", extraction=extract(response, row), joker=bool(verdict))
        out.append(record)
    return out


BENCHMARKS = [
    Benchmark(
        name="wemath-testmini", hub_id="We-Math/We-Math", revision="527c44d4d94c4e3c7c98157460146a8b18c8420a",
        split="testmini", id_column="question number", image_column=IMAGE_COLUMN, prompt=prompt, score=score,
        breakdown=("key", "knowledge concept"), official_output=official_output, output_file="wemath_output.json",
        composite=composite,
        notes="revision 527c44d4 (the Hub's main as of the README update #5; the data parquet is unchanged "
              "since its upload). Rule-based as the authors' own scorer (no judge); a letter their rule "
              "cannot read is matched against the options as VLMEvalKit's exact matching does. Composite "
              "metrics divide by the complete groups present (525 on the full split), not a fixed 525.",
    ),
]
