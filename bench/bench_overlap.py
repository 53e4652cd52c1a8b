"""Does the demo learn as well with overlapped rollouts? `make bench-overlap` (or `bench/bench_overlap.py`).

Runs the demo's train stage (DVC experiment, `prepare → train`) per seed twice against one vLLM
server process (`python -m pipeline.rollout_server`, the CPU build here): synchronous server mode
(`train.rollout_overlap: 0`) and overlapped (`1`, rollouts one step stale). Prints per run the
mean training reward over the first and last thirds of the steps, the largest staleness, the mean
share of sequences the importance sampling masked, and the mean vLLM-vs-trainer log-prob
difference; then, per mode, the mean and spread over seeds of the last third's reward. The target
(issue 22): the overlapped last-third reward within the seeds' spread of the synchronous one.
`--write` replaces the table in docs/performance.md ("Overlapped rollouts").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench_demo import copy_with_embedded, cpu_name, curve_table, thirds, write_doc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
START, END = "<!-- bench_overlap:start -->", "<!-- bench_overlap:end -->"
MODEL = "assets/embedded/tiny-qwen2_5_vl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, port: int, log: Path) -> subprocess.Popen:
    from pipeline.rollout_server import wait_until_up

    process = subprocess.Popen([sys.executable, "-m", "pipeline.rollout_server", "--model", MODEL, "--port", str(port),
                                "--max-model-len", "1024"], cwd=work, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", process, 300, log)
    except SystemExit:
        process.kill()
        raise
    return process


def run(work: Path, seed: int, overlap: int, port: int) -> dict:
    run_id = f"seed{seed}-overlap{overlap}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.experiments", "--run-id", run_id, "--preset", "demo",
                             "--set", f"seed={seed}", "--set", "train.vllm_mode=server",
                             "--set", f"train.vllm_server_port={port}", "--set", f"train.rollout_overlap={overlap}",
                             "train"], cwd=work, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_overlap: {run_id} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    history = json.loads((work / "outputs" / run_id / "train_logs" / "log_history.json").read_text())
    steps = [entry for entry in history if "reward" in entry]
    rewards = [entry["reward"] for entry in steps]
    first, last = thirds(rewards)

    def mean(key: str) -> float:
        return statistics.fmean(entry.get(key, 0.0) for entry in steps)

    return {"seed": seed, "overlap": overlap, "steps": len(steps), "first": first, "last": last,
            "staleness": max(entry.get("rollout/staleness", 0.0) for entry in steps),
            "masked": mean("sampling/importance_sampling_masked_share"),
            "logp_diff": mean("sampling/sampling_logp_difference/mean"),
            "seconds": time.perf_counter() - started, "rewards": rewards}


def table(rows: list[dict]) -> str:
    lines = ["| seed | rollouts | steps | reward, first third | reward, last third | max staleness | masked share "
             "(mean) | logp difference (mean) | run s |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        mode = "overlapped" if r["overlap"] else "synchronous"
        lines.append(f"| {r['seed']} | {mode} | {r['steps']} | {r['first']:.3f} | {r['last']:.3f} "
                     f"| {r['staleness']:.0f} | {r['masked']:.3f} | {r['logp_diff']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> tuple[str, bool]:
    by_mode = {mode: [r["last"] for r in rows if r["overlap"] == mode] for mode in (0, 1)}
    sync, over = by_mode[0], by_mode[1]
    spread = statistics.stdev(sync) if len(sync) > 1 else 0.0
    within = abs(statistics.fmean(over) - statistics.fmean(sync)) <= spread
    text = (f"Last-third reward over {len(sync)} seeds: synchronous {statistics.fmean(sync):.3f} ± {spread:.3f} "
            f"(sd over seeds), overlapped {statistics.fmean(over):.3f}"
            + (f" ± {statistics.stdev(over):.3f}" if len(over) > 1 else "")
            + f": difference {statistics.fmean(over) - statistics.fmean(sync):+.3f}, "
            + ("within" if within else "outside") + " the synchronous runs' spread.")
    return text, within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--write", action="store_true", help="replace the table in docs/performance.md")
    parser.add_argument("--out", type=Path, help="also write every run's rewards per step as JSON here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"bench_overlap: {cpu_name()}, {os.cpu_count()} cores; seeds {seeds}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as tmp:
        work = Path(tmp) / "repo"
        copy_with_embedded(work)
        port = free_port()
        server = start_server(work, port, Path(tmp) / "server.log")
        try:
            for seed in seeds:
                for overlap in (0, 1):
                    rows.append(run(work, seed, overlap, port))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
    text, within = summary(rows)
    curve = curve_table(rows, "rewards", [(0, "synchronous"), (1, "overlapped")], "overlap", "rollouts")
    report = (f"Measured {date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} cores), "
              f"`bench/bench_overlap.py --seeds {args.seeds}` (demo preset, vLLM CPU server, one process for both "
              f"modes).\n\n{table(rows)}\n\nMean reward per block of steps over the seeds (± sd over seeds):\n\n"
              f"{curve}\n\n{text}")
    print("\n" + report)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.write:
        write_doc(report, START, END)
        print("bench_overlap: table written to docs/performance.md")
    if not within:
        print("bench_overlap: the overlapped runs' reward is outside the synchronous runs' spread", file=sys.stderr)


if __name__ == "__main__":
    main()
