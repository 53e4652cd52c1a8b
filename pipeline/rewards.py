"""Reward functions for GRPO and the registry that `params.yaml` selects from.

Each function follows TRL's reward signature: `completions` (conversational messages) plus every
dataset column as a keyword argument, one float per completion. `REWARD_FUNCS` maps the names used
in `params.yaml` to functions; a name of the form `package.module:function` loads a user's own.
The seed's names (`*_reward_func`) stay importable so old configs keep working.

Rewards never raise and stay in a fixed range whatever the model writes: GRPO optimises exactly
what they pay for, so each rule is also documented in docs/reward_logic.md.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.scoring import completion_text, extract_answer, is_correct

RewardFunc = Callable[..., list[float]]

# One reasoning block then one answer block, nothing else; DOTALL so reasoning may span lines.
_STRICT_RE = re.compile(r"\A\s*<reasoning>\s*(?:(?!</?reasoning>|</?answer>).)+?\s*</reasoning>\s*"
                        r"<answer>\s*(?:(?!</?reasoning>|</?answer>).)+?\s*</answer>\s*\Z", re.DOTALL)
# Both blocks in order somewhere in the text.
_SOFT_RE = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
_XML_TAG_CREDIT = 0.125
_XML_TRAILING_PENALTY = 0.001  # per character after </answer>, capped so the reward stays >= 0


def _texts(completions: Sequence[Any] | None) -> list[str]:
    return [completion_text(c) for c in (completions or [])]


def strict_format_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 for exactly `<reasoning>…</reasoning><answer>…</answer>` (whitespace around allowed)."""
    return [1.0 if _STRICT_RE.match(text) else 0.0 for text in _texts(completions)]


def soft_format_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """1.0 when a reasoning block is followed by an answer block anywhere in the text."""
    return [1.0 if _SOFT_RE.search(text) else 0.0 for text in _texts(completions)]


def xml_count(text: str) -> float:
    """Partial credit per tag that appears exactly once, less a small capped trailing-text penalty."""
    score = sum(_XML_TAG_CREDIT for tag in _TAGS if text.count(tag) == 1)
    if text.count("</answer>") == 1:
        trailing = len(text.split("</answer>", 1)[1].strip())
        score -= min(trailing * _XML_TRAILING_PENALTY, _XML_TAG_CREDIT)
    return max(score, 0.0)


def xmlcount_reward_func(completions: Sequence[Any], **_: Any) -> list[float]:
    """Dense shaping signal in [0, 0.5]: helps a model that has never written the tags find them."""
    return [xml_count(text) for text in _texts(completions)]


_ROW_COLUMNS = ("answer", "choices", "question_type", "answer_type", "precision", "unit")


def correctness_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the `<answer>` block grades correct against the row (pipeline.scoring), else 0.0."""
    texts = _texts(completions)
    rewards = []
    for i, text in enumerate(texts):
        row = {}
        for name in _ROW_COLUMNS:
            values = columns.get(name)
            row[name] = values[i] if isinstance(values, (list, tuple)) and i < len(values) else None
        rewards.append(1.0 if is_correct(extract_answer(text), row) else 0.0)
    return rewards


REWARD_FUNCS: dict[str, RewardFunc] = {
    "xmlcount": xmlcount_reward_func,
    "soft_format": soft_format_reward_func,
    "strict_format": strict_format_reward_func,
    "correctness": correctness_reward_func,
}


class RewardLookupError(ValueError):
    pass


def get_reward_func(name: str) -> RewardFunc:
    """A registered name, or `package.module:function` for a user's own reward."""
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise RewardLookupError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARD_FUNCS))}")
    try:
        func = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise RewardLookupError(f"cannot load reward {name!r}: {error}") from None
    if not callable(func):
        raise RewardLookupError(f"reward {name!r} is not callable")
    return func


def resolve_rewards(weights: dict[str, float]) -> tuple[list[RewardFunc], list[float]]:
    """Functions and weights in params order, ready for GRPOTrainer(reward_funcs=…, reward_weights=…)."""
    names = list(weights)
    return [get_reward_func(name) for name in names], [float(weights[name]) for name in names]
