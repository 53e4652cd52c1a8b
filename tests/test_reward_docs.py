"""docs/reward_logic.md cannot drift from the code: its tables are generated from the test cases.

Every table in the doc sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->` and is
rendered here by running the real reward and grading functions on the cases of tests/test_scoring.py,
tests/test_answer_format.py and tests/test_rewards.py (which also assert the expected values). The
test fails when the doc differs; after changing a rule or a case, regenerate with

    .venv/bin/python tests/test_reward_docs.py --write
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOC = REPO / "docs" / "reward_logic.md"
BLOCK_RE = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.DOTALL)
RULES = ("multi_choice", "integer", "float", "list", "text")


def _cases(name: str) -> ModuleType:
    """A test module by path, so this works under any pytest import mode and as a script."""
    key = f"_reward_doc_cases_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _code(text: str | None, limit: int = 90) -> str:
    if text is None:
        return "*None*"
    if text == "":
        return "*(empty)*"
    shown = text if len(text) <= limit else f"{text[:limit - 20]}…(+{len(text) - limit + 20} chars)"
    shown = shown.replace("\n", "\\n").replace("|", "\\|")
    fence = "``" if "`" in shown else "`"
    pad = " " if shown.startswith("`") or shown.endswith("`") or shown != shown.strip() else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def _cell(text: str) -> str:
    """Prose in a table cell: tags like <answer> must show, not vanish as HTML."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _number(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"


def _row(row: dict) -> str:
    answer = row.get("answer")
    parts = [_code(str(answer)) if isinstance(answer, str) else _code(repr(answer))]
    if isinstance(row.get("choices"), list) and row["choices"]:
        parts.append("of " + ", ".join(row["choices"]))
    elif isinstance(row.get("answer_type"), str):
        parts.append(row["answer_type"])
    precision = row.get("precision")
    if isinstance(precision, float) and precision == precision:
        parts.append(f"precision {precision:.0f}")
    if isinstance(row.get("unit"), str) and row["unit"]:
        parts.append(f"unit {row['unit']}")
    return _cell(" ".join(parts))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render() -> dict[str, str]:
    """Every generated block, computed by the code under test on the shared cases."""
    from pipeline.answer_format import extract_answer
    from pipeline.rewards import REWARD_FUNCS
    from pipeline.scoring import is_correct

    scoring_cases, reward_cases = _cases("test_scoring"), _cases("test_rewards")
    format_cases = _cases("test_answer_format")
    REWARD_RANGES = reward_cases.REWARD_RANGES  # noqa: N806 - the test module's constant
    blocks = {}

    blocks["registry"] = _table(["name in params.yaml", "function", "range"], [
        [f"`{name}`", f"`pipeline.rewards.{func.__name__}`",
         f"[{_number(REWARD_RANGES[name][0])}, {_number(REWARD_RANGES[name][1])}]"]
        for name, func in REWARD_FUNCS.items()
    ])

    rows = []
    for completion, _, why in reward_cases.FORMAT_CASES:
        values = [REWARD_FUNCS[name]([completion])[0] for name in ("strict_format", "soft_format", "xmlcount")]
        rows.append([_code(completion), *(_number(v) for v in values), _cell(why)])
    blocks["format"] = _table(["completion", "strict_format", "soft_format", "xmlcount", "why"], rows)

    blocks["extraction"] = _table(["completion", "extracted answer", "why"], [
        [_code(completion), _code(extract_answer(completion)), _cell(why)]
        for completion, _, why in format_cases.EXTRACTION_CASES
    ])

    rows = []
    for completion, row, _, why in reward_cases.CORRECTNESS_CASES:
        columns = {name: [row.get(name)] for name in row}
        reward = REWARD_FUNCS["correctness"]([completion], **columns)[0]
        rows.append([_code(completion), _row(row), _number(reward), _cell(why)])
    blocks["correctness"] = _table(["completion", "row (gold answer, type)", "correctness", "why"], rows)

    def grading_rows(cases: list) -> list[list[str]]:
        return [[_code(case.answer), _row(case.row), "1" if is_correct(case.answer, case.row) else "0",
                 "1" if scoring_cases.mathvista_correct(case.answer, case.row) else "0",
                 case.mathvista, _cell(case.why)] for case in cases]

    header = ["answer", "row (gold answer, type)", "ours", "MathVista", "vs MathVista", "why"]
    for rule in RULES:
        blocks[f"grading-{rule}"] = _table(header, grading_rows(
            [case for case in scoring_cases.GRADING_CASES if case.rule == rule]))
    blocks["differences"] = _table(header, grading_rows(
        [case for case in scoring_cases.GRADING_CASES if case.mathvista != "same"]))
    return blocks


def apply(doc: str, blocks: dict[str, str]) -> str:
    return BLOCK_RE.sub(lambda m: m.group(1) + blocks.get(m.group("name"), m.group("body")) + m.group(4), doc)


def test_doc_tables_match_the_code() -> None:
    doc = DOC.read_text(encoding="utf-8")
    blocks = render()
    present = {match.group("name") for match in BLOCK_RE.finditer(doc)}
    assert present == set(blocks), f"doc blocks {sorted(present)} != generated {sorted(blocks)}"
    assert apply(doc, blocks) == doc, (
        "docs/reward_logic.md is stale: run .venv/bin/python tests/test_reward_docs.py --write")


def test_every_deliberate_difference_is_explained_in_prose() -> None:
    doc = DOC.read_text(encoding="utf-8")
    prose = BLOCK_RE.sub("", doc)
    for heading in ("No nearest-option fallback", "No truncation of integers", "Letters and text together",
                    "Numbers as written", "Letters as written", "Rounding", "Missing precision",
                    "Lists element by element", "Text without case or punctuation"):
        assert f"**{heading}.**" in prose, heading


def main() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    doc = DOC.read_text(encoding="utf-8")
    updated = apply(doc, render())
    if "--write" in sys.argv[1:]:
        DOC.write_text(updated, encoding="utf-8")
        print(f"wrote {DOC.relative_to(REPO)}")
    else:
        print("up to date" if updated == doc else "stale: run with --write")
        raise SystemExit(0 if updated == doc else 1)


if __name__ == "__main__":
    main()
