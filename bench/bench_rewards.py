"""Throughput of the reward functions on one CPU core: `.venv/bin/python bench/bench_rewards.py`.

GRPO calls every reward on every completion of every step, so a slow reward shows up as idle GPUs.
The target (issue 4) is 10,000 completions scored in at most 1 s on one core. The completions are
a seeded, realistic mix: reasoning of a few hundred characters, then answers as letters, option
text, numbers with units or commas, `\\boxed{}`, `\\frac{a}{b}`, wrong or garbage answers and broken
tags, over MathVista-like rows (multiple choice, integer, float with precision, list, text).
Short LaTeX expressions that need math-verify (`2\\sqrt{3}`) are timed on their own line: they cost
milliseconds each (cached per distinct string), so the table shows them apart from the common path.
The figure is recorded in docs/performance.md ("Reward scoring").
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import scoring  # noqa: E402
from pipeline.rewards import REWARD_FUNCS, ROW_COLUMNS  # noqa: E402

WORDS = ("the", "bar", "is", "taller", "so", "count", "each", "shape", "then", "add", "we", "see", "angle",
         "value", "grid", "left", "right", "sum", "therefore", "because", "of", "and", "three", "blue")
COLORS = ("red", "green", "blue", "orange", "purple", "yellow")


def _reasoning(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(rng.randint(2, 6))]
    return "\n".join(lines)


def _row(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.4:
        if rng.random() < 0.5:
            choices = rng.sample(COLORS, k=rng.randint(3, 5))
        else:
            choices = [f"{value} cm" for value in rng.sample(range(1, 60), k=4)]
        return dict(answer=rng.choice(choices), choices=choices, question_type="multi_choice", answer_type="text",
                    precision=None, unit=None)
    if kind < 0.7:
        return dict(answer=str(rng.randint(0, 5000)), choices=None, question_type="free_form", answer_type="integer",
                    precision=None, unit=rng.choice([None, None, "cm", "degrees"]))
    if kind < 0.9:
        digits = rng.choice([1, 2])
        return dict(answer=f"{rng.uniform(0, 100):.{digits}f}", choices=None, question_type="free_form",
                    answer_type="float", precision=float(digits), unit=None)
    if kind < 0.95:
        return dict(answer=str([rng.randint(0, 9) for _ in range(3)]), choices=None, question_type="free_form",
                    answer_type="list", precision=None, unit=None)
    return dict(answer=rng.choice(COLORS), choices=None, question_type="free_form", answer_type="text",
                precision=None, unit=None)


def _answer(rng: random.Random, row: dict) -> str:
    gold, choices = row["answer"], row["choices"]
    style = rng.random()
    if choices:
        index = choices.index(gold) if rng.random() < 0.5 else rng.randrange(len(choices))
        forms = [chr(65 + index), f"({chr(65 + index)})", choices[index], f"({chr(65 + index)}) {choices[index]}",
                 " or ".join(choices[:2]), ""]
        return rng.choice(forms)
    if row["answer_type"] in ("integer", "float"):
        value = float(gold) + (0 if rng.random() < 0.5 else rng.choice([-1, 1, 0.04]))
        number = f"{value:,.2f}" if style < 0.2 else (f"{value:g}" if style < 0.7 else f"{value}")
        forms = [number, f"{number} {row['unit'] or 'units'}", f"\\boxed{{{number}}}", f"${number}$",
                 f"\\frac{{{int(value * 2)}}}{{2}}", "I am not sure", f"{number} or {value + 1}"]
        return rng.choice(forms)
    return rng.choice([gold, gold.upper(), "no idea", f"{gold}, {gold}"])


def completion(rng: random.Random, row: dict) -> list[dict]:
    answer, broken = _answer(rng, row), rng.random()
    if broken < 0.8:
        text = f"<reasoning>\n{_reasoning(rng)}\n</reasoning>\n<answer>\n{answer}\n</answer>"
    elif broken < 0.9:
        text = f"{_reasoning(rng)}\nThe answer is {answer}."
    else:
        text = f"<reasoning>{_reasoning(rng)}<answer>{answer}</answer></reasoning> trailing words"
    return [{"role": "assistant", "content": text}]


def make_batch(n: int, seed: int) -> tuple[list, dict[str, list]]:
    rng = random.Random(seed)
    rows = [_row(rng) for _ in range(n)]
    completions = [completion(rng, row) for row in rows]
    columns = {name: [row[name] for row in rows] for name in ROW_COLUMNS}
    return completions, columns


def timed(func, completions: list, columns: dict, batch: int, repeats: int) -> float:
    """Best of `repeats` (seconds for all completions), calling in TRL-sized batches.

    The caches are emptied before each repeat, so only repeats within the batch hit them, as in training."""
    best = float("inf")
    for _ in range(repeats):
        scoring.strip_markup.cache_clear()
        started = time.perf_counter()
        for start in range(0, len(completions), batch):
            func(completions[start:start + batch], **{k: v[start:start + batch] for k, v in columns.items()})
        best = min(best, time.perf_counter() - started)
    return best


def latex_seconds(n: int) -> float:
    """Mean seconds per distinct LaTeX expression that goes through math-verify (after its import)."""
    scoring.latex_number("\\sqrt{2}")  # import sympy/math-verify once, outside the timing
    expressions = [f"{a}\\sqrt{{{b}}}" for a in range(2, 200) for b in (2, 3, 5, 7)][:n]
    started = time.perf_counter()
    for text in expressions:
        scoring.latex_number(text)
    return (time.perf_counter() - started) / len(expressions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="completions (default 10000)")
    parser.add_argument("--batch", type=int, default=64, help="completions per reward call, like a GRPO step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says

    completions, columns = make_batch(args.n, args.seed)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs visible, pinned to 1; "
          f"{args.n} completions, batches of {args.batch}, best of {args.repeats}")
    print(f"{'reward':<16} {'completions/s':>14} {'s per ' + str(args.n):>12}")
    total = 0.0
    for name, func in REWARD_FUNCS.items():
        seconds = timed(func, completions, columns, args.batch, args.repeats)
        total += seconds
        print(f"{name:<16} {args.n / seconds:>14,.0f} {seconds:>12.3f}")
    print(f"{'all four':<16} {args.n / total:>14,.0f} {total:>12.3f}")
    per_latex = latex_seconds(200)
    print(f"{'latex (m-v)':<16} {1 / per_latex:>14,.0f} {per_latex * args.n:>12.3f}   "
          "(a distinct LaTeX expression through math-verify; cached after)")


if __name__ == "__main__":
    main()
