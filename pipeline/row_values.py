"""One row's values, cleaned: the text fields, the gold answer, choices, precision and answer type.

Every function takes what a dataset column holds (strings, numbers, lists, numpy arrays, JSON or
Python-literal strings) and returns the form the prepared split stores, or raises `BadRow` with the
reason the row is counted under. Why each rule exists is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

import ast
import json
import math
from typing import Any

from pipeline.images import is_missing
from pipeline.prepare_errors import BadRow

MAX_ROW_PRECISION = 10  # a row's precision (decimal places) above this is a data error: the row is dropped


ANSWER_TYPES = ("integer", "float", "text", "list")




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
    if is_missing(value):
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
    if is_missing(value):
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
    if is_missing(value):
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
    """Flat strings for per-category evaluation: lists joined with ', ' (also a list written as text,
    `'["a", "b"]'`, as CSV holds it), structs as sorted JSON."""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    items = _as_list(value) if not isinstance(value, str) or value.lstrip().startswith("[") else None
    if items is not None:
        return ", ".join(str(item) for item in items) or None
    return clean_text(value)

