"""prepare stage: any visual-QA dataset → leak-free train/eval parquet with prompts and clean images.

One code path for the Hub's MathVista, local parquet/json(l)/image folders and the embedded synthetic
dataset: `data.columns` maps a dataset's columns onto ours (pipeline/sources.py). Rows are cleaned
in parallel (`datasets.map`, `data.num_proc` workers; values by pipeline/row_values.py, images by
pipeline/images.py); a bad row is dropped and counted by reason in data_report.json, never a crash.
Decisions that need every row (duplicate ids, the length filter, the split, cross-split leaks:
pipeline/splits.py, pipeline/prompt_tokens.py) are taken afterwards in the main process on light
columns only, so the output does not depend on how the rows were sharded: same inputs and params,
same bytes. Why each rule exists is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import lineage, logs
from pipeline.benchmarks.suite import SuiteError, prepare_suite
from pipeline.images import BadImage, ImageRules, clean_image
from pipeline.params import Params, Reports, load_params_or_exit
from pipeline.prepare_errors import BadRow, PrepareError
from pipeline.prompt_tokens import PromptTokenCounter
from pipeline.prompts import conversation, user_text
from pipeline.row_values import (
    ANSWER_TYPES,
    clean_choices,
    clean_gold_answer,
    clean_precision,
    clean_text,
    infer_answer_type,
    match_choice,
    metadata_value,
)
from pipeline.sources import (
    Source,
    column_paths,
    describe,
    image_base_dir,
    load_source,
    read_field,
    reading,
    sources_of,
)
from pipeline.splits import (
    Candidate,
    Ledger,
    assign_splits,
    check_disjoint,
    check_id_collisions,
    drop_cross_split_duplicates,
    drop_untrainable,
    length_filter,
    row_candidates,
)

logger = logging.getLogger("pipeline.prepare")

METADATA_FIELDS = ("category", "context", "grade", "language", "skills", "source", "task")
HELPER_COLUMNS = ("drop_reason", "train_drop_reason", "image_tokens", "content_key")
IMAGE_PLACEHOLDER_RE = re.compile(r"<image>")
ROW_GROUP_ROWS = 100  # fixed parquet row groups: the file layout never depends on num_proc


# ---------------------------------------------------------------------------------------------
# one row (runs in the datasets.map workers)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowRules:
    paths: dict[str, tuple[str, ...] | None]
    images: ImageRules
    base_dir: str | None = None  # where a relative image path in the source is read from


@functools.cache
def output_columns() -> tuple[str, ...]:
    return tuple(output_features())


def _question_fields(row: dict, paths: dict) -> dict:
    """Text fields, validated in the order a reader would notice problems."""
    question = clean_text(read_field(row, paths["question"]))
    if question is not None:  # LLaVA-style `<image>` placeholders: the picture goes in as an image part
        question = clean_text(IMAGE_PLACEHOLDER_RE.sub(" ", question))
    if question is None:
        raise BadRow("empty_question")
    answer = clean_gold_answer(read_field(row, paths["answer"]))
    choices = clean_choices(read_field(row, paths["choices"]))
    question_type = clean_text(read_field(row, paths["question_type"]))
    question_type = question_type or ("multi_choice" if choices else "free_form")
    if (question_type == "multi_choice") != bool(choices):  # prompt and grading would disagree
        raise BadRow("question_type_mismatch")
    if choices:
        answer = match_choice(answer, choices)
    answer_type = (clean_text(read_field(row, paths["answer_type"])) or "").lower()
    answer_type = answer_type if answer_type in ANSWER_TYPES else infer_answer_type(answer, choices)
    precision = clean_precision(read_field(row, paths["precision"]))
    unit = clean_text(read_field(row, paths["unit"]))
    return dict(question=question, answer=answer, choices=choices, question_type=question_type,
                answer_type=answer_type, precision=precision, unit=unit)


def _example_id(row: dict, paths: dict, fields: dict, pixel_digest: str) -> str:
    if paths["id"] is None:  # no id column: the content names the example
        content = f"{fields['question']}\0{fields['answer']}\0{pixel_digest}".encode()
        return hashlib.sha256(content).hexdigest()[:16]
    example_id = clean_text(read_field(row, paths["id"]))
    if example_id is None:
        raise BadRow("missing_id")
    return example_id


def prepare_row(row: dict, index: int, rules: RowRules) -> dict:
    """One raw row → our columns, or `drop_reason` set (bad rows are data, not exceptions)."""
    out: dict[str, Any] = dict.fromkeys(output_columns())
    paths = rules.paths
    try:
        fields = _question_fields(row, paths)
        image, tokens, digest = clean_image(read_field(row, paths["image"]), rules.images, rules.base_dir)
        out.update(fields, id=_example_id(row, paths, fields, digest), image=image, image_tokens=tokens)
        out["prompt"] = conversation(user_text(fields["question"], fields["choices"], fields["unit"],
                                               fields["precision"], fields["answer_type"]))
        out["content_key"] = hashlib.sha256(f"{fields['question']}\0{digest}".encode()).hexdigest()
        if fields["choices"] and len(set(fields["choices"])) != len(fields["choices"]):
            # a benchmark row keeps them (graded by text, docs/reward_logic.md); a policy must not learn them
            out["train_drop_reason"] = "duplicate_choices"
        out.update({name: metadata_value(read_field(row, paths[name])) for name in METADATA_FIELDS})
    except (BadRow, BadImage) as bad:
        out = dict.fromkeys(output_columns())
        out["drop_reason"] = bad.reason
    except Exception as error:  # noqa: BLE001 - a bug on one odd row must not sink the stage; it is counted
        out = dict.fromkeys(output_columns())
        out["drop_reason"] = "unexpected_error"
        logger.warning("row %d: unexpected %s: %s", index, type(error).__name__, error)
    if out["id"] is None:
        out["id"] = clean_text(read_field(row, paths["id"])) if paths["id"] else None
        out["id"] = out["id"] or f"row {index}"
    return out


def output_features():
    from datasets import Features, Image, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({
        "drop_reason": Value("string"),
        "train_drop_reason": Value("string"),
        "id": Value("string"),
        "prompt": List(message),
        "image": Image(),
        "question": Value("string"),
        "answer": Value("string"),
        "choices": List(Value("string")),
        "question_type": Value("string"),
        "answer_type": Value("string"),
        "precision": Value("float64"),
        "unit": Value("string"),
        **{name: Value("string") for name in METADATA_FIELDS},
        "image_tokens": Value("int64"),
        "content_key": Value("string"),
    })


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def image_rules(params: Params) -> ImageRules:
    try:
        return ImageRules.from_params(params).checked()
    except ValueError as error:
        raise PrepareError(str(error)) from None


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def process_source(source: Source, params: Params, work_dir: str):
    """Load one source and clean every row in parallel; returns (processed dataset, rows read)."""
    from datasets import Image as ImageFeature
    from qwen_vl_utils import smart_resize  # noqa: F401 - imported once here, inherited by the forked workers

    raw = load_source(source, work_dir)
    paths = column_paths(source.columns, raw.features, source.name)
    raw = raw.select_columns(sorted({path[0] for path in paths.values() if path}))
    image_column = paths["image"][0]
    if len(paths["image"]) == 1 and isinstance(raw.features[image_column], ImageFeature):
        raw = raw.cast_column(image_column, ImageFeature(decode=False))  # we decode, so a bad file is one bad row
    if params.data.max_rows:
        raw = raw.select(range(min(params.data.max_rows, len(raw))))
    if len(raw) == 0:
        raise PrepareError(f"dataset {describe(source)} has no rows")
    rules = RowRules(paths, image_rules(params), image_base_dir(source))
    num_proc = min(params.data.num_proc, len(raw))
    processed = raw.map(
        prepare_row, with_indices=True, fn_kwargs={"rules": rules}, remove_columns=raw.column_names,
        features=output_features(), num_proc=num_proc if num_proc > 1 else None,
        desc=f"prepare {source.role} rows", load_from_cache_file=False,
        cache_file_name=str(Path(work_dir) / f"{source.role}.arrow"),
        new_fingerprint=_fingerprint(source, rules, num_proc),
    )
    return processed, len(raw)


def write_split(parts: list, path: Path) -> str:
    """Atomic write; row groups of a fixed size so the bytes do not depend on num_proc. Returns sha256."""
    from datasets import concatenate_datasets

    subset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    subset = subset.remove_columns(list(HELPER_COLUMNS)).flatten_indices()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    subset.to_parquet(str(tmp), batch_size=ROW_GROUP_ROWS)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _select_split(processed: list, candidates: list[Candidate], split: str) -> list:
    parts = []
    for index, dataset in enumerate(processed):
        rows = [c.row for c in candidates if c.source == index and c.split == split]
        if rows:
            parts.append(dataset.select(rows))
    return parts


def _stats(values: Sequence[int]) -> dict:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 1)}


def build_report(sources, rows_read, candidates, ledger, counter, budget, params, hashes) -> dict:
    splits = Counter(c.split for c in candidates)
    return {
        "rows_in": sum(rows_read),
        "rows_kept": len(candidates),
        "train_rows": splits["train"],
        "eval_rows": splits["eval"],
        "dropped": dict(sorted(ledger.dropped.items())),
        "dropped_examples": dict(sorted(ledger.examples.items())),
        "split": "eval_source" if params.data.eval_source else f"hash(id, seed={params.seed})",
        "sources": {s.role: {"source": s.name, **reading(s), "rows": n}
                    for s, n in zip(sources, rows_read, strict=True)},
        "image_tokens": _stats([c.image_tokens for c in candidates]),
        "prompt_tokens": {**_stats([c.prompt_tokens for c in candidates]), "method": counter.method,
                          "budget": budget},
        "sha256": hashes,
    }


def prepare(params: Params, out_dir: Path) -> dict:
    """Both splits written under out_dir; returns the data report. Raises PrepareError when unusable."""
    sources = sources_of(params.data)
    image_rules(params)  # a bad uniform_size stops the stage before any data is read
    budget = params.model.max_model_len - params.train.max_completion_length
    if budget <= 0:
        raise PrepareError(f"model.max_model_len ({params.model.max_model_len}) leaves no room for a prompt "
                           f"next to train.max_completion_length ({params.train.max_completion_length})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out_dir.parent) as work_dir:
        processed, rows_read = zip(*(process_source(s, params, work_dir) for s in sources), strict=True)
        ledger = Ledger()
        per_source = []
        for index, (source, dataset) in enumerate(zip(sources, processed, strict=True)):
            light = dataset.select_columns(["drop_reason", "train_drop_reason", "id", "prompt", "image_tokens",
                                            "content_key"]).to_dict()
            per_source.append(row_candidates(light, index, "eval:" if source.role == "eval" else "", ledger))
        if len(per_source) == 2:
            check_id_collisions(*per_source)
        counter = PromptTokenCounter(params.model)
        candidates = length_filter([c for part in per_source for c in part], counter, budget, ledger)
        assign_splits(candidates, [s.role for s in sources], params.seed, params.data.eval_fraction)
        candidates = drop_cross_split_duplicates(drop_untrainable(candidates, ledger), ledger)
        _check_usable(candidates, ledger, sources)
        check_disjoint(candidates)
        hashes = {f"{split}.parquet": write_split(_select_split(list(processed), candidates, split),
                                                  out_dir / f"{split}.parquet") for split in ("train", "eval")}
        suite = prepare_suite(params.evaluate.suite, image_rules(params), out_dir, work_dir)
    report = build_report(sources, rows_read, candidates, ledger, counter, budget, params, hashes)
    return {**report, "suite": suite} if suite else report


def _check_usable(candidates: list[Candidate], ledger: Ledger, sources: list[Source]) -> None:
    if not candidates:
        names = " and ".join(repr(s.name) for s in sources)
        raise PrepareError(f"no usable rows in {names}: dropped {dict(ledger.dropped)}, e.g. {ledger.examples}")
    for split in ("train", "eval"):
        if not any(c.split == split for c in candidates):
            raise PrepareError(f"the {split} split is empty ({len(candidates)} usable rows; check "
                               f"data.eval_fraction or data.eval_source). Dropped: {dict(ledger.dropped)}")


def main() -> None:
    params = load_params_or_exit()
    lineage.check_stage_or_exit(params, "prepare")
    logs.configure()
    out_dir = params.output_dir / "data"
    try:
        report = prepare(params, out_dir)
    except (PrepareError, SuiteError) as error:
        raise SystemExit(f"prepare: error: {error}") from None
    Reports.data.parent.mkdir(parents=True, exist_ok=True)
    Reports.data.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("train %d rows, eval %d rows, dropped %s; prompt tokens ≤ %d (%s) → %s", report["train_rows"],
                report["eval_rows"], report["dropped"] or "none", report["prompt_tokens"]["max"],
                report["prompt_tokens"]["method"], out_dir)


if __name__ == "__main__":
    main()
