"""Wall time of the prepare stage on MathVista-size rows: `.venv/bin/python bench/bench_prepare.py`.

The target (issue 3) is 1,000 rows with images around 1000×700 prepared in at most 20 s on 2 cores,
with the committed params.yaml's pixel budget (Qwen2.5-VL-7B: factor 28, max_pixels 262144). The
rows are in MathVista's schema and mix what MathVista holds: 70 % PNG charts and diagrams (bars,
lines, text labels, grid), 30 % JPEG photo-like pictures (smooth colour fields, blobs, sensor
noise); questions are multiple choice, integer, float with precision and list. A pool of distinct
pictures is cycled (every picture is still decoded, resized and encoded per row; each row has its
own question, so none is a content duplicate). Building the input is not timed; the timed part is
`pipeline.prepare.prepare()`, from reading the parquet to writing both splits, in a process that
has already imported its libraries (the import line is printed apart). The figure is recorded in
docs/performance.md ("prepare").
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SIZES = ((1000, 700), (1024, 683), (960, 720), (900, 760), (1100, 640))
TARGET_S = 20.0


def chart(rng: random.Random, size: tuple[int, int]):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    width, height = size
    for y in range(40, height - 40, 50):
        draw.line((50, y, width - 20, y), fill=(220, 220, 220))
    draw.line((50, 20, 50, height - 40), fill=(0, 0, 0), width=2)
    draw.line((50, height - 40, width - 20, height - 40), fill=(0, 0, 0), width=2)
    bars = rng.randint(4, 12)
    step = (width - 90) // bars
    for i in range(bars):
        top = rng.randint(60, height - 60)
        colour = tuple(rng.randint(30, 230) for _ in range(3))
        draw.rectangle((60 + i * step, top, 60 + i * step + step * 2 // 3, height - 41), fill=colour)
        draw.text((60 + i * step, height - 32), f"item {i}", fill=(0, 0, 0))
        draw.text((60 + i * step, top - 14), str(height - top), fill=(0, 0, 0))
    points = [(60 + i * step, rng.randint(40, height - 60)) for i in range(bars)]
    draw.line(points, fill=(200, 30, 30), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(rng: random.Random, size: tuple[int, int]):
    import numpy as np
    from PIL import Image, ImageFilter

    generator = np.random.default_rng(rng.randint(0, 2**31))
    coarse = generator.integers(0, 255, (8, 12, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(8))
    pixels = np.asarray(image).astype(np.int16)
    pixels += generator.integers(-6, 7, pixels.shape, dtype=np.int16)  # sensor noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def picture_pool(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [(photo if i % 10 < 3 else chart)(rng, SIZES[i % len(SIZES)]) for i in range(count)]


def question_fields(rng: random.Random, index: int) -> dict:
    kind = index % 4
    if kind == 0:
        choices = [f"{v} cm" for v in rng.sample(range(1, 90), k=4)]
        return dict(question=f"Q{index}: which bar is labelled with the largest value?", choices=choices,
                    answer=rng.choice(choices), question_type="multi_choice", answer_type="text",
                    precision=None, unit=None)
    if kind == 1:
        return dict(question=f"Q{index}: how many bars are taller than 300?", choices=None,
                    answer=str(rng.randint(0, 12)), question_type="free_form", answer_type="integer",
                    precision=None, unit=None)
    if kind == 2:
        return dict(question=f"Q{index}: what is the mean of the values shown?", choices=None,
                    answer=f"{rng.uniform(0, 500):.1f}", question_type="free_form", answer_type="float",
                    precision=1.0, unit="cm")
    return dict(question=f"Q{index}: list the three largest values.", choices=None,
                answer=str(rng.sample(range(100, 700), k=3)), question_type="free_form", answer_type="list",
                precision=None, unit=None)


def write_rows(path: Path, rows: int, pool: list[bytes], seed: int) -> Path:
    from datasets import Dataset

    from pipeline import synthetic

    rng = random.Random(seed)
    records = []
    for index in range(rows):
        fields = question_fields(rng, index)
        records.append({
            "pid": str(index + 1), "image": f"images/{index + 1}.png",
            "decoded_image": {"bytes": pool[index % len(pool)], "path": None},
            **fields,
            "metadata": {"category": "math-targeted-vqa", "context": "bar chart", "grade": "high school",
                         "img_height": 700, "img_width": 1000, "language": "english",
                         "skills": ["statistical reasoning"], "source": "bench", "split": "testmini",
                         "task": "figure question answering"},
            "query": fields["question"],
        })
    columns = {name: [record[name] for record in records] for name in records[0]}
    Dataset.from_dict(columns, features=synthetic.features()).to_parquet(str(path))
    return path


def committed_params_text() -> str:
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, text=True, cwd=REPO)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the map workers): what contention cannot inflate."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_once(source: Path, num_proc: int, work: Path) -> tuple[float, float, dict]:
    import yaml

    from pipeline.params import apply_overrides, parse_params
    from pipeline.prepare import prepare

    raw = yaml.safe_load(committed_params_text())
    overrides = {"run_id": f"bench-{num_proc}", "data.source": str(source), "data.num_proc": num_proc}
    params = parse_params(apply_overrides(raw, overrides, "bench"))
    started, cpu_started = time.perf_counter(), cpu_seconds()
    report = prepare(params, work / f"np{num_proc}" / "data")
    return time.perf_counter() - started, cpu_seconds() - cpu_started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=100, help="distinct pictures cycled over the rows")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if the best run with the largest num_proc takes > {TARGET_S} s")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    import datasets  # noqa: F401
    import qwen_vl_utils  # noqa: F401
    imports = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        source = write_rows(work / "mathvista-like.parquet", args.rows, picture_pool(args.pool, 0), seed=0)
        megabytes = source.stat().st_size / 1e6
        load_before = os.getloadavg()[0]
        results = [(n, *run_once(source, n, work)) for n in args.num_proc]

    print(f"\nprepare: {args.rows} MathVista-schema rows, pictures ~1000×700 (70 % PNG charts, 30 % JPEG photos), "
          f"input parquet {megabytes:.0f} MB")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, Python {platform.python_version()}; "
          f"library imports (not timed below): {imports:.1f} s; 1-min load average before the runs: {load_before:.2f} "
          "(other processes share these cores: compare runs made at low load)\n")
    print("| num_proc | rows in | kept | train / eval | wall s | rows/s | CPU s | image tokens (max) | prompt tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, seconds, cpu, report in results:
        tokens = report["prompt_tokens"]
        print(f"| {n} | {report['rows_in']} | {report['rows_kept']} | {report['train_rows']} / {report['eval_rows']} "
              f"| {seconds:.1f} | {report['rows_in'] / seconds:.0f} | {cpu:.1f} | {report['image_tokens']['max']} "
              f"| max {tokens['max']} ({tokens['method']}) |")
    hashes = {tuple(sorted(report["sha256"].values())) for *_, report in results}
    print(f"\noutput identical across num_proc: {'yes' if len(hashes) == 1 else 'NO'}")
    best = min(seconds for n, seconds, *_ in results if n == max(args.num_proc))
    if args.check and (best > TARGET_S or len(hashes) != 1):
        raise SystemExit(f"FAIL: {best:.1f} s with num_proc {max(args.num_proc)} (target ≤ {TARGET_S} s) "
                         "or outputs differ")


if __name__ == "__main__":
    main()
