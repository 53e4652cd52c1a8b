"""MathVista testmini (AI4Math/MathVista): 1,000 visual-math questions, the split papers report.

Prompt: the dataset's own `query` column, the question with the hint MathVista's authors generate
(answer type, precision, the options). Scorer: the project's grader (pipeline.scoring), the rules of
MathVista's `calculate_score.py` where they are sound: options by letter or text, numbers rounded
to the row's precision, lists element by element. Differences (docs/reward_logic.md): MathVista
maps unmatched text to the nearest option by edit distance and truncates "5.9" to 5; here those
are wrong. Its official extraction asks GPT-4 for the answer in free text; here the answer is the
`<answer>` block, else the whole response, parsed by rules. Output: MathVista's output file, which
its `calculate_score.py` grades unchanged.
"""

from __future__ import annotations

from pipeline.benchmarks import Benchmark, Row, answer_text
from pipeline.scoring import is_correct

METADATA = ("category", "context", "grade", "language", "source", "task", "skills")


def prompt(row: Row) -> str:
    return str(row.get("query") or row["question"])


def score(response: str | None, row: Row) -> bool:
    return is_correct(answer_text(response), row)


def official_output(rows, responses, verdicts) -> dict:
    """pid → the problem with `response`, `extraction` and `true_false`, MathVista's output schema."""
    return {str(row["pid"]): {**{k: v for k, v in row.items() if k not in ("decoded_image",)},
                              "response": response or "", "extraction": answer_text(response) or "",
                              "true_false": bool(verdict)}
            for row, response, verdict in zip(rows, responses, verdicts, strict=True)}


BENCHMARKS = [
    Benchmark(
        name="mathvista-testmini", hub_id="AI4Math/MathVista", revision="main", split="testmini",
        id_column="pid", image_column="decoded_image", prompt=prompt, score=score,
        breakdown=("question_type", "answer_type", *(f"metadata.{field}" for field in METADATA)),
        official_output=official_output, output_file="mathvista_output.json",
        notes="revision: main (no commit of the dataset could be looked up offline; pin one with "
              "`revision:` in the suite entry). Rule-based extraction instead of MathVista's GPT-4 one.",
    ),
]
