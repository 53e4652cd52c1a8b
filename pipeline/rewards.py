"""Reward functions for GRPO and the registry that `params.yaml` selects from.

Each function follows TRL's reward signature: `completions` (conversational messages or plain
strings) plus every dataset column as a keyword argument, one float per completion. `REWARD_FUNCS`
maps the names used in `params.yaml` to functions; a name of the form `package.module:function`
loads a user's own. The seed's names (`*_reward_func`) stay importable so old configs keep working.

GRPO optimises exactly what these pay for, so each is written against the ways a policy games it:
format rewards read the tag sequence (not a regex over the whole text, which needed DOTALL, broke
on a leading space and could pay tags in any order) and never pay an empty answer; correctness is
`pipeline.scoring.is_correct`, the grader the evaluation stage uses. Rewards never raise and stay in
a fixed range whatever the model writes. Every rule, with examples the tests check, is in
docs/reward_logic.md.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.scoring import completion_text, extract_answer, is_correct

RewardFunc = Callable[..., list[float]]

REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<reasoning>", "</reasoning>", "<answer>", "</answer>"
TAGS = (REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_TAG_RE = re.compile(r"</?(?:reasoning|answer)>")

XML_TAG_CREDIT = 0.125  # per tag; four tags make xmlcount's maximum 0.5
XML_TRAILING_PENALTY = 0.001  # per non-space character after </answer> …
XML_TRAILING_CAP = 0.125  # … capped, so rambling costs at most one tag's credit and the reward stays >= 0


def _texts(completions: Any) -> list[str]:
    if completions is None or isinstance(completions, (str, bytes)):
        return [completion_text(completions)] if isinstance(completions, str) else []
    try:
        return [completion_text(completion) for completion in completions]
    except TypeError:
        return []


def _tags(text: str) -> list[tuple[str, int, int]]:
    return [(match.group(), match.start(), match.end()) for match in _TAG_RE.finditer(text)]


def _blocks_at(text: str, tags: list[tuple[str, int, int]], i: int) -> tuple[str, str] | None:
    """(reasoning, answer) when tags[i:i+4] are the four tags in order with only space between the blocks."""
    window = tags[i:i + 4]
    if len(window) < 4 or tuple(tag for tag, _, _ in window) != TAGS:
        return None
    (_, _, r_start), (_, r_end, r_close), (_, a_open, a_start), (_, a_end, _) = window
    if text[r_close:a_open].strip():
        return None
    return text[r_start:r_end], text[a_start:a_end]


def strict_format(text: str) -> float:
    """1.0 for exactly one reasoning block then one answer block, both non-empty, nothing else but space."""
    tags = _tags(text)
    if len(tags) != 4:
        return 0.0
    blocks = _blocks_at(text, tags, 0)
    if blocks is None or not blocks[0].strip() or not blocks[1].strip():
        return 0.0
    if text[:tags[0][1]].strip() or text[tags[3][2]:].strip():
        return 0.0
    return 1.0


def soft_format(text: str) -> float:
    """1.0 when a reasoning block is directly followed by a non-empty answer block, anywhere in the text."""
    tags = _tags(text)
    for i, (tag, _, _) in enumerate(tags):
        if tag == REASONING_OPEN:
            blocks = _blocks_at(text, tags, i)
            if blocks is not None and blocks[1].strip():
                return 1.0
    return 0.0


def xml_count(text: str) -> float:
    """Dense shaping in [0, 0.5]: 0.125 per tag that appears exactly once and after the tags before it
    in the canonical order, less 0.001 per character after `</answer>` (at most 0.125)."""
    score = 0.0
    last = -1
    for tag in TAGS:
        if text.count(tag) == 1:
            position = text.find(tag)
            if position > last:
                score += XML_TAG_CREDIT
                last = position
    if text.count(ANSWER_CLOSE) == 1:
        trailing = len(text.split(ANSWER_CLOSE, 1)[1].strip())
        score -= min(trailing * XML_TRAILING_PENALTY, XML_TRAILING_CAP)
    return min(max(score, 0.0), 4 * XML_TAG_CREDIT)


def _safe(rule: Callable[[str], float], text: str) -> float:
    try:
        return rule(text)
    except Exception:  # noqa: BLE001 - a reward that raises stops the run for one odd sample
        return 0.0


def strict_format_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 for exactly `<reasoning>…</reasoning><answer>…</answer>` (space around allowed), else 0.0."""
    return [_safe(strict_format, text) for text in _texts(completions)]


def soft_format_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when a reasoning block is followed by a non-empty answer block anywhere in the text, else 0.0."""
    return [_safe(soft_format, text) for text in _texts(completions)]


def xmlcount_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """In [0, 0.5]: helps a model that has never written the tags find them, one tag at a time."""
    return [_safe(xml_count, text) for text in _texts(completions)]


ROW_COLUMNS = ("answer", "choices", "question_type", "answer_type", "precision", "unit")


def _column_value(values: Any, i: int) -> Any:
    """Item i of a batched column (list, tuple, numpy array), or None when it is missing or too short."""
    if values is None or isinstance(values, (str, bytes, Mapping)):
        return None
    try:
        return values[i] if 0 <= i < len(values) else None
    except Exception:  # noqa: BLE001 - an odd column is a missing value, not a crash
        return None


def correctness_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the last `<answer>` block grades correct against its row (pipeline.scoring), else 0.0.

    TRL passes each dataset column as a list with one value per completion, named as in MathVista."""
    rewards = []
    for i, text in enumerate(_texts(completions)):
        row = {name: _column_value(columns.get(name), i) for name in ROW_COLUMNS}
        try:
            rewards.append(1.0 if is_correct(extract_answer(text), row) else 0.0)
        except Exception:  # noqa: BLE001 - is_correct never raises; this keeps the promise if it ever did
            rewards.append(0.0)
    return rewards


REWARD_FUNCS: dict[str, RewardFunc] = {
    "xmlcount": xmlcount_reward_func,
    "soft_format": soft_format_reward_func,
    "strict_format": strict_format_reward_func,
    "correctness": correctness_reward_func,
}
REWARD_RANGES: dict[str, tuple[float, float]] = {
    "xmlcount": (0.0, 4 * XML_TAG_CREDIT),
    "soft_format": (0.0, 1.0),
    "strict_format": (0.0, 1.0),
    "correctness": (0.0, 1.0),
}


class RewardLookupError(ValueError):
    """A reward name in params that names no function; raised before training starts."""


def get_reward_func(name: str) -> RewardFunc:
    """A registered name, or `package.module:function` for a user's own reward."""
    if not isinstance(name, str):
        raise RewardLookupError(f"reward name must be a string, got {type(name).__name__}")
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise RewardLookupError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_FUNCS))}, "
                                "or 'package.module:function'")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise RewardLookupError(f"cannot load reward {name!r}: {error}") from None
    if not callable(func):
        raise RewardLookupError(f"reward {name!r} is not callable")
    return func


def resolve_rewards(weights: Mapping[str, float]) -> tuple[list[RewardFunc], list[float]]:
    """Functions and weights in params order, ready for GRPOTrainer(reward_funcs=…, reward_weights=…)."""
    funcs, floats = [], []
    for name, weight in weights.items():
        value = float(weight)
        if not math.isfinite(value):
            raise RewardLookupError(f"weight of reward {name!r} must be a finite number, got {weight!r}")
        funcs.append(get_reward_func(name))
        floats.append(value)
    return funcs, floats
