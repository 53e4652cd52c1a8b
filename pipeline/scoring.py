"""Answer grading: the one function training, evaluation and inference share.

`is_correct(prediction, row)` grades the text inside `<answer>…</answer>` (taken out by
`pipeline.answer_format.extract_answer`) against a row in MathVista's schema (answer, choices,
question_type, answer_type, precision, unit). It follows MathVista's rules where they are sound and
is stricter where they would pay a policy for nothing: MathVista maps any unmatched text to the
nearest option by edit distance, and truncates "5.9" to the integer 5; here an answer that is empty,
garbage, names several options or is a different number is wrong. Every rule and every deliberate
difference is listed, with examples the tests check, in docs/reward_logic.md.

The common answers (letters, option text, plain numbers with units, commas, %, `\\boxed{}`,
`\\frac{a}{b}`) are graded by compiled patterns in pure Python. Only a short LaTeX expression the
patterns cannot read (`\\sqrt{3}`, `2\\pi`, `1.5 \\times 10^{3}`) goes to math-verify, imported on
first need and guarded so that it stays bounded; without math-verify such an answer is ungraded
(wrong). Nothing here raises: a reward that crashes would stop a training run for one odd sample.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

MAX_ANSWER_CHARS = 1000  # longer "answers" are listings, not answers; bounds the work per completion
MAX_ROUNDING_PLACES = 12  # the most decimal places grading rounds to; a row asking for more has no precision
_MAX_EXPONENT = 100  # |value| beyond 1e100 or below 1e-100 is not an answer anyone asked for
# enough digits to round any accepted value (up to 1e100) to MAX_ROUNDING_PLACES places exactly
_ROUNDING = Context(prec=_MAX_EXPONENT + MAX_ROUNDING_PLACES + 10)

# ---------------------------------------------------------------------------------------------
# normalisation: LaTeX wrappers, unicode, markdown
# ---------------------------------------------------------------------------------------------
_UNICODE = str.maketrans({
    "\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": r"\times ", "\u00b7": r"\cdot ", "\u00f7": r"\div ",
    "\u00b2": "^2", "\u00b3": "^3", "\u221a": r"\sqrt ", "\u03c0": r"\pi ", "\uff0c": ",", "\u3002": ".",
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " ", "\u2009": " ", "\u202f": " ",
})
_DELIMITERS = (("$$", "$$"), ("$", "$"), (r"\(", r"\)"), (r"\[", r"\]"), ("**", "**"), ("`", "`"),
               ('"', '"'), ("'", "'"))
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree)")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
# "Answer: 5", "The final answer is 5", "Option B": a label, not part of the answer
_ANSWER_PREFIX_RE = re.compile(
    r"^(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*:?|:)|(?:option|choice)\b(?=\s*\(?[A-Za-z]\)?$))\s*", re.I)
_TRAILING_PUNCT = ".,;:!?。"
_WRAP_FIRST = frozenset(left[0] for left, _ in _DELIMITERS)
_PREFIX_FIRST = frozenset("AaTtFfOoCc")


def _unwrap_boxed(text: str) -> str:
    """The content of the one `\\boxed{…}` (nested braces allowed); several boxes stay as they are."""
    start = text.find("\\boxed")
    if start < 0 or text.find("\\boxed", start + 1) >= 0:
        return text
    brace = text.find("{", start)
    if brace < 0 or text[start + len("\\boxed"):brace].strip():
        return text
    depth = 0
    for index in range(brace, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:index]
    return text  # unbalanced: leave it to fail parsing


@lru_cache(maxsize=16384)
def strip_markup(text: str) -> str:
    """Strip what carries no answer: math delimiters, `\\boxed`, `\\text`, markdown, an "Answer:" prefix,
    trailing punctuation; collapse runs of space. Case is left for the caller.

    Cached: a GRPO group repeats answers and every option text is cleaned once per completion."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text.translate(_UNICODE))
    text = text.strip()
    for _ in range(3):  # "$\boxed{5}$." peels in a few rounds; bounded so it never loops
        before = text
        text = text.rstrip(_TRAILING_PUNCT).strip()
        if text[:1] in _WRAP_FIRST:
            for left, right in _DELIMITERS:
                if len(text) > len(left) + len(right) - 1 and text.startswith(left) and text.endswith(right):
                    text = text[len(left):len(text) - len(right)].strip()
        if "\\boxed" in text:
            text = _unwrap_boxed(text).strip()
        if text[:1] in _PREFIX_FIRST:
            text = _ANSWER_PREFIX_RE.sub("", text, count=1)
        if text == before:
            break
    if "\\" in text or "~" in text:
        text = _TEXT_CMD_RE.sub(r"\1", text)
        text = _DEGREE_RE.sub("°", text)
        text = _SPACING_RE.sub("", text)
        text = text.replace("\\%", "%").replace("\\$", "$").replace("\\left", "").replace("\\right", "")
    return " ".join(text.rstrip(_TRAILING_PUNCT).split())


def normalise_text(text: str) -> str:
    """Case-, space- and punctuation-insensitive form for text answers and option texts."""
    return " ".join(strip_markup(text).lower().split())


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
_SIGNED = rf"[-+]?\s*{_NUMBER}"
_UNIT_WORD = r"(?:[A-Za-z°µμΩ'\"]+(?:\^\{?-?\d\}?)?\.?)"
# a number, then an optional %, then at most three unit words ("5 cm", "12 cm^2", "3 m/s", "30°")
_NUMBER_RE = re.compile(
    rf"^(?P<sign>[-+]?)\s*[$£€¥]?\s*(?P<num>{_NUMBER})\s*(?P<pct>%?)\s*"
    rf"(?P<unit>{_UNIT_WORD}(?:\s*[/ ]\s*{_UNIT_WORD}){{0,2}})?$")
_FRACTION_RE = re.compile(
    rf"^(?P<sign>[-+]?)\s*(?:\\[dt]?frac\s*\{{\s*(?P<a>{_SIGNED})\s*\}}\s*\{{\s*(?P<b>{_SIGNED})\s*\}}"
    rf"|(?P<c>{_SIGNED})\s*/\s*(?P<d>{_SIGNED}))\s*(?P<unit>{_UNIT_WORD}(?:\s*[/ ]\s*{_UNIT_WORD}){{0,2}})?$")
_UNIT_ALIASES = {"°": "degree", "deg": "degree", "degs": "degree", "degrees": "degree", "percent": "%"}


def _unit_key(unit: str) -> str:
    key = re.sub(r"[\s{}.\\]", "", unit.translate(_UNICODE).lower()).replace("^circ", "°")
    key = _UNIT_ALIASES.get(key, key)
    return key[:-1] if len(key) > 3 and key.endswith("s") and not key.endswith("ss") else key


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text.replace(",", "").replace(" ", ""))
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite() or (value and abs(value.adjusted()) > _MAX_EXPONENT):
        return None
    return value


def _unit_ok(found: str | None, unit: str | None) -> bool:
    """A unit the answer writes must be the row's (the prompt asks for that unit); any unit if the row has none."""
    if not found or not unit:
        return True
    return _unit_key(found) == _unit_key(unit)


def parse_number(text: str, unit: str | None = None) -> Decimal | None:
    """The one number an answer states, or None when it states none or several.

    Accepts units, thousands commas, %, `\\boxed{}`, `\\frac{a}{b}`, `a/b` and (through math-verify) a
    short numeric LaTeX expression. Exact `Decimal`, so "12345678901234567891" is not "…890".
    """
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    cleaned = strip_markup(text)
    if not cleaned:
        return None
    match = _NUMBER_RE.match(cleaned)
    if match:
        if not _unit_ok(match.group("unit") or match.group("pct"), unit):
            return None
        value = _decimal(match.group("num"))
        return None if value is None else (-value if match.group("sign") == "-" else value)
    match = _FRACTION_RE.match(cleaned)
    if match:
        if not _unit_ok(match.group("unit"), unit):
            return None
        numerator = _decimal(match.group("a") or match.group("c"))
        denominator = _decimal(match.group("b") or match.group("d"))
        if numerator is None or denominator is None or denominator == 0:
            return None
        value = _decimal(str(numerator / denominator))
        return None if value is None else (-value if match.group("sign") == "-" else value)
    if unit and cleaned.lower().endswith(unit.lower()) and len(cleaned) > len(unit):
        cleaned = cleaned[: -len(unit)].strip()
    return latex_number(cleaned)


# ---------------------------------------------------------------------------------------------
# math-verify fallback for short LaTeX expressions
# ---------------------------------------------------------------------------------------------
_LATEX_MAX_CHARS = 80
_LATEX_COMMANDS = {"frac", "dfrac", "tfrac", "sqrt", "pi", "times", "cdot", "div"}
_LATEX_CANDIDATE_RE = re.compile(r"\\|\^|sqrt|pi")
_LATEX_ALLOWED_RE = re.compile(r"^[\d\s.+\-*/^(){}\[\]\\a-z]*$")
_LATEX_COMMAND_RE = re.compile(r"\\([a-z]+)")
_LATEX_POWER_RE = re.compile(r"\^(?:\{\s*-?\d{1,2}\s*\}|-?\d)")
_math_verify: Any = None  # None: not tried yet; False: not installed


def _load_math_verify() -> Any:
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify.parser as parser_module
            from math_verify import LatexExtractionConfig, parse

            # the guard bounds the work, so parse runs without its SIGALRM timeout (which would
            # cancel a caller's own alarm and fails outside the main thread); silence the notice
            parser_module.TIMEOUT_WARNING_SHOWN = True
            _math_verify = (parse, [LatexExtractionConfig()])
        except Exception:  # noqa: BLE001 - optional dependency: such answers are then ungraded
            _math_verify = False
    return _math_verify


def _latex_guard(text: str) -> bool:
    """Only closed-form arithmetic reaches sympy: no variables, no nested or huge powers, short.

    Together these keep sympy's work small (a few ms), so the guard, not a signal-based timeout, is
    what bounds the time: math-verify's timeout uses SIGALRM, which fails outside the main thread
    and would cancel an alarm the caller set."""
    if len(text) > _LATEX_MAX_CHARS or not _LATEX_CANDIDATE_RE.search(text) or not _LATEX_ALLOWED_RE.match(text):
        return False
    if text.count("{") != text.count("}") or text.count("^") > 2:
        return False
    if text.count("^") != len(_LATEX_POWER_RE.findall(text)):
        return False
    bare = _LATEX_COMMAND_RE.sub(lambda m: "" if m.group(1) in _LATEX_COMMANDS else "?", text)
    bare = bare.replace("sqrt", "").replace("pi", "")
    return not re.search(r"[a-z?]", bare)


@lru_cache(maxsize=8192)
def latex_number(text: str) -> Decimal | None:
    """The value of a short closed-form LaTeX expression (`\\frac{\\sqrt{3}}{2}`, `2\\pi`), via math-verify."""
    if not _latex_guard(text):
        return None
    loaded = _load_math_verify()
    if not loaded:
        return None
    parse, config = loaded
    text = re.sub(r"(?<![\\a-z])(sqrt|pi)", r"\\\1", text)
    try:
        parsed = parse(f"${text}$", extraction_config=config, fallback_mode="no_fallback",
                       extraction_mode="first_match", parsing_timeout=None)
        expr = parsed[0] if parsed else None
        if expr is None or isinstance(expr, str) or not getattr(expr, "is_number", False):
            return None
        if getattr(expr, "is_Rational", False):
            return _decimal(str(Decimal(int(expr.p)) / Decimal(int(expr.q))))
        value = expr.evalf(30)
        if not value.is_real:
            return None
        return _decimal(str(value))
    except Exception:  # noqa: BLE001 - anything sympy cannot evaluate is not a number
        return None


def _precision(value: Any) -> int | None:
    if _is_missing(value):
        return None
    try:
        digits = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(digits) or not digits.is_integer() or not 0 <= digits <= MAX_ROUNDING_PLACES:
        return None
    return int(digits)


def _decimals_written(number: str) -> int:
    """Digits after the point in the gold answer: MathVista's precision when the row has none."""
    match = re.search(r"\.(\d+)", number)
    return min(len(match.group(1)), MAX_ROUNDING_PLACES) if match else 0


def _rounded(value: Decimal, digits: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP, context=_ROUNDING)


def numbers_match(predicted: Decimal, gold: Decimal, answer_type: str, precision: int | None) -> bool:
    """integer: exact value ("5.0" is 5, "5.3" is not); float: equal after rounding both to `precision`."""
    if answer_type == "float" and precision is not None:
        return _rounded(predicted, precision) == _rounded(gold, precision)
    return predicted == gold


# ---------------------------------------------------------------------------------------------
# multiple choice
# ---------------------------------------------------------------------------------------------
_LETTER_RE = re.compile(r"^\(?([A-Za-z])\)?$|^([A-Za-z])[.:)]$")
_LETTER_TEXT_RE = re.compile(r"^(?:\(([A-Za-z])\)|([A-Za-z])[.:)])\s*(.+)$", re.DOTALL)


def _option_matches(text: str, option: str, unit: str | None) -> bool:
    if normalise_text(text) == normalise_text(option):
        return True
    predicted, value = parse_number(text, unit), parse_number(option, unit)
    return predicted is not None and value is not None and predicted == value


def named_options(prediction: str, choices: list[str], unit: str | None = None) -> set[int]:
    """The options an answer names, by letter or by text; empty if it names none or is ambiguous.

    Order: a bare letter (`B`, `(b)`, `B.`) is the option at that position, as in MathVista; then the
    options whose text matches exactly (normalised) or by value — several only when options repeat
    the same text (MathVista has such rows); then a letter with the option's text (`(B) 12 cm`),
    which counts only if the text agrees with that letter.
    """
    cleaned = strip_markup(prediction)
    letter = _LETTER_RE.match(cleaned)
    if letter:
        index = ord((letter.group(1) or letter.group(2)).upper()) - ord("A")
        return {index} if index < len(choices) else set()
    hits = {i for i, option in enumerate(choices) if normalise_text(cleaned) == normalise_text(option)}
    if not hits and parse_number(cleaned, unit) is not None:
        hits = {i for i, option in enumerate(choices) if _option_matches(cleaned, option, unit)}
    if hits:
        return hits
    labelled = _LETTER_TEXT_RE.match(cleaned)
    if labelled:
        index = ord((labelled.group(1) or labelled.group(2)).upper()) - ord("A")
        if index < len(choices) and _option_matches(labelled.group(3), choices[index], unit):
            return {index}
    return set()


def choice_index(prediction: str, choices: list[str], unit: str | None = None) -> int | None:
    """The one option an answer names; None if it names none, or several (repeated option texts)."""
    named = named_options(prediction, choices, unit)
    return next(iter(named)) if len(named) == 1 else None


def gold_options(gold: str, choices: list[str], unit: str | None) -> set[int]:
    """Every option whose text is the gold answer (MathVista gives the text; a few rows repeat it in
    two options, and both are right); a letter only when no option has that text."""
    same_text = {i for i, option in enumerate(choices) if option.strip() == gold.strip()}
    return same_text or named_options(gold, choices, unit)


# ---------------------------------------------------------------------------------------------
# grading
# ---------------------------------------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return isinstance(value, float) and math.isnan(value)
    except Exception:  # noqa: BLE001
        return False


def _choices(value: Any) -> list[str] | None:
    if _is_missing(value) or isinstance(value, (str, bytes, Mapping)):
        return None
    try:
        choices = [str(choice) for choice in value]
    except TypeError:
        return None
    return choices or None


def _list_items(text: str) -> list[str]:
    text = strip_markup(text).strip()
    if text[:1] in "[(" and text[-1:] in "])":
        text = text[1:-1]
    text = text.strip().rstrip(",;").strip()
    return [item.strip() for item in re.split(r"[,;]", text)] if text else []


def _list_matches(prediction: str, gold: str, unit: str | None, precision: int | None) -> bool:
    predicted_items, gold_items = _list_items(prediction), _list_items(gold)
    if not gold_items or len(predicted_items) != len(gold_items):
        return False
    for p_item, g_item in zip(predicted_items, gold_items, strict=True):
        p_num, g_num = parse_number(p_item, unit), parse_number(g_item, unit)
        if g_num is not None:
            if p_num is None or not numbers_match(p_num, g_num, "float", precision):
                return False
        elif not p_item or normalise_text(p_item) != normalise_text(g_item):
            return False
    return True


def is_correct(prediction: str | None, row: Mapping[str, Any]) -> bool:
    """Grade an extracted answer against a MathVista-schema row. Never raises."""
    try:
        return _is_correct(prediction, row)
    except Exception:  # noqa: BLE001 - a reward must stay bounded whatever the input
        return False


def _is_correct(prediction: str | None, row: Mapping[str, Any]) -> bool:
    if not isinstance(prediction, str) or not isinstance(row, Mapping):
        return False
    gold = row.get("answer")
    if _is_missing(gold) or len(prediction) > MAX_ANSWER_CHARS or not prediction.strip():
        return False
    gold = str(gold).strip()
    if not gold:
        return False
    unit = None if _is_missing(row.get("unit")) else (str(row.get("unit")).strip() or None)
    question_type = row.get("question_type")
    choices = _choices(row.get("choices"))
    if choices and question_type in ("multi_choice", None):
        picked, right = named_options(prediction, choices, unit), gold_options(gold, choices, unit)
        return bool(picked) and picked <= right

    answer_type = row.get("answer_type")
    answer_type = str(answer_type) if isinstance(answer_type, str) and answer_type else None
    precision = _precision(row.get("precision"))
    if answer_type == "list":
        return _list_matches(prediction, gold, unit, precision)
    gold_value = parse_number(gold, unit)
    if answer_type is None and gold_value is not None:
        answer_type = "float" if "." in gold else "integer"
    if answer_type in ("integer", "float") or (gold_value is not None and answer_type != "text"):
        predicted = parse_number(prediction, unit)
        if predicted is None or gold_value is None:
            return False
        if answer_type == "float" and precision is None:
            precision = _decimals_written(gold)
        return numbers_match(predicted, gold_value, answer_type or "float", precision)
    if normalise_text(prediction) == normalise_text(gold):
        return True
    # a text row whose answer happens to be a number: the same value counts ("5.0" for "5")
    predicted = parse_number(prediction, unit) if gold_value is not None else None
    return predicted is not None and predicted == gold_value
