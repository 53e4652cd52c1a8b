"""Does the demo learn on this machine, whatever the seed? `make bench-demo` (or `bench/bench_demo.py`).

Runs the whole demo pipeline (`prepare → train → evaluate → publish`, the DVC experiment that
`make demo` starts) once per seed in a fresh copy of this working tree, and prints one row per
seed: the mean training reward over the first and the last third of the steps, the evaluation's
strict format and accuracy for the base model and the adapter, and whether the adapter's 95%
interval for accuracy lies above the base model's accuracy. The targets (issue 14): over 3 seeds,
last third ≥ 1.5 × first third, adapter strict format ≥ 0.90, and that interval above the base.
`--write` replaces the table in docs/performance.md ("The demo learns"); `--check` exits 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
START, END = "<!-- bench_demo:start -->", "<!-- bench_demo:end -->"
RATIO_TARGET, FORMAT_TARGET = 1.5, 0.90


def copy_working_tree(dest: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what would be committed, not what is cached."""
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "bench"], cwd=dest, check=True, env=env)


def copy_with_embedded(work: Path) -> None:
    """The working tree copied to `work`, with the embedded default (tiny models, dataset) built there by
    its DVC stage, so the runs find it up to date."""
    copy_working_tree(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    build = subprocess.run(["dvc", "repro", "embedded"], cwd=work, capture_output=True, text=True, env=env)
    if build.returncode != 0:
        raise SystemExit(f"bench: building the embedded default failed:\n{build.stderr[-4000:]}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def thirds(values: list[float]) -> tuple[float, float]:
    third = len(values) // 3
    return sum(values[:third]) / third, sum(values[-third:]) / third


def run_seed(work: Path, seed: int) -> dict:
    run_id = f"seed{seed}"
    started = time.perf_counter()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}  # dvc from the same environment
    result = subprocess.run([sys.executable, "-m", "pipeline.experiments", "--run-id", run_id, "--preset", "demo",
                             "--set", f"seed={seed}"], cwd=work, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_demo: seed {seed} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    with (work / "reports" / "train" / "plots" / "metrics" / "reward.tsv").open() as f:
        rewards = [float(row["reward"]) for row in csv.DictReader(f, delimiter="\t")]
    metrics = json.loads((work / "reports" / "eval_metrics.json").read_text())
    first, last = thirds(rewards)
    base, adapter = metrics["base"], metrics["adapter"]
    return {"seed": seed, "steps": len(rewards), "first": first, "last": last, "ratio": last / first,
            "base_format": base["strict_format"], "format": adapter["strict_format"],
            "base_accuracy": base["accuracy"], "accuracy": adapter["accuracy"], "ci": adapter["accuracy_ci95"],
            "rows": adapter["rows"], "seconds": time.perf_counter() - started}


def meets(row: dict) -> bool:
    return row["ratio"] >= RATIO_TARGET and row["format"] >= FORMAT_TARGET and row["ci"][0] > row["base_accuracy"]


def table(rows: list[dict]) -> str:
    lines = ["| seed | steps | reward, first third | reward, last third | last / first | strict format base → adapter "
             "| accuracy base → adapter (95% CI) | CI above base | run s |",
             "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['steps']} | {r['first']:.3f} | {r['last']:.3f} | {r['ratio']:.2f} "
                     f"| {r['base_format']:.3f} → {r['format']:.3f} | {r['base_accuracy']:.3f} → {r['accuracy']:.3f} "
                     f"({r['ci'][0]:.3f}–{r['ci'][1]:.3f}) | {'yes' if r['ci'][0] > r['base_accuracy'] else 'no'} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def curve_table(rows: list[dict], key: str, groups: list[tuple[object, str]], group_key: str, header: str,
                blocks: int = 5, digits: int = 3) -> str:
    """A learning curve as a table: mean of the per-step `key` per block of steps, one line per group
    (`group_key` value, label), mean ± sd over the seeds."""
    steps = min(len(r[key]) for r in rows)
    size = steps // blocks
    spans = [(i * size, (i + 1) * size) for i in range(blocks)]
    lines = [f"| {header} | " + " | ".join(f"steps {a + 1}–{b}" for a, b in spans) + " |",
             "| --- |" + " ---: |" * blocks]
    for value, label in groups:
        runs = [r[key] for r in rows if r[group_key] == value]
        cells = []
        for a, b in spans:
            means = [statistics.fmean(values[a:b]) for values in runs]
            spread = f" ± {statistics.stdev(means):.{digits}f}" if len(means) > 1 else ""
            cells.append(f"{statistics.fmean(means):.{digits}f}{spread}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_doc(text: str, start: str = START, end: str = END) -> None:
    """Replace what stands between the `start` and `end` markers of docs/performance.md."""
    doc = DOC.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"bench: {DOC} has no {start} … {end} section to replace")
    head, rest = doc.split(start, 1)
    DOC.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2", help="comma-separated; 42 is the committed params.yaml's")
    parser.add_argument("--write", action="store_true", help="replace the table in docs/performance.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a seed misses a target")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"bench_demo: {cpu_name()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; seeds {seeds}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        work = Path(tmp) / "repo"
        copy_with_embedded(work)
        for seed in seeds:
            rows.append(run_seed(work, seed))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    report = (f"Measured {date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} cores), "
              f"`bench/bench_demo.py --seeds {args.seeds}`; targets: last / first ≥ {RATIO_TARGET}, "
              f"adapter strict format ≥ {FORMAT_TARGET}, adapter accuracy's 95% CI above the base model's "
              f"accuracy.\n\n{table(rows)}")
    print("\n" + report)
    if args.write:
        write_doc(report)
        print(f"bench_demo: table written to {DOC}")
    missed = [r["seed"] for r in rows if not meets(r)]
    if missed:
        print(f"bench_demo: seeds {missed} miss a target", file=sys.stderr)
        if args.check:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
