"""evaluate stage: base model vs base + the run's adapter on the held-out eval split.

Answers come from one vLLM engine serving the base model and the adapter (a `LoRARequest`) when
vLLM is installed, else from batched transformers `generate` (`evaluate.backend`; see
pipeline/generation.py). They are graded by `pipeline.scoring.is_correct`, the function the
correctness reward uses, so training and evaluation cannot disagree. Writes metrics (a DVC metric:
`dvc metrics diff` compares runs) and per-example predictions (with the backend that made them).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import logs
from pipeline.answer_format import extract_answer, is_soft, is_strict
from pipeline.benchmarks import Benchmark, suite
from pipeline.params import Params, Reports, load_params_or_exit
from pipeline.scoring import is_correct

logger = logging.getLogger("pipeline.evaluate")
MODELS = ("base", "adapter")
EVAL_SET = "eval"  # the run's own eval split, beside the suite's benchmarks


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval for a proportion that stays inside [0, 1] even for small n or p near 0/1."""
    if total == 0:
        return (0.0, 0.0)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def score_rows(rows: Sequence[dict], texts: Sequence[str | None]) -> list[dict]:
    scored = []
    for row, text in zip(rows, texts, strict=False):
        extracted = extract_answer(text)
        scored.append({
            "correct": is_correct(extracted, row),
            "strict_format": is_strict(text),
            "soft_format": is_soft(text),
            "extracted": extracted,
        })
    return scored


def summarise(scored: Sequence[dict], generations: Sequence) -> dict:
    n = len(scored)
    correct = sum(s["correct"] for s in scored)
    return {
        "rows": n,
        "accuracy": round(correct / n, 4) if n else 0.0,
        "accuracy_ci95": list(wilson_interval(correct, n)),
        "strict_format": round(sum(s["strict_format"] for s in scored) / n, 4) if n else 0.0,
        "soft_format": round(sum(s["soft_format"] for s in scored) / n, 4) if n else 0.0,
        "extraction_rate": round(sum(s["extracted"] is not None for s in scored) / n, 4) if n else 0.0,
        "mean_completion_tokens": round(sum(g.num_tokens for g in generations) / n, 2) if n else 0.0,
        "truncation_rate": round(sum(g.truncated for g in generations) / n, 4) if n else 0.0,
        "failed_generations": sum(g.text is None for g in generations),
    }


# MathVista's own breakdown (its official scorer, ported in tests/mathvista_scorer.py), in its order
BREAKDOWN_FIELDS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade",
                    "skills")


def breakdown(rows: Sequence[dict], scored: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Accuracy per value of each MathVista field present, with its 95% interval (skills: one row
    counts for each of its skills), as MathVista reports its scores."""
    groups: dict[str, dict[str, list[bool]]] = {}
    for row, score in zip(rows, scored, strict=True):
        for field in BREAKDOWN_FIELDS:
            value = row.get(field)
            if value is None or value == "":
                continue
            values = [v.strip() for v in str(value).split(",")] if field == "skills" else [str(value)]
            for item in values:
                groups.setdefault(field, {}).setdefault(item, []).append(score["correct"])
    return {
        field: {value: {"rows": len(hits), "correct": sum(hits), "accuracy": round(sum(hits) / len(hits), 4),
                        "accuracy_ci95": list(wilson_interval(sum(hits), len(hits)))}
                for value, hits in sorted(by_value.items())}
        for field, by_value in groups.items()
    }


def build_metrics(summaries: dict[str, dict]) -> dict:
    metrics = dict(summaries)
    metrics["delta"] = {
        key: round(summaries["adapter"][key] - summaries["base"][key], 4)
        for key in ("accuracy", "strict_format", "soft_format", "extraction_rate")
    }
    return metrics


def evaluate(params: Params) -> dict:
    from datasets import load_dataset

    eval_file = params.output_dir / "data" / "eval.parquet"
    adapter_dir = params.output_dir / "adapter"
    if not eval_file.is_file():
        raise SystemExit(f"evaluate: error: {eval_file} not found; run the prepare stage first")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(f"evaluate: error: no adapter in {adapter_dir}; run the train stage first")
    dataset = load_dataset("parquet", data_files=str(eval_file), split="train")
    if params.evaluate.max_rows:
        dataset = dataset.select(range(min(params.evaluate.max_rows, len(dataset))))
    if len(dataset) == 0:
        raise SystemExit(f"evaluate: error: the eval split {eval_file} is empty")
    rows = [{k: v for k, v in row.items() if k != "image"} for row in dataset]
    sets = {EVAL_SET: ([row["prompt"] for row in rows], dataset["image"])}
    benchmarks = suite.entries(params.evaluate.suite)
    suite_rows = {}
    for entry in benchmarks:
        name = entry.benchmark.name
        suite_rows[name], conversations, images = suite.load_prepared(params.output_dir / "data", name,
                                                                      params.evaluate.max_rows)
        sets[name] = (conversations, images)

    backend, generated = generate_sets(params, sets, adapter_dir)
    generations = generated[EVAL_SET]
    scored = {name: score_rows(rows, [g.text for g in generations[name]]) for name in MODELS}
    summaries = {name: {**summarise(scored[name], generations[name]), "by": breakdown(rows, scored[name])}
                 for name in MODELS}
    metrics = build_metrics(summaries)
    eval_dir = params.output_dir / "eval"
    _write_predictions(eval_dir / "predictions.jsonl", rows, generations, scored, backend)
    for name in MODELS:
        output = mathvista_output(rows, generations[name], scored[name])
        (eval_dir / f"mathvista_output_{name}.json").write_text(json.dumps(output, indent=1) + "\n")
    if benchmarks:
        metrics["suite"] = {
            entry.benchmark.name: score_suite_benchmark(entry.benchmark, suite_rows[entry.benchmark.name],
                                                        generated[entry.benchmark.name], eval_dir)
            for entry in benchmarks}
    return metrics


def score_suite_benchmark(benchmark, rows: list[dict], generations: dict[str, list], eval_dir: Path) -> dict:
    """One suite benchmark's metrics (base, adapter, delta) by its own scorer; writes its official output."""
    summaries = {}
    for name in MODELS:
        texts = [g.text for g in generations[name]]
        verdicts = suite.score_benchmark(benchmark, rows, texts)
        summaries[name] = benchmark_summary(benchmark, rows, verdicts)
        suite.write_official_output(benchmark, eval_dir, name, rows, texts, verdicts)
    summaries["delta"] = {"accuracy": round(summaries["adapter"]["accuracy"] - summaries["base"]["accuracy"], 4)}
    logger.info("%s: accuracy base %.3f → adapter %.3f (%d rows)", benchmark.name, summaries["base"]["accuracy"],
                summaries["adapter"]["accuracy"], summaries["base"]["rows"])
    return summaries


def _group_value(row: dict, column: str) -> Any:
    """A breakdown column; `a.b` reads field b of a struct (MathVerse's and MathVista's metadata)."""
    value: Any = row
    for part in column.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def benchmark_summary(benchmark: Benchmark, rows: Sequence[dict], verdicts: Sequence[bool]) -> dict:
    n, correct = len(verdicts), sum(verdicts)
    summary: dict[str, Any] = {"rows": n, "accuracy": round(correct / n, 4) if n else 0.0,
                               "accuracy_ci95": list(wilson_interval(correct, n))}
    by: dict[str, dict[str, list[bool]]] = {}
    for row, verdict in zip(rows, verdicts, strict=True):
        for column in benchmark.breakdown:
            value = _group_value(row, column)
            if value is None or value == "":
                continue
            for item in value if isinstance(value, list) else [value]:
                by.setdefault(column, {}).setdefault(str(item), []).append(verdict)
    if by:
        summary["by"] = {column: {value: {"rows": len(hits), "accuracy": round(sum(hits) / len(hits), 4),
                                          "accuracy_ci95": list(wilson_interval(sum(hits), len(hits)))}
                                  for value, hits in sorted(values.items())}
                         for column, values in by.items()}
    if benchmark.composite is not None:
        summary["composite"] = benchmark.composite(rows, verdicts)
    return summary


def generate_sets(params: Params, sets: dict[str, tuple], adapter_dir: Path) -> tuple[str, dict[str, dict]]:
    """Base and adapter answers for every set (the eval split, each suite benchmark) from one backend
    and, with vLLM, one engine (never one backend for some answers and another for the rest, so
    they are comparable).

    `evaluate.backend: auto` uses vLLM when it is installed and falls back to transformers, saying
    why, when vLLM cannot start or cannot load the adapter; `vllm` makes either of those an error."""
    from pipeline import generation, serving

    requested = params.evaluate.backend
    try:
        backend = generation.select_backend(requested)
    except generation.BackendUnavailable as error:
        raise SystemExit(f"evaluate: error: evaluate.backend: {error}") from None
    logger.info("generation backend: %s (evaluate.backend: %s)", backend, requested)
    model, evaluation = params.model, params.evaluate
    settings = serving.Settings(
        revision=model.revision, dtype=model.dtype, attn_implementation=model.attn_implementation,
        max_model_len=model.max_model_len, seed=params.seed, max_new_tokens=evaluation.max_new_tokens,
        temperature=evaluation.temperature, batch_size=evaluation.batch_size)
    requests = {}
    for set_name, inputs in sets.items():
        label = "eval" if set_name == EVAL_SET else set_name
        for name, adapter in (("base", None), ("adapter", adapter_dir)):
            requests[(set_name, name)] = serving.Request(adapter, f"{label} {name}", lambda inputs=inputs: inputs)
    keys = {id(request): key for key, request in requests.items()}
    generations: dict[str, dict] = {set_name: {} for set_name in sets}
    backends = set()
    for served in serving.serve(model.name_or_path, list(requests.values()), settings, backend=backend,
                                   strict=requested == "vllm", together=True):
        if isinstance(served.error, generation.BackendUnavailable):
            raise SystemExit(f"evaluate: error: {served.error} (evaluate.backend: vllm; "
                             "set it to auto or transformers to use transformers generate)")
        if served.error is not None:
            raise served.error
        set_name, name = keys[id(served.request)]
        generations[set_name][name] = served.generations
        backends.add(served.backend)
    return backends.pop(), generations


def _write_predictions(path: Path, rows, generations, scored, backend: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, row in enumerate(rows):
            record = {"id": row["id"], "question": row["question"], "gold": row["answer"], "backend": backend}
            for name in MODELS:
                generation = generations[name][i]
                record[name] = {"prediction": generation.text, "error": generation.error, **scored[name][i],
                                "completion_tokens": generation.num_tokens, "prompt_tokens": generation.prompt_tokens}
            f.write(json.dumps(record) + "\n")


MATHVISTA_METADATA = ("category", "context", "grade", "language", "source", "task")


def mathvista_output(rows: Sequence[dict], generations: Sequence, scored: Sequence[dict]) -> dict[str, dict]:
    """MathVista's output file: pid → the problem with `response`, `extraction` and `true_false`, the
    input MathVista's official scorer grades (tests/mathvista_scorer.py ports it). That scorer
    re-derives `true_false` from `extraction` by its rules; ours, from the same extraction, is kept
    for comparison."""
    output = {}
    for row, generation, score in zip(rows, generations, scored, strict=True):
        precision = row.get("precision")
        metadata = {field: row.get(field) for field in MATHVISTA_METADATA}
        metadata["skills"] = [s.strip() for s in (row.get("skills") or "").split(",") if s.strip()]
        output[row["id"]] = {
            "question": row["question"], "choices": row.get("choices"), "unit": row.get("unit"),
            "precision": None if precision is None else int(precision),  # the scorer rounds to it: an int
            "answer": row["answer"], "question_type": row["question_type"], "answer_type": row["answer_type"],
            "metadata": metadata,
            "query": next((m["content"] for m in row["prompt"] if m["role"] == "user"), row["question"]),
            "response": generation.text or "",
            "extraction": score["extracted"] or "",
            "true_false": bool(score["correct"]),
        }
    return output


def main() -> None:
    params = load_params_or_exit()
    logs.configure()
    metrics = evaluate(params)
    out = Reports.evaluation
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    from pipeline import report

    report.write_all(params.run_id, metrics, params.output_dir / "eval" / "predictions.jsonl")
    logger.info("accuracy base %.3f → adapter %.3f; strict format %.3f → %.3f (%d rows) → %s",
                metrics["base"]["accuracy"], metrics["adapter"]["accuracy"], metrics["base"]["strict_format"],
                metrics["adapter"]["strict_format"], metrics["base"]["rows"], out)


if __name__ == "__main__":
    main()
