"""MathVista's scoring rules, re-implemented for the tests (not vendored: its evaluation code is
CC BY-SA 4.0, which would bind this file's license; the rules are short and restated here).

What lupantech/MathVista's evaluation/calculate_score.py does with an output file: for each pid,
turn `extraction` into a prediction (multiple choice: a `(X)` letter, then a bare option letter,
becomes that option's text, anything else the option nearest by edit distance; integer:
`str(int(float(x)))`; float: `str(round(float(x), precision))`; list: `str(x)`; a failed
conversion is None), call it right when it equals `answer`, and report accuracy overall and per
value of question_type, answer_type, language, source, category, task, context, grade and skills.
"""

from __future__ import annotations

import re

TARGET_KEYS = ("question_type", "answer_type", "language", "source", "category", "task", "context", "grade",
               "skills")


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalize(extraction, choices, question_type, answer_type, precision):
    if question_type == "multi_choice":
        text = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letters = re.findall(r"\(([a-zA-Z])\)", text)
        if letters:
            text = letters[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if text in options:
            return choices[options.index(text)]
        return min(choices, key=lambda choice: edit_distance(text, choice))  # the first of the nearest
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), precision))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError):
        return None
    return extraction


def score(results: dict[str, dict]) -> dict:
    graded = {}
    for pid, problem in results.items():
        prediction = normalize(problem["extraction"], problem["choices"], problem["question_type"],
                               problem["answer_type"], problem["precision"])
        graded[pid] = {**problem, **problem["metadata"], "true_false": prediction == problem["answer"]}
    correct = sum(p["true_false"] for p in graded.values())
    scores = {"average": {"accuracy": correct / len(graded), "correct": correct, "total": len(graded)}}
    for key in TARGET_KEYS:
        groups: dict[str, list[bool]] = {}
        for problem in graded.values():
            values = problem[key] if key == "skills" else [problem[key]]
            for value in values:
                groups.setdefault(value, []).append(problem["true_false"])
        scores[key] = {value: {"accuracy": sum(hits) / len(hits), "correct": sum(hits), "total": len(hits)}
                       for value, hits in groups.items()}
    return scores
