"""prepare stage: a dataset in MathVista's schema → leak-free train/eval parquet with prompts.

The Hub's MathVista and the embedded synthetic dataset go through this same code. Bad rows are
dropped and counted by reason in data_report.json; they never crash the stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.params import DataParams, ModelParams, Params, load_params_or_exit
from pipeline.prompts import conversation, user_text

logger = logging.getLogger("pipeline.prepare")

MAX_ASPECT_RATIO = 200  # Qwen's processors refuse images beyond this aspect ratio
METADATA_FIELDS = ("category", "context", "grade", "skills", "source", "task")
REPORT_EXAMPLES = 5


class PrepareError(RuntimeError):
    pass


def split_of(example_id: str, seed: int, eval_fraction: float) -> str:
    """Deterministic and independent of row order: the same id always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


def load_source(data: DataParams):
    """A Hub dataset id, a local dataset folder, or a single parquet/json(l) file."""
    from datasets import load_dataset

    source = data.source
    path = Path(source)
    if path.is_file():
        builder = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(path.suffix)
        if builder is None:
            raise PrepareError(f"{source}: unsupported file type {path.suffix!r} (use parquet, json or jsonl)")
        return load_dataset(builder, data_files=str(path), split="train")
    try:
        return load_dataset(source, data.config, split=data.split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as error:
        raise PrepareError(
            f"dataset {source!r} (split {data.split!r}) is not available here: {str(error).splitlines()[0]}. "
            "Download it first or point data.source at a local copy."
        ) from None


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _clean_image(image: Any, model: ModelParams):
    """EXIF orientation, RGB, and Qwen's own resize rule (qwen-vl-utils), aspect ratio preserved."""
    from PIL import Image, ImageOps
    from qwen_vl_utils import smart_resize

    if isinstance(image, dict):  # undecoded datasets Image: {"bytes":…, "path":…}
        raw = image.get("bytes")
        image = Image.open(io.BytesIO(raw)) if raw else Image.open(image["path"])
    if image is None:
        raise ValueError("missing image")
    image = ImageOps.exif_transpose(image).convert("RGB")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError("zero-size image")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio above {MAX_ASPECT_RATIO}")
    new_height, new_width = smart_resize(height, width, factor=model.image_factor,
                                         min_pixels=model.min_pixels, max_pixels=model.max_pixels)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _choices(value: Any) -> list[str] | None:
    if _missing(value):
        return None
    return [str(choice) for choice in value] or None


def _precision(value: Any) -> float | None:
    if _missing(value):
        return None
    precision = float(value)
    if not (precision >= 0 and precision.is_integer()):
        raise ValueError(f"unusable precision {value!r}")
    return precision


def prepare_row(row: dict, model: ModelParams) -> dict:
    """One raw MathVista-schema row → our columns; `drop_reason` is set instead of raising."""
    out = {"drop_reason": None}
    try:
        example_id = str(row.get("pid") if not _missing(row.get("pid")) else "")
        if not example_id:
            raise ValueError("missing id")
        question, answer = row.get("question"), row.get("answer")
        if _missing(question) or not str(question).strip():
            raise ValueError("empty question")
        if _missing(answer):
            raise ValueError("missing answer")
        choices = _choices(row.get("choices"))
        if choices and str(answer) not in choices:
            raise ValueError("answer not among choices")
        precision = _precision(row.get("precision"))
        unit = None if _missing(row.get("unit")) else str(row.get("unit"))
        image = row.get("decoded_image")
        try:
            image = _clean_image(image, model)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - any decoder failure is a bad row
            raise ValueError("unreadable image") from error
        metadata = row.get("metadata") or {}
        out.update(
            id=example_id,
            prompt=conversation(user_text(str(question), choices, unit, precision)),
            image=image,
            question=str(question),
            answer=str(answer),
            choices=choices,
            question_type=str(row.get("question_type") or ("multi_choice" if choices else "free_form")),
            answer_type=str(row.get("answer_type") or "text"),
            precision=precision,
            unit=unit,
            **{field: _metadata_value(metadata.get(field)) for field in METADATA_FIELDS},
        )
    except ValueError as error:
        out["drop_reason"] = str(error).split(":")[0]
        out["id"] = str(row.get("pid"))
    return out


def _metadata_value(value: Any) -> str | None:
    if _missing(value):
        return None
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def output_features():
    from datasets import Features, Image, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features({
        "drop_reason": Value("string"),
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
        **{field: Value("string") for field in METADATA_FIELDS},
    })


def prepare(params: Params, out_dir: Path) -> dict:
    from datasets import Image as ImageFeature

    raw = load_source(params.data)
    if "decoded_image" in raw.column_names:
        raw = raw.cast_column("decoded_image", ImageFeature(decode=False))
    if params.data.max_rows:
        raw = raw.select(range(min(params.data.max_rows, len(raw))))
    processed = raw.map(
        prepare_row, fn_kwargs={"model": params.model}, remove_columns=raw.column_names,
        features=output_features(), num_proc=params.data.num_proc if len(raw) > 64 else None,
        desc="prepare rows", load_from_cache_file=False,
    )
    dropped = Counter(reason for reason in processed["drop_reason"] if reason)
    examples: dict[str, list[str]] = {}
    for reason, example_id in zip(processed["drop_reason"], processed["id"], strict=False):
        if reason and len(examples.setdefault(reason, [])) < REPORT_EXAMPLES:
            examples[reason].append(example_id)
    kept = processed.filter(lambda reason: reason is None, input_columns="drop_reason")
    kept = kept.remove_columns("drop_reason")
    if len(kept) == 0:
        raise PrepareError(f"no usable rows in {params.data.source!r}: dropped {dict(dropped)}")
    ids = kept["id"]
    if len(set(ids)) != len(ids):
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)[:REPORT_EXAMPLES]
        raise PrepareError(f"duplicate example ids in {params.data.source!r}, e.g. {duplicates}")
    splits = [split_of(i, params.seed, params.data.eval_fraction) for i in ids]
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in ("train", "eval"):
        subset = kept.select([i for i, s in enumerate(splits) if s == split])
        if len(subset) == 0:
            raise PrepareError(f"the {split} split is empty: {len(kept)} rows, "
                               f"eval_fraction={params.data.eval_fraction}")
        tmp = out_dir / f".{split}.parquet.tmp"
        subset.to_parquet(str(tmp))
        os.replace(tmp, out_dir / f"{split}.parquet")
        sizes[split] = len(subset)
    report = {
        "rows_in": len(raw),
        "rows_kept": len(kept),
        "train_rows": sizes["train"],
        "eval_rows": sizes["eval"],
        "dropped": dict(sorted(dropped.items())),
        "dropped_examples": dict(sorted(examples.items())),
    }
    return report


def main() -> None:
    params = load_params_or_exit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out_dir = params.output_dir / "data"
    try:
        report = prepare(params, out_dir)
    except PrepareError as error:
        raise SystemExit(f"prepare: error: {error}") from None
    (params.output_dir / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("train %d rows, eval %d rows, dropped %s → %s", report["train_rows"], report["eval_rows"],
                report["dropped"] or "none", out_dir)


if __name__ == "__main__":
    main()
