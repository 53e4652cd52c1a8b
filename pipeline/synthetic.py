"""A synthetic visual-math dataset in MathVista's schema, rendered offline with PIL.

It lets the demo and the tests run the same preparation code as the real MathVista: the rows have
MathVista's columns and types (`pid, question, image, decoded_image, choices, unit, precision,
answer, question_type, answer_type, metadata, query`) and are saved as parquet that
`datasets.load_dataset` reads. Every question is answerable from the picture alone: count shapes,
sum a grid of digits, average a grid (float, with precision), pick the tallest bar (multiple choice).
Deterministic for a seed: same seed, same parquet bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "orange": (240, 150, 20)}
HINT = "Hint: Please answer the question and provide the final answer at the end."
SPLIT = "testmini"  # MathVista's split name, so the demo params mirror the real ones


def _canvas(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    # a few sizes and aspect ratios so resizing and variable image-token counts get exercised
    width, height = rng.choice([(64, 64), (96, 64), (64, 96), (80, 80)])
    image = Image.new("RGB", (width, height), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _count_shapes(rng: random.Random) -> dict:
    image, draw = _canvas(rng)
    shape = rng.choice(["circles", "squares"])
    count = rng.randint(1, 6)
    width, height = image.size
    for _ in range(count):
        x, y = rng.randint(2, width - 14), rng.randint(2, height - 14)
        box = (x, y, x + 10, y + 10)
        color = rng.choice(list(COLORS.values()))
        (draw.ellipse if shape == "circles" else draw.rectangle)(box, fill=color)
    return dict(image=image, question=f"How many {shape} are in the image?", answer=str(count),
                choices=None, precision=None, answer_type="integer", task="counting", skills=["numeric commonsense"])


def _digit_grid(rng: random.Random, size: int) -> tuple[Image.Image, list[int]]:
    image, draw = _canvas(rng)
    width, height = image.size
    digits = [rng.randint(0, 9) for _ in range(size * size)]
    for i, digit in enumerate(digits):
        row, col = divmod(i, size)
        x = 4 + col * (width - 8) // size
        y = 4 + row * (height - 8) // size
        draw.text((x, y), str(digit), fill=(0, 0, 0))
    return image, digits


def _sum_grid(rng: random.Random) -> dict:
    image, digits = _digit_grid(rng, rng.choice([2, 3]))
    return dict(image=image, question="What is the sum of all numbers in the grid?", answer=str(sum(digits)),
                choices=None, precision=None, answer_type="integer", task="arithmetic", skills=["arithmetic reasoning"])


def _mean_grid(rng: random.Random) -> dict:
    image, digits = _digit_grid(rng, 2)
    mean = sum(digits) / len(digits)
    return dict(image=image, question="What is the average of the numbers in the grid?",
                answer=f"{mean:.1f}", choices=None, precision=1.0, answer_type="float",
                task="arithmetic", skills=["arithmetic reasoning", "statistical reasoning"])


def _tallest_bar(rng: random.Random) -> dict:
    image, draw = _canvas(rng)
    width, height = image.size
    names = rng.sample(list(COLORS), k=3)
    heights = rng.sample(range(8, height - 8), k=3)
    bar_width = (width - 16) // 3
    for i, (name, bar_height) in enumerate(zip(names, heights, strict=False)):
        x = 4 + i * (bar_width + 4)
        draw.rectangle((x, height - 4 - bar_height, x + bar_width, height - 4), fill=COLORS[name])
    tallest = names[heights.index(max(heights))]
    return dict(image=image, question="Which color is the tallest bar?", answer=tallest, choices=names,
                precision=None, answer_type="text", task="figure question answering", skills=["statistical reasoning"])


TASKS = (_count_shapes, _sum_grid, _mean_grid, _tallest_bar)


def make_rows(num_rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(num_rows):
        item = TASKS[index % len(TASKS)](rng)
        pid = str(index + 1)
        width, height = item["image"].size
        choices = item["choices"]
        question_type = "multi_choice" if choices else "free_form"
        query = f"{HINT}\nQuestion: {item['question']}"
        if choices:
            query += "\nChoices:\n" + "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
        rows.append({
            "pid": pid,
            "question": item["question"],
            "image": f"images/{pid}.png",
            "decoded_image": item["image"],
            "choices": choices,
            "unit": None,
            "precision": item["precision"],
            "answer": item["answer"],
            "question_type": question_type,
            "answer_type": item["answer_type"],
            "metadata": {
                "category": "math-targeted-vqa",
                "context": "synthetic scene",
                "grade": "elementary school",
                "img_height": height,
                "img_width": width,
                "language": "english",
                "skills": item["skills"],
                "source": "grpo-synthetic",
                "split": SPLIT,
                "task": item["task"],
            },
            "query": query,
        })
    return rows


def features():
    """MathVista's column types on the Hub, so both datasets meet the same preparation code."""
    from datasets import Features, Image, List, Value

    return Features({
        "pid": Value("string"),
        "question": Value("string"),
        "image": Value("string"),
        "decoded_image": Image(),
        "choices": List(Value("string")),
        "unit": Value("string"),
        "precision": Value("float64"),
        "answer": Value("string"),
        "question_type": Value("string"),
        "answer_type": Value("string"),
        "metadata": {
            "category": Value("string"),
            "context": Value("string"),
            "grade": Value("string"),
            "img_height": Value("int64"),
            "img_width": Value("int64"),
            "language": Value("string"),
            "skills": List(Value("string")),
            "source": Value("string"),
            "split": Value("string"),
            "task": Value("string"),
        },
        "query": Value("string"),
    })


def write_dataset(out_dir: Path, num_rows: int = 240, seed: int = 0) -> Path:
    """Write `<out_dir>/data/testmini-00000-of-00001.parquet`, the layout `load_dataset(out_dir)` reads."""
    from datasets import Dataset

    rows = make_rows(num_rows, seed)
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    dataset = Dataset.from_dict(columns, features=features())
    path = Path(out_dir) / "data" / f"{SPLIT}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    dataset.to_parquet(str(tmp))
    tmp.replace(path)
    return path
