"""All prompt wording in one place: training, evaluation and inference send the same text.

Why each choice was made is in docs/data_prep_decisions.md.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.answer_format import SYSTEM_PROMPT

CHOICES_HEADER = "Choices:"
CHOICE_INSTRUCTION = "Answer with the option's letter."
UNIT_HINT = "Give the answer in {unit}, without the unit."
INTEGER_HINT = "Give an integer."
DECIMALS_HINT = "Give a number with {digits} decimal place{plural}."
FLOAT_HINT = "Give a decimal number."
LIST_HINT = "Give a Python list, e.g. [1, 2, 3]."


def option_label(index: int) -> str:
    """(A), (B), …: the labels MathVista's own queries use, so a letter answer names one option."""
    return f"({chr(65 + index)})"


def _format_hint(answer_type: str | None, precision: float | None) -> str | None:
    """One hint at most: the row's precision wins over its answer type, since it is the stricter."""
    if precision is not None:
        digits = int(precision)
        return DECIMALS_HINT.format(digits=digits, plural="s" if digits != 1 else "") if digits else INTEGER_HINT
    return {"integer": INTEGER_HINT, "float": FLOAT_HINT, "list": LIST_HINT}.get(answer_type or "")


def user_text(question: str, choices: Sequence[str] | None = None, unit: str | None = None,
              precision: float | None = None, answer_type: str | None = None) -> str:
    """The user turn's text; the image part is added next to it by the chat template."""
    lines = [question.strip()]
    if choices:
        lines.append(CHOICES_HEADER)
        lines += [f"{option_label(i)} {choice}" for i, choice in enumerate(choices)]
        lines.append(CHOICE_INSTRUCTION)
    else:
        hint = _format_hint(answer_type, precision)
        if unit:
            lines.append(UNIT_HINT.format(unit=unit))
        if hint:
            lines.append(hint)
    return "\n".join(lines)


def conversation(text: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Plain-string messages: TRL (and pipeline.evaluate) insert the image part before the user text."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
