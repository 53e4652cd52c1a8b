"""`evaluate.suite` through the stages: prepare stores each benchmark's rows, evaluate scores them.

prepare (`prepare_suite`): each benchmark's rows, read from the Hub at the pinned revision or from a
local copy (`evaluate.suite: [{name: …, source: data/…}]`), become `outputs/<run_id>/data/suite/
<name>.parquet`: the conversation (the project's system prompt, the authors' question text), the
image cleaned by the run's image rules (the model sees what training showed it), and the raw row
(`record`, JSON) the benchmark's scorer reads. Rows whose image cannot be used are counted, not kept.

evaluate (`score_benchmark`, `suite_metrics`): the stage generates every set with one engine (base
and adapter), and each benchmark's answers are graded by its own scorer; its metrics land under
`suite.<name>` in reports/eval_metrics.json, its official output file under outputs/<run_id>/eval/suite/.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.benchmarks import Benchmark, registry

logger = logging.getLogger("pipeline.benchmarks")
SUITE_DIR = "suite"  # under outputs/<run_id>/data and outputs/<run_id>/eval
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class SuiteError(ValueError):
    """A suite entry that cannot be read; the message names the benchmark and the source."""


@dataclass(frozen=True)
class Entry:
    benchmark: Benchmark
    source: str | None  # a local copy (file) in the dataset's own schema; None: the Hub at the revision
    revision: str


def entries(suite: Sequence[Any]) -> list[Entry]:
    """params' `evaluate.suite` (names, or {name, source, revision}) → the benchmarks to run."""
    if not suite:
        return []
    known = registry()
    out = []
    for item in suite:
        name, source, revision = (item, None, None) if isinstance(item, str) else (
            item.name, item.source, item.revision)
        benchmark = known[name]  # params checked the name
        out.append(Entry(benchmark, source, revision or benchmark.revision))
    return out


def _load(entry: Entry, cache_dir: str):
    from datasets import load_dataset

    benchmark, source = entry.benchmark, entry.source
    try:
        if source is None:
            return load_dataset(benchmark.hub_id, benchmark.config, split=benchmark.split, revision=entry.revision)
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {source}")
        if path.suffix not in LOCAL_FORMATS:
            raise SuiteError(f"unsupported file type {path.suffix!r} (parquet, json, jsonl or csv)")
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - every unusable source gets one clear message
        where = source or f"{benchmark.hub_id} (split {benchmark.split}, revision {entry.revision})"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SuiteError(f"evaluate.suite: {benchmark.name}: {where} cannot be loaded here: {first_line}. "
                         "Download it first or give the entry a local copy (source: data/…)") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def prepare_benchmark(entry: Entry, rules, cache_dir: str) -> tuple[dict[str, list], dict]:
    """A benchmark's rows → the columns of its suite file, and its counts for the data report."""
    from pipeline.images import BadImage, clean_image
    from pipeline.prompts import conversation

    benchmark = entry.benchmark
    dataset = _load(entry, cache_dir)
    missing = [c for c in (benchmark.id_column, benchmark.image_column) if c not in dataset.column_names]
    if missing:
        raise SuiteError(f"evaluate.suite: {benchmark.name}: {entry.source or benchmark.hub_id} has no column "
                         f"{', '.join(map(repr, missing))} (columns: {', '.join(dataset.column_names)})")
    base_dir = str(Path(entry.source).parent) if entry.source else None
    columns: dict[str, list] = {"id": [], "prompt": [], "image": [], "record": []}
    counts = {"rows_in": len(dataset), "kept": 0, "not_in_this_benchmark": 0, "unusable_image": 0}
    for row in dataset:
        record = {k: v for k, v in row.items() if k != benchmark.image_column}
        if benchmark.keep is not None and not benchmark.keep(record):
            counts["not_in_this_benchmark"] += 1
            continue
        try:
            image, _, _ = clean_image(row[benchmark.image_column], rules, base_dir)
        except BadImage:
            counts["unusable_image"] += 1
            continue
        columns["id"].append(str(row[benchmark.id_column]))
        columns["prompt"].append(conversation(benchmark.prompt(record)))
        columns["image"].append(image)
        columns["record"].append(json.dumps(_jsonable(record), ensure_ascii=False))
        counts["kept"] += 1
    if not counts["kept"]:
        raise SuiteError(f"evaluate.suite: {benchmark.name}: no usable row in {entry.source or benchmark.hub_id} "
                         f"({counts})")
    return columns, counts


def prepare_suite(suite: Sequence[Any], rules, out_dir: Path, cache_dir: str) -> dict[str, dict]:
    """Write each benchmark's suite file under `out_dir`/suite; {name: counts, source, revision}."""
    from datasets import Dataset, Features, Image, List, Value

    features = Features({"id": Value("string"), "prompt": List({"role": Value("string"), "content": Value("string")}),
                         "image": Image(), "record": Value("string")})
    report = {}
    folder = out_dir / SUITE_DIR
    for entry in entries(suite):
        columns, counts = prepare_benchmark(entry, rules, cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(columns, features=features).to_parquet(str(folder / f"{entry.benchmark.name}.parquet"))
        report[entry.benchmark.name] = {**counts, "source": entry.source or entry.benchmark.hub_id,
                                        "split": None if entry.source else entry.benchmark.split,
                                        "revision": None if entry.source else entry.revision}
        logger.info("suite %s: %d rows kept of %d", entry.benchmark.name, counts["kept"], counts["rows_in"])
    return report


def load_prepared(data_dir: Path, name: str, max_rows: int | None):
    """(raw rows, conversations, images) of a prepared suite file."""
    from datasets import load_dataset

    path = data_dir / SUITE_DIR / f"{name}.parquet"
    if not path.is_file():
        raise SystemExit(f"evaluate: error: {path} not found; run the prepare stage first (dvc repro prepare)")
    dataset = load_dataset("parquet", data_files=str(path), split="train")
    if max_rows:
        dataset = dataset.select(range(min(max_rows, len(dataset))))
    return [json.loads(r) for r in dataset["record"]], list(dataset["prompt"]), dataset["image"]


def score_benchmark(benchmark: Benchmark, rows: Sequence[dict], texts: Sequence[str | None]) -> list[bool]:
    return [bool(benchmark.score(text, row)) for row, text in zip(rows, texts, strict=True)]


def write_official_output(benchmark: Benchmark, eval_dir: Path, model: str, rows, texts, verdicts) -> Path | None:
    if benchmark.official_output is None:
        return None
    name = benchmark.output_file or f"{benchmark.name}.json"
    stem, dot, suffix = name.rpartition(".")
    path = eval_dir / SUITE_DIR / f"{stem}_{model}{dot}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(benchmark.official_output(rows, texts, verdicts), indent=1, ensure_ascii=False) + "\n")
    return path
