"""The answer format: `<reasoning>…</reasoning><answer>…</answer>`, in one place.

The system prompt asks for it, the format rewards (pipeline.rewards) pay for it, evaluation and the
inference CLI report whether a completion follows it, and grading (pipeline.scoring) reads the
answer that `extract_answer` takes out of it. The tags are matched as a sequence (not by a regex over
the whole text, which needed DOTALL, broke on a leading space and accepted tags in any order), and an
empty answer never counts as formatted. Every rule, with examples the tests check, is in
docs/reward_logic.md. Pure Python; nothing here raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<reasoning>", "</reasoning>", "<answer>", "</answer>"
TAGS = (REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_TAG_RE = re.compile(r"</?(?:reasoning|answer)>")

SYSTEM_PROMPT = (
    "You are a careful visual reasoning assistant. Look at the image and answer the question. "
    f"First think step by step inside {REASONING_OPEN} and {REASONING_CLOSE}, then give only the final answer "
    f"inside {ANSWER_OPEN} and {ANSWER_CLOSE}."
)


def formatted(reasoning: str, answer: str) -> str:
    """A completion that follows the format (the embedded model's warm-up targets)."""
    return f"{REASONING_OPEN}\n{reasoning}\n{REASONING_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def completion_text(completion: Any) -> str:
    """TRL passes conversational completions as `[{"role": "assistant", "content": ...}]`; anything
    else that is not a string is an empty completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        message = completion
    elif isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], Mapping):
        message = completion[-1]
    else:
        return ""
    content = message.get("content")
    if isinstance(content, list):  # multimodal content parts
        return "".join(part["text"] for part in content
                       if isinstance(part, Mapping) and isinstance(part.get("text"), str))
    return content if isinstance(content, str) else ""


def extract_answer(text: str | None) -> str | None:
    """The stripped text of the last complete `<answer>…</answer>` block, or None when there is none.

    The last block counts (a model that revises itself ends with its final answer); the search is
    two `rfind`s, so it is linear whatever tags the text nests or leaves open.
    """
    if not text or not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(ANSWER_OPEN):end].strip()


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


def is_strict(text: str | None) -> bool:
    """Exactly one reasoning block then one answer block, both non-empty, nothing else but space."""
    if not isinstance(text, str):
        return False
    tags = _tags(text)
    if len(tags) != 4:
        return False
    blocks = _blocks_at(text, tags, 0)
    if blocks is None or not blocks[0].strip() or not blocks[1].strip():
        return False
    return not (text[:tags[0][1]].strip() or text[tags[3][2]:].strip())


def is_soft(text: str | None) -> bool:
    """A reasoning block directly followed by a non-empty answer block, anywhere in the text."""
    if not isinstance(text, str):
        return False
    tags = _tags(text)
    for i, (tag, _, _) in enumerate(tags):
        if tag == REASONING_OPEN:
            blocks = _blocks_at(text, tags, i)
            if blocks is not None and blocks[1].strip():
                return True
    return False
