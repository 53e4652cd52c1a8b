"""The evaluation suite (`evaluate.suite`): visual-math benchmarks, each scored by its own rules.

Published numbers depend on the harness: the prompt, the answer extraction and the comparison. So
each benchmark here is one module that restates what its authors' public evaluation code does:
where its data lives (Hub id, pinned revision, split) and in what schema, the prompt the authors
send, the rule-based scorer, the breakdown the authors report and the official output file. Where
the official metric needs a GPT judge (answer extraction from free text), the module implements the
rule-based part and its docstring says how that differs.

A `Benchmark` sees raw rows in the dataset's own schema (the image column left out); the prepare
stage stores them beside a conversation and the image (`pipeline/benchmarks/suite.py`), the
evaluate stage generates with the run's engine and scores with `score`.

The registry imports nothing heavy: params validate suite names before any model loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.answer_format import extract_answer

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark split, as its authors evaluate it."""

    name: str  # the key in reports/eval_metrics.json (`suite.<name>`) and in evaluate.suite
    hub_id: str  # the dataset on the Hugging Face Hub
    revision: str  # a commit of it: the rows never change under a run
    split: str
    prompt: Callable[[Row], str]  # the user turn's text, from a raw row, as the authors build it
    score: Callable[[str | None, Row], bool]  # the whole response (None: no generation) and the raw row
    config: str | None = None
    id_column: str = "id"
    image_column: str = "image"  # bytes, {"bytes", "path"}, a PIL image or a path relative to the data file
    # which raw rows the benchmark scores (MathVerse's "Vision Only" version, say); None: all
    keep: Callable[[Row], bool] | None = None
    breakdown: tuple[str, ...] = ()  # raw columns the authors report accuracy per value of
    # the authors' output file (rows, responses, verdicts → a JSON-able object), and its file name
    official_output: Callable[[Sequence[Row], Sequence[str | None], Sequence[bool]], Any] | None = None
    output_file: str | None = None
    # the authors' metrics over the whole set beyond accuracy (We-Math's four dimensions, DynaMath's
    # worst case): (rows, verdicts) → {metric: value}
    composite: Callable[[Sequence[Row], Sequence[bool]], dict[str, float]] | None = None
    # what the scorer leaves out of the official metric (a GPT judge's part), shown in docs/evaluation.md
    notes: str = ""


def answer_text(response: str | None) -> str | None:
    """What a scorer grades: the text of the response's `<answer>…</answer>` block (the format the
    run's adapter is trained to), else the whole response, as the benchmark's own extraction sees it."""
    if response is None:
        return None
    extracted = extract_answer(response)
    return extracted if extracted is not None else response


MODULES = ("mathvista", "mathverse", "mathvision", "wemath", "logicvista", "dynamath")


def registry() -> dict[str, Benchmark]:
    """Every shipped benchmark by name (one module each)."""
    import importlib

    found: dict[str, Benchmark] = {}
    for module in MODULES:
        for benchmark in importlib.import_module(f"pipeline.benchmarks.{module}").BENCHMARKS:
            assert benchmark.name not in found, f"two benchmarks named {benchmark.name}"
            found[benchmark.name] = benchmark
    return found
