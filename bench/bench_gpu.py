"""GRPO step time on a real-size (7B-shaped) Qwen2.5-VL: the seed's setup (A) vs our tuned one (B).

Time and memory depend on shapes, not weight values, so a randomly initialised model with
Qwen2.5-VL-7B's shapes runs the kernels a real run does. Random weights rarely stop early:
completions run to max_completion_length, the worst case, which is what we report.

Every configuration goes through the project's own stages (`python -m pipeline.prepare`, then
`python -m pipeline.train`, the commands of the DVC stages `make train` runs), with a params.yaml
written per configuration. Run on a GPU machine: `make bench-gpu` (or `python bench/bench_gpu.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Qwen2.5-VL-7B-Instruct's shapes (transformers' Qwen2_5_VLConfig() defaults are not these).
TEXT_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31])
IMAGE_SIDE = 448
MATHVISTA_CONTEXT = (
    "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, "
    "at the end. The figure shows a scientific chart with several labelled parts; read the values from the axes "
    "and the legend carefully before answering. "
)

SEED_SETUP = {  # A: the seed's setup, TRL defaults otherwise
    "train.per_device_train_batch_size": 8, "train.gradient_accumulation_steps": 2, "train.num_generations": 8,
    "train.max_completion_length": 512, "lora.r": 16, "lora.alpha": 32, "lora.target_modules": ["q_proj", "v_proj"],
    "train.gradient_checkpointing": True, "train.use_vllm": True, "train.vllm_mode": "colocate",
    "train.vllm_enable_sleep_mode": True, "train.vllm_gpu_memory_utilization": 0.7,
}
TUNED = {  # B: the same learning, faster: no logits materialised, vLLM kept awake in a right-sized pool
    **SEED_SETUP, "train.use_liger_kernel": True, "train.vllm_enable_sleep_mode": False,
    "train.vllm_gpu_memory_utilization": 0.35, "train.vllm_max_model_length": 2048,
}
TUNED_NO_LIGER = {**TUNED, "train.use_liger_kernel": False}
# with vLLM awake in 35% and no logits materialised, activations fit without recomputation
TUNED_NO_RECOMPUTE = {**TUNED, "train.gradient_checkpointing": False}
CONFIGS = {"A-seed": SEED_SETUP, "B-tuned": TUNED, "B-no-liger": TUNED_NO_LIGER, "B-fast": TUNED_NO_RECOMPUTE}


def build_model_dir(out: Path) -> Path:
    """config + the project's offline tokenizer/processor + random bf16 weights, saved like a checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    from pipeline import modeling

    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    tokenizer = modeling.build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in modeling.SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={**TEXT_7B, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=VISION_7B, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(f"bench: random 7B-shaped Qwen2.5-VL, {params / 1e9:.2f} B parameters", flush=True)
    model.save_pretrained(out)
    pixels = IMAGE_SIDE * IMAGE_SIDE
    modeling.build_processor("qwen2_5_vl", tokenizer, patch_size=14, min_pixels=pixels, max_pixels=pixels
                             ).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def build_dataset(out: Path, rows: int = 256) -> Path:
    """MathVista-schema rows with 448×448 images and MathVista-length questions."""
    from datasets import Dataset

    from pipeline import synthetic

    path = out / "data" / "testmini-00000-of-00001.parquet"
    if path.exists():
        return out
    data = synthetic.make_rows(rows, seed=0)
    for row in data:
        row["decoded_image"] = row["decoded_image"].resize((IMAGE_SIDE, IMAGE_SIDE))
        row["question"] = MATHVISTA_CONTEXT + row["question"]
    columns = {name: [row[name] for row in data] for name in data[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=synthetic.features()).to_parquet(str(path))
    return out


class GpuMemory:
    """Peak GPU memory of the whole device (vLLM's pool included), sampled by nvidia-smi."""

    def __init__(self):
        self.peak_mib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.peak_mib = max(self.peak_mib, int(out.stdout.split()[0]))
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def params_for(name: str, overrides: dict, model_dir: Path, data_dir: Path, steps: int) -> dict:
    from pipeline.params import apply_overrides

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    common = {
        "run_id": f"bench-{name}", "model.name_or_path": str(model_dir), "model.image_factor": 28,
        "model.min_pixels": IMAGE_SIDE * IMAGE_SIDE, "model.max_pixels": IMAGE_SIDE * IMAGE_SIDE,
        "data.source": str(data_dir), "data.eval_fraction": 0.1, "train.max_steps": steps,
        "train.save_steps": 10_000, "train.log_completions": False, "tracking.wandb_mode": "disabled",
    }
    return apply_overrides(base, {**common, **overrides}, f"bench {name}")


def run(name: str, params: dict, work: Path, warmup: int) -> dict:
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    log = (run_dir / "stages.log").open("w")
    subprocess.run([sys.executable, "-m", "pipeline.prepare"], cwd=run_dir, env=env, stdout=log, stderr=log,
                   check=True)
    started = time.perf_counter()
    with GpuMemory() as memory:
        result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=run_dir, env=env, stdout=log,
                                stderr=log)
    wall = time.perf_counter() - started
    history_file = run_dir / "outputs" / params["run_id"] / "train_logs" / "log_history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    steps = [entry for entry in history if "step_time" in entry]
    timed = [entry["step_time"] for entry in steps[warmup:]]
    tokens = [entry.get("num_tokens") for entry in steps]
    tokens_per_step = (tokens[-1] - tokens[warmup - 1]) / len(timed) if timed and warmup and tokens[-1] else None
    return {
        "config": name, "exit_code": result.returncode, "wall_s": round(wall, 1),
        "steps_timed": len(timed), "step_s_mean": round(statistics.mean(timed), 2) if timed else None,
        "step_s_min": round(min(timed), 2) if timed else None,
        "tokens_per_step": round(tokens_per_step) if tokens_per_step else None,
        "peak_gpu_gib": round(memory.peak_mib / 1024, 1),
        "logp_diff": [round(e.get("sampling/sampling_logp_difference/mean", float("nan")), 4) for e in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"))
    parser.add_argument("--configs", default="A-seed,B-tuned")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args()
    model_dir = build_model_dir(args.work / "qwen2_5_vl-7b-random")
    data_dir = build_dataset(args.work / "mathvista-448")
    results = []
    for name in args.configs.split(","):
        params = params_for(name, CONFIGS[name], model_dir, data_dir, args.steps)
        results.append(run(name, params, args.work, args.warmup))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    header = ('config', 'exit', 's/step', 'min', 'tokens/step', 'peak GiB', 'wall s')
    print("\n{:12s} {:>4s} {:>7s} {:>6s} {:>11s} {:>8s} {:>7s}".format(*header))
    for r in results:
        print(f"{r['config']:12s} {r['exit_code']:>4d} {r['step_s_mean'] or float('nan'):>7.2f} "
              f"{r['step_s_min'] or float('nan'):>6.2f} {r['tokens_per_step'] or 0:>11d} {r['peak_gpu_gib']:>8.1f} "
              f"{r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
