"""Where the prepare stage's rows come from: the sources in params, how each is loaded (Hub,
local parquet/json(l), an image folder), and the column map (`data.columns`) from a dataset's
columns onto ours. Why each rule exists is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.params import ColumnMap, DataParams
from pipeline.prepare_errors import PrepareError

logger = logging.getLogger("pipeline.prepare")

REQUIRED_COLUMNS = ("question", "image", "answer")


LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}



@dataclass(frozen=True)
class Source:
    role: str  # "all" (split by hash), "train" or "eval"
    name: str
    config: str | None
    split: str
    format: str
    columns: ColumnMap
    revision: str = "main"  # Hub sources only



def sources_of(data: DataParams) -> list[Source]:
    if data.eval_source is None:
        return [Source("all", data.source, data.config, data.split, data.format, data.columns, data.revision)]
    other = data.eval_source
    return [Source("train", data.source, data.config, data.split, data.format, data.columns, data.revision),
            Source("eval", other.source, other.config, other.split, other.format, other.columns, other.revision)]



def source_format(source: Source) -> str:
    """`auto`: a local file by its suffix, a local folder by what `load_dataset` infers, else the Hub."""
    if source.format != "auto":
        return source.format
    path = Path(source.name)
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise PrepareError(f"{source.name}: unsupported file type {path.suffix!r} (parquet, json, jsonl or csv)")
        return LOCAL_FORMATS[path.suffix]
    return "folder" if path.is_dir() else "hub"



def reading(source: Source) -> dict[str, str | None]:
    """How a source is read, as the data report and error messages name it. A single local file
    is its own one split and has no configs: `config` and `split` are not used to read it, so they
    are None here (naming them, MathVista's `testmini` by default, would claim a split the file's
    rows never had)."""
    kind = source_format(source)
    if kind != "hub" and Path(source.name).is_file():
        return {"format": kind, "config": None, "split": None, "revision": None}
    return {"format": kind, "config": source.config, "split": source.split,
            "revision": source.revision if kind == "hub" else None}


def describe(source: Source) -> str:
    """A source as a message names it (`'rows.jsonl' (format json)`): only what was used to read
    it, so an error about a local file does not point at a split or config that played no part."""
    used = ", ".join(f"{key} {value!r}" if key != "format" else f"format {value}"
                     for key, value in reading(source).items() if value is not None)
    return f"{source.name!r} ({used})"



def image_base_dir(source: Source) -> str | None:
    """Relative image paths (json rows, MathVista's `image` column) resolve against the source's folder."""
    path = Path(source.name)
    if path.is_file():
        return str(path.parent.resolve())
    return str(path.resolve()) if path.is_dir() else None



def load_source(source: Source, cache_dir: str):
    """Local data is converted into `cache_dir` (deleted after the stage); Hub downloads use the HF cache."""
    from datasets import load_dataset

    kind = source_format(source)
    path = Path(source.name)
    local_cache = {"cache_dir": cache_dir}
    try:
        if kind == "hub":
            return load_dataset(source.name, source.config, split=source.split, revision=source.revision)
        if path.is_file():
            return load_dataset(kind, data_files=str(path), split="train", **local_cache)
        if not path.is_dir():
            raise FileNotFoundError(f"no such file or folder: {source.name}")
        if kind == "folder":
            return load_dataset(str(path), source.config, split=source.split, **local_cache)
        return load_dataset(kind, data_dir=str(path), split=source.split, **local_cache)
    except Exception as error:  # noqa: BLE001 - every way a source can be unusable gets the same clear message
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PrepareError(
            f"dataset {describe(source)} "
            f"cannot be loaded here: {first_line}. Download it first or point the source at a local copy."
        ) from None



def _column_path(spec: str, features) -> tuple[str, ...] | None:
    """`name` if the dataset has that column, else `struct.field` into a struct column, else None."""
    if spec in features:
        return (spec,)
    head, _, rest = spec.partition(".")
    if not rest or head not in features:
        return None
    inner = features[head]
    if isinstance(inner, dict) and rest.split(".")[0] not in inner:
        return None
    return (head, *rest.split("."))



def column_paths(columns: ColumnMap, features, source_name: str) -> dict[str, tuple[str, ...] | None]:
    """Required columns that are missing stop the stage; optional ones are treated as absent, with a warning."""
    paths, missing_required, missing_optional = {}, [], []
    for ours, theirs in columns.model_dump().items():
        paths[ours] = None if theirs is None else _column_path(theirs, features)
        if theirs is not None and paths[ours] is None:
            required = ours in REQUIRED_COLUMNS or ours == "id"
            (missing_required if required else missing_optional).append(f"{ours} → {theirs!r}")
    if missing_required:
        raise PrepareError(
            f"{source_name}: column(s) not found: {', '.join(missing_required)}. Its columns: "
            f"{', '.join(features)}. Map them in data.columns (id may be null: ids are then hashed)."
        )
    if missing_optional:
        logger.warning("%s: no column for %s; treated as absent", source_name, ", ".join(missing_optional))
    return paths



def read_field(row: dict, path: tuple[str, ...] | None) -> Any:
    value: Any = row
    for key in path or ():
        if not isinstance(value, Mapping):  # datasets hands rows over as lazy mappings, structs as dicts
            return None
        value = value.get(key)
    return value if path else None

