"""prepare stage: any visual-QA dataset → leak-free train/eval parquet with prompts and clean images.

One code path for the Hub's MathVista, local parquet/json(l)/image folders and the embedded synthetic
dataset: `data.columns` maps a dataset's columns onto ours. Rows are cleaned in parallel
(`datasets.map`, `data.num_proc` workers); a bad row is dropped and counted by reason in
data_report.json, never a crash. Decisions that need every row (duplicate ids, the length filter,
the split, cross-split leaks) are taken afterwards in the main process on light columns only, so
the output does not depend on how the rows were sharded: same inputs and params, same bytes.
Why each rule exists is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import logs
from pipeline.images import BadImage, ImageRules, clean_image
from pipeline.params import ColumnMap, DataParams, ModelParams, Params, Reports, load_params_or_exit
from pipeline.prompts import conversation, user_text

logger = logging.getLogger("pipeline.prepare")

METADATA_FIELDS = ("category", "context", "grade", "language", "skills", "source", "task")
REQUIRED_COLUMNS = ("question", "image", "answer")
HELPER_COLUMNS = ("drop_reason", "train_drop_reason", "image_tokens", "content_key")
REPORT_EXAMPLES = 5
IMAGE_PLACEHOLDER_RE = re.compile(r"<image>")
MAX_ROW_PRECISION = 10  # a row's precision (decimal places) above this is a data error: the row is dropped
TEMPLATE_SLACK = 16  # tokens a model's own chat template may add beyond plain ChatML (upper-bound count only)
ROW_GROUP_ROWS = 100  # fixed parquet row groups: the file layout never depends on num_proc
ANSWER_TYPES = ("integer", "float", "text", "list")
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


class PrepareError(RuntimeError):
    """The stage cannot produce a usable dataset; the message says what to change."""


class BadRow(ValueError):
    """One row is unusable; `reason` is the key it is counted under in data_report.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def split_of(example_id: str, seed: int, eval_fraction: float) -> str:
    """Deterministic and independent of row order: the same id always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    role: str  # "all" (split by hash), "train" or "eval"
    name: str
    config: str | None
    split: str
    format: str
    columns: ColumnMap


def sources_of(data: DataParams) -> list[Source]:
    if data.eval_source is None:
        return [Source("all", data.source, data.config, data.split, data.format, data.columns)]
    other = data.eval_source
    return [Source("train", data.source, data.config, data.split, data.format, data.columns),
            Source("eval", other.source, other.config, other.split, other.format, other.columns)]


def source_format(source: Source) -> str:
    """`auto`: a local file by its suffix, a local folder by what `load_dataset` infers, else the Hub."""
    if source.format != "auto":
        return source.format
    path = Path(source.name)
    if path.is_file():
        if path.suffix not in LOCAL_FORMATS:
            raise PrepareError(f"{source.name}: unsupported file type {path.suffix!r} (parquet, json or jsonl)")
        return LOCAL_FORMATS[path.suffix]
    return "folder" if path.is_dir() else "hub"


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
            return load_dataset(source.name, source.config, split=source.split)
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
            f"dataset {source.name!r} (config {source.config!r}, split {source.split!r}, format {kind}) "
            f"cannot be loaded here: {first_line}. Download it first or point the source at a local copy."
        ) from None


# ---------------------------------------------------------------------------------------------
# column map
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# row values
# ---------------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _as_list(value: Any) -> list | None:
    """A real sequence, or a string holding one (`'["a", "b"]'` from json/csv exports); else None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return None
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy arrays from pandas-backed sources
    return list(value) if isinstance(value, (list, tuple)) else None


def clean_text(value: Any) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return _number_text(value)
    return str(value).strip() or None


def clean_gold_answer(value: Any) -> str:
    """A list answer becomes `[a, b]` (the form scoring parses); numbers lose a spurious `.0`."""
    items = _as_list(value) if not isinstance(value, str) else None
    if items is not None:
        if not items:
            raise BadRow("missing_answer")
        return "[" + ", ".join(clean_text(item) or "" for item in items) + "]"
    text = clean_text(value)
    if text is None:
        raise BadRow("missing_answer")
    return text


def clean_choices(value: Any) -> list[str] | None:
    if _missing(value):
        return None
    items = _as_list(value)
    if items is None:
        raise BadRow("unparseable_choices")
    choices = [clean_text(item) or "" for item in items]
    if not choices:
        return None
    if any(not choice for choice in choices):
        raise BadRow("empty_choice")
    return choices  # repeated options are kept for evaluation, dropped for training (`train_drop_reason`)


def match_choice(answer: str, choices: list[str]) -> str:
    """The gold answer as an option's text: exact, then case/space-insensitive, then a bare letter."""
    if answer in choices:
        return answer
    folded = [" ".join(choice.lower().split()) for choice in choices]
    key = " ".join(answer.lower().split())
    if folded.count(key) == 1:
        return choices[folded.index(key)]
    letter = answer.strip("() .").upper()
    if len(letter) == 1 and "A" <= letter < chr(65 + len(choices)):
        return choices[ord(letter) - 65]
    raise BadRow("answer_not_in_choices")


def clean_precision(value: Any) -> float | None:
    if _missing(value):
        return None
    try:
        precision = float(value)
    except (TypeError, ValueError):
        raise BadRow("unparseable_precision") from None
    if not (math.isfinite(precision) and precision.is_integer() and 0 <= precision <= MAX_ROW_PRECISION):
        raise BadRow("unparseable_precision")
    return precision


def infer_answer_type(answer: str, choices: list[str] | None) -> str:
    if choices:
        return "text"
    if answer.startswith("[") and answer.endswith("]"):
        return "list"
    try:
        number = float(answer)
    except ValueError:
        return "text"
    if not math.isfinite(number):
        return "text"
    return "integer" if number.is_integer() and "." not in answer else "float"


def metadata_value(value: Any) -> str | None:
    """Flat strings for per-category evaluation: lists joined with ', ', structs as sorted JSON."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    items = _as_list(value) if not isinstance(value, str) else None
    if items is not None:
        return ", ".join(str(item) for item in items) or None
    return clean_text(value)


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
# prompt length
# ---------------------------------------------------------------------------------------------
def _offline_tokenizer(name: str, revision: str):
    """The model's tokenizer if it is already on this machine; never a download."""
    path = Path(name)
    try:
        if path.is_dir():
            if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                return None
        else:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(name, "tokenizer_config.json", revision=revision), str):
                return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - no tokenizer means the conservative estimate, not a failure
        logger.warning("tokenizer of %s not loadable offline (%s)", name, error)
        return None


def chatml_segments(prompt: Sequence[dict]) -> list[tuple[str, bool]]:
    """Qwen's ChatML rendering as (text, is_special_token) pieces, one image placeholder in the user turn."""
    pieces: list[tuple[str, bool]] = []
    for message in prompt:
        pieces += [("<|im_start|>", True), (f"{message['role']}\n", False)]
        if message["role"] == "user":
            pieces += [("<|vision_start|>", True), ("<|image_pad|>", True), ("<|vision_end|>", True)]
        pieces += [(message["content"], False), ("<|im_end|>", True), ("\n", False)]
    return pieces + [("<|im_start|>", True), ("assistant\n", False)]


class PromptTokenCounter:
    """Prompt length in tokens, image tokens included.

    With the model's tokenizer on this machine: exact (its chat template, the one image placeholder
    replaced by the image's token count). Without it: an upper bound, one token per UTF-8 byte of the
    text (a byte-level BPE like Qwen's never needs more), so the filter can only drop too much, never
    let an over-long prompt through.
    """

    def __init__(self, model: ModelParams):
        self.tokenizer = _offline_tokenizer(model.name_or_path, model.revision)
        self.method = "tokenizer" if self.tokenizer is not None else "utf8_upper_bound"

    def count(self, prompts: Sequence[Sequence[dict]], image_tokens: Sequence[int]) -> list[int]:
        if not prompts:
            return []
        if self.tokenizer is not None:
            try:
                return self._exact(prompts, image_tokens)
            except Exception as error:  # noqa: BLE001 - a template that cannot render our prompts: estimate
                logger.warning("counting with the tokenizer failed (%s); using the upper bound", error)
                self.tokenizer, self.method = None, "utf8_upper_bound"
        return [self._upper_bound(p) + n for p, n in zip(prompts, image_tokens, strict=True)]

    def _exact(self, prompts: Sequence[Sequence[dict]], image_tokens: Sequence[int]) -> list[int]:
        texts = [self._render(prompt) for prompt in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        counts = []
        for row_ids, n in zip(ids, image_tokens, strict=True):
            placeholders = row_ids.count(pad)
            counts.append(len(row_ids) - placeholders + n + (0 if placeholders else 2))
        return counts

    def _render(self, prompt: Sequence[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return "".join(text for text, _ in chatml_segments(prompt))
        messages = [
            {"role": m["role"], "content": [{"type": "image"}, {"type": "text", "text": m["content"]}]}
            if m["role"] == "user" else {"role": m["role"], "content": m["content"]}
            for m in prompt
        ]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @staticmethod
    def _upper_bound(prompt: Sequence[dict]) -> int:
        text_tokens = sum(1 if special else len(text.encode()) for text, special in chatml_segments(prompt)
                          if text != "<|image_pad|>")
        return text_tokens + TEMPLATE_SLACK


# ---------------------------------------------------------------------------------------------
# whole-dataset decisions (main process, light columns only)
# ---------------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Dropped rows by reason, with a few example ids each: the data report's core."""

    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, example_id: str) -> None:
        self.dropped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < REPORT_EXAMPLES:
            ids.append(example_id)


@dataclass
class Candidate:
    source: int  # index into the list of sources
    row: int  # row index in that source's processed dataset
    id: str
    prompt: list
    image_tokens: int
    content_key: str
    label: str  # how the report names it (eval-source rows are prefixed, ids may repeat across sources)
    train_drop_reason: str | None = None  # usable for evaluation, not for training
    split: str = ""
    prompt_tokens: int = 0


def row_candidates(light: dict[str, list], source_index: int, prefix: str, ledger: Ledger) -> list[Candidate]:
    """Rows that passed the row checks; later duplicates of an id are dropped (the first one wins)."""
    seen: set[str] = set()
    kept = []
    for row, reason in enumerate(light["drop_reason"]):
        example_id = light["id"][row]
        if reason is None and example_id in seen:
            reason = "duplicate_id"
        if reason is not None:
            ledger.drop(reason, prefix + example_id)
            continue
        seen.add(example_id)
        kept.append(Candidate(source_index, row, example_id, light["prompt"][row], light["image_tokens"][row],
                              light["content_key"][row], prefix + example_id, light["train_drop_reason"][row]))
    return kept


def check_id_collisions(train: list[Candidate], evaluation: list[Candidate]) -> None:
    shared = sorted({c.id for c in train} & {c.id for c in evaluation})
    if shared:
        raise PrepareError(
            f"{len(shared)} example id(s) appear in both the training source and data.eval_source, e.g. "
            f"{shared[:REPORT_EXAMPLES]}: the evaluation would not be held out. Remove them from one source "
            "or map data.columns.id to a column that is unique across both."
        )


def length_filter(candidates: list[Candidate], counter: PromptTokenCounter, budget: int,
                  ledger: Ledger) -> list[Candidate]:
    counts = counter.count([c.prompt for c in candidates], [c.image_tokens for c in candidates])
    kept = []
    for candidate, count in zip(candidates, counts, strict=True):
        candidate.prompt_tokens = count
        if count > budget:
            ledger.drop("prompt_too_long", candidate.label)
        else:
            kept.append(candidate)
    return kept


def assign_splits(candidates: list[Candidate], roles: Sequence[str], seed: int, eval_fraction: float) -> None:
    for candidate in candidates:
        role = roles[candidate.source]
        candidate.split = split_of(candidate.id, seed, eval_fraction) if role == "all" else role


def drop_untrainable(candidates: list[Candidate], ledger: Ledger) -> list[Candidate]:
    """Rows an evaluation grades but training should not see (repeated options): dropped from train only."""
    kept = []
    for candidate in candidates:
        if candidate.split == "train" and candidate.train_drop_reason:
            ledger.drop(candidate.train_drop_reason, candidate.label)
        else:
            kept.append(candidate)
    return kept


def drop_cross_split_duplicates(candidates: list[Candidate], ledger: Ledger) -> list[Candidate]:
    """Same question on the same picture under another id would leak the eval answer into training."""
    eval_keys = {c.content_key for c in candidates if c.split == "eval"}
    kept = []
    for candidate in candidates:
        if candidate.split == "train" and candidate.content_key in eval_keys:
            ledger.drop("duplicate_of_eval_row", candidate.label)
        else:
            kept.append(candidate)
    return kept


def check_disjoint(candidates: list[Candidate]) -> None:
    """The guarantee itself, checked on what is about to be written, whatever produced it."""
    train = [c for c in candidates if c.split == "train"]
    held_out = [c for c in candidates if c.split == "eval"]
    if {c.id for c in train} & {c.id for c in held_out} or {c.content_key for c in train} & {
            c.content_key for c in held_out}:
        raise PrepareError("internal error: an example is in both splits")


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
        raise PrepareError(f"dataset {source.name!r} (split {source.split!r}) has no rows")
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
        "sources": {s.role: {"source": s.name, "config": s.config, "split": s.split, "rows": n}
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
    return build_report(sources, rows_read, candidates, ledger, counter, budget, params, hashes)


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
    logs.configure()
    out_dir = params.output_dir / "data"
    try:
        report = prepare(params, out_dir)
    except PrepareError as error:
        raise SystemExit(f"prepare: error: {error}") from None
    Reports.data.parent.mkdir(parents=True, exist_ok=True)
    Reports.data.write_text(json.dumps(report, indent=2) + "\n")
    logger.info("train %d rows, eval %d rows, dropped %s; prompt tokens ≤ %d (%s) → %s", report["train_rows"],
                report["eval_rows"], report["dropped"] or "none", report["prompt_tokens"]["max"],
                report["prompt_tokens"]["method"], out_dir)


if __name__ == "__main__":
    main()
