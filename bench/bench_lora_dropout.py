"""LoRA dropout in GRPO: does the demo learn as well without it, and how far does it put the trainer
from the sampler? `python bench/bench_lora_dropout.py` (CPU, ~12 min for 2 values x 3 seeds).

vLLM samples the rollouts without dropout; the trainer's log-probabilities, which the importance-
sampling correction and the logp-difference guard compare with vLLM's, are computed in training
mode, with LoRA dropout active. Per seed and `lora.dropout` value this runs the whole demo pipeline
(`make demo`'s DVC experiment: prepare, train, evaluate, publish) in one fresh copy of the working
tree, and prints one row per run: the mean training reward over the first and last thirds of the
steps, the evaluation's strict format and accuracy, and the per-step
`sampling/sampling_logp_difference/mean` (mean and largest over the steps); then the learning curve
(reward per block of steps, mean ± sd over the seeds) per dropout value.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench_demo import copy_with_embedded, cpu_name, curve_table, thirds

LOGP = "sampling/sampling_logp_difference/mean"


def run(work: Path, seed: int, dropout: float) -> dict:
    run_id = f"seed{seed}-dropout{dropout:g}"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.experiments", "--run-id", run_id, "--preset", "demo",
                             "--set", f"seed={seed}", "--set", f"lora.dropout={dropout}"],
                            cwd=work, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_lora_dropout: {run_id} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    history = json.loads((work / "outputs" / run_id / "train_logs" / "log_history.json").read_text())
    steps = [entry for entry in history if "reward" in entry]
    rewards = [entry["reward"] for entry in steps]
    logp = [entry[LOGP] for entry in steps if LOGP in entry]
    metrics = json.loads((work / "reports" / "eval_metrics.json").read_text())
    first, last = thirds(rewards)
    adapter = metrics["adapter"]
    return {"seed": seed, "dropout": dropout, "steps": len(steps), "first": first, "last": last,
            "format": adapter["strict_format"], "accuracy": adapter["accuracy"], "ci": adapter["accuracy_ci95"],
            "logp_mean": statistics.fmean(logp), "logp_max": max(logp), "rewards": rewards, "logp": logp,
            "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    lines = ["| seed | lora.dropout | steps | reward, first third | reward, last third | strict format | accuracy "
             "(95% CI) | logp difference per step: mean | max | run s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['dropout']:g} | {r['steps']} | {r['first']:.3f} | {r['last']:.3f} "
                     f"| {r['format']:.3f} | {r['accuracy']:.3f} ({r['ci'][0]:.3f}–{r['ci'][1]:.3f}) "
                     f"| {r['logp_mean']:.4f} | {r['logp_max']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _dropout_groups(rows: list[dict]) -> tuple[list, str, str]:
    return [(d, f"{d:g}") for d in sorted({r["dropout"] for r in rows}, reverse=True)], "dropout", "lora.dropout"


def summary(rows: list[dict]) -> str:
    parts = []
    for dropout in sorted({r["dropout"] for r in rows}, reverse=True):
        last = [r["last"] for r in rows if r["dropout"] == dropout]
        spread = f" ± {statistics.stdev(last):.3f}" if len(last) > 1 else ""
        parts.append(f"dropout {dropout:g}: {statistics.fmean(last):.3f}{spread}")
    return f"Last-third reward over the seeds (mean ± sd): {'; '.join(parts)}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2")
    parser.add_argument("--dropouts", default="0.05,0.0")
    parser.add_argument("--out", type=Path, help="also write every run's per-step values as JSON here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    dropouts = [float(d) for d in args.dropouts.split(",")]
    print(f"bench_lora_dropout: {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"seeds {seeds}, dropout {dropouts}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dropout-") as tmp:
        work = Path(tmp) / "repo"
        copy_with_embedded(work)
        for seed in seeds:
            for dropout in dropouts:
                rows.append(run(work, seed, dropout))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    rewards = curve_table(rows, 'rewards', *_dropout_groups(rows))
    logp = curve_table(rows, 'logp', *_dropout_groups(rows), digits=4)
    report = (f"Measured {date.today().isoformat()} on {cpu_name()} ({os.cpu_count()} cores), "
              f"`bench/bench_lora_dropout.py --seeds {args.seeds} --dropouts {args.dropouts}` (demo preset, "
              f"vLLM colocate on CPU).\n\n{table(rows)}\n\nReward per block of steps (mean ± sd over the seeds):\n\n"
              f"{rewards}\n\nvLLM-vs-trainer logp difference per block of steps (mean ± sd "
              f"over the seeds):\n\n{logp}\n\n{summary(rows)}")
    print("\n" + report)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
