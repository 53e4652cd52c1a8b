"""Local copies of every shipped benchmark (`evaluate.suite`) at a chosen size, for timing the evaluate
stage's suite on a GPU machine that cannot reach the Hub (`bench/bench_gpu.py --suite DIR`).

Each file holds ROWS rows in its dataset's own schema: the rows of the benchmark's test module
(tests/test_benchmark_<module>.py; MathVista's from the embedded dataset) repeated with distinct ids,
and MathVista-sized images of mixed sizes, drawn so that each row's image differs. Wall time depends
on rows, prompt length and image tokens, not on what the rows say. Run here (it needs pytest's
test modules): `python bench/suite_files.py --rows 200 --out .cache/bench-suite`.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SIZES = [(448, 448), (560, 336), (336, 560), (616, 308), (392, 504), (504, 392)]


def _image(i: int) -> bytes:
    from PIL import Image, ImageDraw

    width, height = SIZES[i % len(SIZES)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for k in range(3 + i % 5):
        x, y = (37 * (i + k)) % (width - 60), (53 * (i + 2 * k)) % (height - 60)
        draw.rectangle([x, y, x + 40 + 7 * k, y + 30 + 5 * k], outline=(20 * k, 90, 200), width=3)
    draw.text((10, height - 20), f"figure {i}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(out: Path, rows: int, embedded_root: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_benchmark_suite import sample_rows

    from pipeline.benchmarks import registry

    benchmarks = registry()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, samples in sorted(sample_rows(embedded_root).items()):
        benchmark = benchmarks[name]
        table = []
        for i in range(rows):
            row = dict(samples[i % len(samples)])
            row[benchmark.id_column] = f"{row[benchmark.id_column]}-{i}"
            row[benchmark.image_column] = {"bytes": _image(i), "path": f"images/{i}.png"}
            table.append(row)
        path = out / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(table), path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="rows per benchmark")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench-suite")
    parser.add_argument("--embedded", type=Path, default=REPO / "assets" / "embedded")
    args = parser.parse_args()
    for path in write(args.out, args.rows, args.embedded):
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
