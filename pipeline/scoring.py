"""Answer extraction and grading: the one function training, evaluation and inference share.

`is_correct(prediction, row)` grades the text inside `<answer>…</answer>` against a row in
MathVista's schema (answer, choices, question_type, answer_type, precision, unit). It follows
MathVista's rules where they are sound and is stricter where they would pay a policy for nothing:
MathVista maps any unmatched text to the nearest option by edit distance; here an answer that is
empty, garbage or names several options is wrong. Pure Python, never raises, no heavy imports.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 1000  # longer "answers" are listings, not answers; bounds the work per completion

_LETTER_RE = re.compile(r"^\(?([A-Z])[).:]?$")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_FRAC_RE = re.compile(r"^\\d?frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}$")
_NUMBER_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_TRAILING_PUNCT = ".,;:!?"


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as `[{"role": "assistant", "content": ...}]`."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content")
        if isinstance(content, list):  # multimodal content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return content if isinstance(content, str) else ""
    return ""


def extract_answer(text: str | None) -> str | None:
    """The stripped text of the last `<answer>` block, or None when there is none."""
    if not text:
        return None
    matches = ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _normalise_text(text: str, unit: str | None = None) -> str:
    text = _BOXED_RE.sub(r"\1", text).strip().strip("$").strip()
    text = text.rstrip(_TRAILING_PUNCT).strip()
    if unit and text.lower().endswith(unit.lower()):
        text = text[: -len(unit)].strip()
    return " ".join(text.lower().split())


def parse_number(text: str, unit: str | None = None) -> float | None:
    """A number written with units, thousands commas, %, `\\boxed{}` or `\\frac{a}{b}`; None otherwise."""
    text = _normalise_text(text, unit)
    text = text.replace(",", "").replace("%", "").strip()
    # a trailing unit word (e.g. "5 cm") when the row names no unit
    parts = text.split()
    if len(parts) == 2 and _NUMBER_RE.match(parts[0]) and parts[1].isalpha():
        text = parts[0]
    if _NUMBER_RE.match(text):
        value = float(text)
        return value if math.isfinite(value) else None
    frac = _FRAC_RE.match(text.replace(" ", ""))
    if frac and float(frac.group(2)) != 0:
        return float(frac.group(1)) / float(frac.group(2))
    return None


def _precision(value: Any) -> int | None:
    if _is_missing(value):
        return None
    try:
        digits = int(float(value))
    except (TypeError, ValueError):
        return None
    return digits if 0 <= digits <= 12 else None


def _numbers_equal(predicted: float, gold: float, answer_type: str, precision: int | None) -> bool:
    if answer_type == "integer":
        return predicted == gold and float(predicted).is_integer()
    if precision is not None:
        return round(predicted, precision) == round(gold, precision)
    return math.isclose(predicted, gold, rel_tol=1e-6, abs_tol=1e-9)


def _choice_index(prediction: str, choices: Sequence[str], unit: str | None) -> int | None:
    """The one option the prediction names, by letter or by text; None if it names none or several."""
    letter = _LETTER_RE.match(prediction.strip().rstrip(".").strip())
    if letter:
        index = ord(letter.group(1)) - ord("A")
        return index if index < len(choices) else None
    normalised = _normalise_text(prediction, unit)
    hits = [i for i, choice in enumerate(choices) if _normalise_text(str(choice), unit) == normalised]
    return hits[0] if len(hits) == 1 else None


def is_correct(prediction: str | None, row: Mapping[str, Any]) -> bool:
    """Grade an extracted answer against a MathVista-schema row. Never raises."""
    try:
        return _is_correct(prediction, row)
    except Exception:  # noqa: BLE001 - a reward must stay bounded whatever the input
        return False


def _is_correct(prediction: str | None, row: Mapping[str, Any]) -> bool:
    gold = row.get("answer")
    if prediction is None or _is_missing(gold) or len(prediction) > MAX_ANSWER_CHARS:
        return False
    prediction = prediction.strip()
    if not prediction:
        return False
    gold = str(gold)
    unit = None if _is_missing(row.get("unit")) else str(row.get("unit"))
    choices = row.get("choices")
    if row.get("question_type") == "multi_choice" and choices is not None and len(choices) > 0:
        choices = [str(choice) for choice in choices]
        picked = _choice_index(prediction, choices, unit)
        gold_index = _choice_index(gold, choices, unit)
        return picked is not None and picked == gold_index

    answer_type = str(row.get("answer_type") or "text")
    if answer_type in ("integer", "float"):
        predicted, expected = parse_number(prediction, unit), parse_number(gold, unit)
        if predicted is None or expected is None:
            return False
        return _numbers_equal(predicted, expected, answer_type, _precision(row.get("precision")))
    if answer_type == "list":
        predicted_items = [item for item in re.split(r"[,;]", prediction.strip("[]() ")) if item.strip()]
        gold_items = [item for item in re.split(r"[,;]", gold.strip("[]() ")) if item.strip()]
        if len(predicted_items) != len(gold_items):
            return False
        for p_item, g_item in zip(predicted_items, gold_items):
            p_num, g_num = parse_number(p_item, unit), parse_number(g_item, unit)
            if p_num is not None and g_num is not None:
                if not _numbers_equal(p_num, g_num, "float", _precision(row.get("precision"))):
                    return False
            elif _normalise_text(p_item, unit) != _normalise_text(g_item, unit):
                return False
        return True
    return _normalise_text(prediction, unit) == _normalise_text(gold, unit)
