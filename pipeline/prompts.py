"""All prompt wording in one place: training, evaluation and inference send the same text.

Why each choice was made is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM_PROMPT = (
    "You are a careful visual reasoning assistant. Look at the image and answer the question. "
    "First think step by step inside <reasoning> and </reasoning>, then give only the final answer "
    "inside <answer> and </answer>."
)


def user_text(question: str, choices: Sequence[str] | None = None, unit: str | None = None,
              precision: float | None = None) -> str:
    """The user turn's text; the image part is added next to it by the chat template."""
    lines = [question.strip()]
    if choices:
        lines.append("Choices:")
        lines += [f"({chr(65 + i)}) {choice}" for i, choice in enumerate(choices)]
        lines.append("Answer with the option's letter.")
    if unit:
        lines.append(f"Give the answer in {unit}, without the unit.")
    if precision is not None:
        digits = int(precision)
        lines.append(f"Give a number with {digits} decimal place{'s' if digits != 1 else ''}."
                     if digits else "Give an integer.")
    return "\n".join(lines)


def conversation(text: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Plain-string messages: TRL (and pipeline.evaluate) insert the image part before the user text."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]

