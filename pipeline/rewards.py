"""Reward functions for GRPO and the registry that `params.yaml` selects from.

Each function follows TRL's reward signature: `completions` (conversational messages or plain
strings) plus every dataset column as a keyword argument, one float per completion. `REWARD_FUNCS`
maps the names used in `params.yaml` to functions; a name of the form `package.module:function`
loads a user's own. The seed's names (`*_reward_func`) stay importable so old configs keep working.

GRPO optimises exactly what these pay for, so each is written against the ways a policy games it:
format rewards pay the predicates of `pipeline.answer_format` (the tag sequence, never an empty
answer); correctness is `pipeline.scoring.is_correct`, the grader the evaluation stage uses. Rewards
never raise and stay in a fixed range whatever the model writes. Every rule, with examples the tests
check, is in docs/reward_logic.md.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pipeline.answer_format import ANSWER_CLOSE, TAGS, completion_text, extract_answer, is_soft, is_strict
from pipeline.scoring import is_correct

RewardFunc = Callable[..., list[float]]

XML_TAG_CREDIT = 0.125  # per tag; four tags make xmlcount's maximum 0.5
XML_TRAILING_PENALTY = 0.001  # per non-space character after </answer> …
XML_TRAILING_CAP = 0.125  # … capped, so rambling costs at most one tag's credit and the reward stays >= 0


def _texts(completions: Any) -> list[str]:
    if isinstance(completions, str):
        return [completions]
    if completions is None or isinstance(completions, bytes) or not isinstance(completions, Iterable):
        return []
    return [completion_text(completion) for completion in completions]


def _scores(completions: Any, score: Callable[[str, int], float]) -> list[float]:
    """`score(text, i)` for each completion. The rewards' one guard: a completion whose scoring
    raises gets 0.0, since a reward that raises stops the run for one odd sample."""
    scores = []
    for i, text in enumerate(_texts(completions)):
        try:
            scores.append(float(score(text, i)))
        except Exception:  # noqa: BLE001 - see the docstring
            scores.append(0.0)
    return scores


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


def strict_format_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 for exactly `<reasoning>…</reasoning><answer>…</answer>` (space around allowed), else 0.0."""
    return _scores(completions, lambda text, _: is_strict(text))


def soft_format_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when a reasoning block is followed by a non-empty answer block anywhere in the text, else 0.0."""
    return _scores(completions, lambda text, _: is_soft(text))


def xmlcount_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """In [0, 0.5]: helps a model that has never written the tags find them, one tag at a time."""
    return _scores(completions, lambda text, _: xml_count(text))


ROW_COLUMNS = ("answer", "choices", "question_type", "answer_type", "precision", "unit")


def _column_value(values: Any, i: int) -> Any:
    """Item i of a batched column (list, tuple, numpy array), or None when it is missing or too short."""
    if values is None or isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__getitem__"):
        return None
    return values[i] if 0 <= i < len(values) else None


def correctness_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the last `<answer>` block grades correct against its row (pipeline.scoring), else 0.0.

    TRL passes each dataset column as a list with one value per completion, named as in MathVista."""
    def score(text: str, i: int) -> bool:
        return is_correct(extract_answer(text), {name: _column_value(columns.get(name), i) for name in ROW_COLUMNS})

    return _scores(completions, score)


REWARD_FUNCS: dict[str, RewardFunc] = {
    "xmlcount": xmlcount_reward_func,
    "soft_format": soft_format_reward_func,
    "strict_format": strict_format_reward_func,
    "correctness": correctness_reward_func,
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


_DOTTED_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """The `rewards` section checked without importing anything: every name registered or of the
    form `package.module:function`, every weight a finite number. The one check of the weights
    (params validation and `resolve_rewards` both use it); raises RewardLookupError."""
    checked = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or (name not in REWARD_FUNCS and not _DOTTED_NAME.match(name)):
            raise RewardLookupError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_FUNCS))}, "
                                    "or 'package.module:function'")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise RewardLookupError(f"weight of reward {name!r} must be a finite number, got {weight!r}")
        checked[name] = value
    return checked


def resolve_rewards(weights: Mapping[str, float]) -> tuple[list[RewardFunc], list[float]]:
    """Functions and weights in params order, ready for GRPOTrainer(reward_funcs=…, reward_weights=…)."""
    checked = check_weights(weights)
    return [get_reward_func(name) for name in checked], list(checked.values())
