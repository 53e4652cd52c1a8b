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
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Real checkpoints' shapes (transformers' config defaults are not these), from their config.json.
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
_QWEN25_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
SHAPES = {
    "qwen2_5_vl-7b": dict(kind="qwen2_5_vl", patch_size=14, text=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters=_QWEN25_ROPE), vision={**_QWEN25_VISION, "out_hidden_size": 3584}),
    "qwen2_5_vl-3b": dict(kind="qwen2_5_vl", patch_size=14, text=dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters=_QWEN25_ROPE), vision={**_QWEN25_VISION, "out_hidden_size": 2048}),
    "qwen2_5_vl-32b": dict(kind="qwen2_5_vl", patch_size=14, text=dict(
        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters=_QWEN25_ROPE), vision={**_QWEN25_VISION, "out_hidden_size": 5120}),
    "qwen3_vl-8b": dict(kind="qwen3_vl", patch_size=16, text=dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")),
}
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
# B: the same learning (16 completions per optimizer step, same loss), faster. Liger's layer kernels
# (TRL 1.16 applies only those; its fused LM head is on in A too); vLLM stays awake in a pool sized for 16
# completions (no sleep/wake, its CUDA graphs kept); activations are kept (no recomputation), which
# a 4 × 4 micro-batch split keeps under the memory target.
TUNED = {
    **SEED_SETUP, "train.use_liger_kernel": True, "train.vllm_enable_sleep_mode": False,
    "train.vllm_gpu_memory_utilization": 0.28, "train.vllm_max_model_length": 2048,
    "train.gradient_checkpointing": False, "train.per_device_train_batch_size": 4,
    "train.gradient_accumulation_steps": 4,
    "model.max_model_len": 2048,  # = vllm_max_model_length (params require it); prepare only, not timed
}
FP8 = {"train.rollout_precision": "fp8", "train.max_logp_difference": None}
CONFIGS = {
    "A-seed": SEED_SETUP,
    "B-tuned": TUNED,
    # earlier candidates, kept for comparison (docs/performance.md)
    "B-recompute": {**TUNED, "train.gradient_checkpointing": True, "train.per_device_train_batch_size": 8,
                    "train.gradient_accumulation_steps": 2, "train.vllm_gpu_memory_utilization": 0.35},
    # Qwen3-VL-8B's larger weights (17.5 GB, twice: trainer and vLLM) need smaller micro-batches for 64 GiB
    "B-micro2": {**TUNED, "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 8},
    "B-fast": {**TUNED, "train.per_device_train_batch_size": 8, "train.gradient_accumulation_steps": 2,
               "train.vllm_gpu_memory_utilization": 0.35},
    # issue 16: vLLM and the trainer disagreed whenever a generation batch held several prompts. A and B
    # hold 2 (16 completions, 8 per prompt); these hold 4 (4 per prompt) and 1 (the reference level).
    "A-seed-4p": {**SEED_SETUP, "train.num_generations": 4},
    "B-tuned-4p": {**TUNED, "train.num_generations": 4},
    "B-1p": {**TUNED, "train.per_device_train_batch_size": 8, "train.gradient_accumulation_steps": 1},
    "B-micro2-4p": {**TUNED, "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 8,
                    "train.num_generations": 4},
    # Several GPUs: `NAME@N` runs a config on N GPUs, one training process each (`train.num_processes: auto`
    # relaunches the stage under accelerate, DDP unless the config names another accelerate config).
    # Weak scaling: B-tuned@2 (16 completions per GPU per step); strong scaling: B-strong@2 (16 in all).
    "B-strong": {**TUNED, "train.gradient_accumulation_steps": 2},
    "B-fsdp2": {**TUNED, "train.accelerate_config": "configs/accelerate/fsdp2.yaml"},
    # vLLM server mode: `make vllm-serve` on one GPU after the N training GPUs, weights synced over NCCL
    "B-server": {**TUNED, "train.vllm_mode": "server"},
    # the same with the next step's rollout generated while this one trains (pipeline/rollouts.py)
    "B-overlap": {**TUNED, "train.vllm_mode": "server", "train.rollout_overlap": 1},
    # adapter-only sync: vLLM serves the base weights with LoRA enabled and receives the adapter alone
    "B-adapter": {**TUNED, "train.vllm_weight_sync": "adapter"},
    # a 141 GB card (as in presets/gpu-h200-qwen3-vl-8b.yaml): adapter-only sync, 2 micro-batches of 8 (half the passes)
    "B-h200": {**TUNED, "train.vllm_weight_sync": "adapter", "train.per_device_train_batch_size": 8,
               "train.gradient_accumulation_steps": 2},
    # FP8 rollouts (pipeline/rollout_precision.py): vLLM quantizes the bf16 weights; merged sync
    # re-quantizes every step, adapter-only sync quantizes the base once. The stage's logp guard is
    # off: its gap on random weights is what these rows measure (--max-logp-difference still reports it)
    "B-fp8": {**TUNED, **FP8},
    "B-adapter-fp8": {**TUNED, "train.vllm_weight_sync": "adapter", **FP8},
    "B-h200-fp8": {**TUNED, "train.vllm_weight_sync": "adapter", "train.per_device_train_batch_size": 8,
                   "train.gradient_accumulation_steps": 2, **FP8},
    "B-micro2-fp8": {**TUNED, "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 8, **FP8},
    "B-server-fp8": {**TUNED, "train.vllm_mode": "server", **FP8},
    # QLoRA (model.quantization: 4bit): the trainer's base in NF4, vLLM on it dequantized, adapter-only sync
    "B-qlora": {**TUNED, "train.vllm_weight_sync": "adapter", "model.quantization": "4bit"},
    # 32B shapes on one card: 4-bit trainer, vLLM's bf16 copy in a 0.55 pool (64 GB of weights), recomputation
    "B-qlora-32b": {**TUNED, "train.vllm_weight_sync": "adapter", "model.quantization": "4bit",
                    "train.vllm_gpu_memory_utilization": 0.55, "train.gradient_checkpointing": True,
                    "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 8},
    # the same on an 80 GB card: vLLM's copy in fp8 (33 GB, quantized while it loads) in a 0.5 pool
    "B-qlora-32b-fp8": {**TUNED, "train.vllm_weight_sync": "adapter", "model.quantization": "4bit",
                        "train.vllm_gpu_memory_utilization": 0.5, "train.gradient_checkpointing": True,
                        "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 8, **FP8},
    "B-overlap-fp8": {**TUNED, "train.vllm_mode": "server", "train.rollout_overlap": 1, **FP8},
}
SERVER_PORT = 8000
# The most `sampling/sampling_logp_difference/mean` a step may show (random weights: ~0.05-0.09 with
# everything right, 0.56-0.73 on the steps that issue 16 broke); above it the benchmark exits 1.
MAX_LOGP_DIFFERENCE = 0.15


def build_model_dir(out: Path, shape: str) -> Path:
    """config + the project's offline tokenizer/processor + random bf16 weights, saved like a checkpoint."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen3VLConfig

    from pipeline import modeling

    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    spec = SHAPES[shape]
    tokenizer = modeling.build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in modeling.SPECIAL_TOKENS}
    config_class = Qwen2_5_VLConfig if spec["kind"] == "qwen2_5_vl" else Qwen3VLConfig
    config = config_class(
        text_config={**spec["text"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config=spec["vision"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["text"].get("tie_word_embeddings", False))
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(f"bench: random {shape}-shaped model, {params / 1e9:.2f} B parameters", flush=True)
    model.save_pretrained(out)
    (out / "bench_shape.json").write_text(json.dumps({"shape": shape, "parameters": params}) + "\n")
    pixels = IMAGE_SIDE * IMAGE_SIDE
    modeling.build_processor(spec["kind"], tokenizer, patch_size=spec["patch_size"], min_pixels=pixels,
                             max_pixels=pixels).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def measure_floors() -> dict:
    """What the card can do at best (docs/performance.md, "Floors"): a large device-to-device copy and a
    large bf16 matmul, and with several GPUs a copy from GPU 0 to GPU 1 (the server-mode weight sync's link)."""
    import torch

    def timed(fn, repeats: int) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    def copy_seconds(size: int = 4 << 30) -> float:
        src = torch.empty(size, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src), 20)

    def matmul_seconds(n: int) -> float:
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        return timed(lambda: a @ b, 50)

    def peer_seconds(size: int = 4 << 30) -> float:
        src = torch.empty(size, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(size, dtype=torch.uint8, device="cuda:1")
        return timed(lambda: dst.copy_(src), 10)

    n = 8192
    copy_s, matmul_s = copy_seconds(), matmul_seconds(n)
    floors = {
        "device": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "copy_gb_s": round(2 * (4 << 30) / copy_s / 1e9, 1),  # bytes read + bytes written
        "matmul_tflop_s": round(2 * n ** 3 / matmul_s / 1e12, 1),
    }
    if torch.cuda.device_count() > 1:
        floors["peer_gb_s"] = round((4 << 30) / peer_seconds() / 1e9, 1)  # bytes that crossed the link
    torch.cuda.empty_cache()
    return floors


# --mixed-sizes: MathVista's pictures differ in size; the processor (min = max pixels) keeps the area,
# so these aspect ratios give different image grids, i.e. different image-token counts per prompt
MIXED_SIZES = [(448, 448), (560, 336), (336, 560), (616, 308), (392, 504), (504, 392)]


def build_dataset(out: Path, rows: int = 256, mixed_sizes: bool = False, seed: int = 0, first_pid: int = 1) -> Path:
    """MathVista-schema rows with 448×448 images (or mixed sizes) and MathVista-length questions.
    `first_pid`: an eval set's pids must not repeat the training set's (prepare refuses the overlap)."""
    from datasets import Dataset

    from pipeline import synthetic

    path = out / "data" / "testmini-00000-of-00001.parquet"
    if path.exists():
        return out
    data = synthetic.make_rows(rows, seed=seed)
    for i, row in enumerate(data):
        size = MIXED_SIZES[i % len(MIXED_SIZES)] if mixed_sizes else (IMAGE_SIDE, IMAGE_SIDE)
        row["decoded_image"] = row["decoded_image"].resize(size)
        row["question"] = MATHVISTA_CONTEXT + row["question"]
        row["pid"] = str(first_pid + i)
    columns = {name: [row[name] for row in data] for name in data[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(columns, features=synthetic.features()).to_parquet(str(path))
    return out


def build_eval_dataset(work: Path, rows: int) -> Path:
    """A separate eval set of mixed image sizes, as MathVista testmini is evaluated: other questions and
    pids than the training set's."""
    return build_dataset(work / f"eval-{rows}-heldout", rows=rows, mixed_sizes=True, seed=1, first_pid=100_001)


class GpuMemory:
    """Peak memory of whole devices (vLLM's pool and every process included), sampled every 0.5 s
    with `torch.cuda.mem_get_info`: the same on ROCm and CUDA, no vendor tool needed."""

    def __init__(self, devices: list[int] | None = None):
        self.devices = devices or [0]
        self.peaks_mib = {device: 0 for device in self.devices}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @property
    def peak_mib(self) -> int:
        return max(self.peaks_mib.values())

    def _poll(self):
        import torch

        while not self._stop.is_set():
            for device in self.devices:
                free, total = torch.cuda.mem_get_info(device)
                self.peaks_mib[device] = max(self.peaks_mib[device], (total - free) // (1 << 20))
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def params_for(name: str, overrides: dict, model_dir: Path, data_dir: Path, steps: int,
               eval_dir: Path | None = None) -> dict:
    from pipeline.params import apply_overrides

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    common = {
        "run_id": f"bench-{name}", "model.name_or_path": str(model_dir), "model.image_factor": 28,
        "model.min_pixels": IMAGE_SIDE * IMAGE_SIDE, "model.max_pixels": IMAGE_SIDE * IMAGE_SIDE,
        "data.source": str(data_dir), "data.eval_fraction": 0.1, "train.max_steps": steps,
        "train.save_steps": 10_000, "train.log_completions": False, "tracking.wandb_mode": "disabled",
        "train.vllm_server_port": SERVER_PORT,
    }
    if eval_dir:  # a separate eval set, whole, as MathVista testmini is evaluated
        common["data.eval_source"] = {"source": str(eval_dir), "split": "testmini"}
    merged = {**common, **overrides}
    # the stage runs in the config's own folder: the accelerate config is named from the repository
    accelerate_config = merged.get("train.accelerate_config", base["train"]["accelerate_config"])
    merged["train.accelerate_config"] = str(REPO / accelerate_config)
    return apply_overrides(base, merged, f"bench {name}")


def _median(entries: list[dict], key: str) -> float | None:
    values = [e[key] for e in entries if e.get(key) is not None]
    return statistics.median(values) if values else None


def phase_split(history: list[dict], warmup: int, completions_per_step: int, gpus: int = 1) -> dict:
    """Median per-step phase times from the trainer's own log (pipeline.train logs `time/<phase>`)."""
    steps = [e for e in history if "step_time" in e]
    timed = steps[warmup:]
    if not timed:
        return {"steps_timed": 0}
    step = _median(timed, "step_time")
    rollout = _median(timed, "time/vLLM.generate")
    sync = _median(timed, "time/sync_weights") or 0.0
    prepare = _median(timed, "time/_prepare_inputs")
    completion_tokens = (_median(timed, "completions/mean_length") or 0) * completions_per_step
    tokens = [e.get("num_tokens") for e in steps]
    tokens_per_step = (tokens[-1] - tokens[warmup - 1]) / len(timed) if warmup and tokens[-1] else None
    train = step - prepare if prepare is not None else None
    return {
        "steps_timed": len(timed), "step_s": round(step, 2), "step_s_min": round(min(e["step_time"] for e in timed), 2),
        "rollout_s": round(rollout, 2) if rollout else None, "sync_s": round(sync, 2),
        "train_s": round(train, 2) if train else None,
        "other_s": round(prepare - rollout - sync, 2) if prepare and rollout else None,  # wake/sleep, rewards
        "completion_tokens_per_step": round(completion_tokens),
        "tokens_per_step": round(tokens_per_step) if tokens_per_step else None,
        "rollout_tokens_s": round(completion_tokens / rollout) if rollout else None,
        "train_tokens_s": round(tokens_per_step / train) if tokens_per_step and train else None,
        "completions_s_gpu": round(completions_per_step / step / gpus, 2),
        "startup_s": round(steps[0].get("time/startup", float("nan")), 1),
        "logp_diff": [round(e.get("sampling/sampling_logp_difference/mean", float("nan")), 4) for e in steps],
        # server mode: the server's whole time per rollout (rollout_s is what the step waited for),
        # how stale the trained batches were, and the share the importance sampling masked
        "server_rollout_s": _rounded(_median(timed, "rollout/seconds")),
        "staleness_max": _rounded(max((e.get("rollout/staleness", 0) for e in timed), default=None)),
        "masked_share_max": _rounded(max((e.get("sampling/importance_sampling_masked_share", 0) for e in timed),
                                         default=None), 3),
        # the ratio's batch mean at its lowest: near 0, the correction silences the batch (sequence
        # ratios far below 1 are not "masked" without a lower clip bound, yet weigh nothing)
        "is_ratio_mean_min": _rounded(min((e.get("sampling/importance_sampling_ratio/mean", 1) for e in timed),
                                          default=None), 3),
    }


def _rounded(value, places: int = 2):
    return None if value is None else round(value, places)


def phase_floors(result: dict, floors: dict, model: dict, params: dict, gpus: int = 1) -> dict:
    """Each phase's best possible time on this card (docs/performance.md), from the measured copy and matmul rates.

    rollout: every decode step reads all bf16 weights (plus the KV cache, on average half of its final
    size) once; completions run to max_completion_length; colocated, each of the `gpus` decodes its
    share, a server decodes them all. train: 6 × parameters × tokens, split over the `gpus`.
    sync: the merged weights are copied into vLLM once (read + write), or sent once over the link
    to the server's GPU."""
    bandwidth = floors["copy_gb_s"] * 1e9
    weight_bytes = 2 * model["parameters"]
    text = SHAPES[model["shape"]]["text"]
    head_dim = text.get("head_dim", text["hidden_size"] // text["num_attention_heads"])
    kv_bytes_per_token = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2
    decode_steps = params["train"]["max_completion_length"]
    completions = params["train"]["per_device_train_batch_size"] * params["train"]["gradient_accumulation_steps"] * gpus
    server = params["train"]["vllm_mode"] == "server"
    sequences = completions if server else completions / gpus  # decoded by one vLLM engine
    tokens = result.get("tokens_per_step") or 0
    mean_context = tokens / completions / 2 if completions else 0
    rollout = decode_steps * (weight_bytes + sequences * mean_context * kv_bytes_per_token) / bandwidth
    train = 6 * model["parameters"] * tokens / gpus / (floors["matmul_tflop_s"] * 1e12)
    sync = weight_bytes / (floors.get("peer_gb_s", 0) * 1e9) if server else 2 * weight_bytes / bandwidth
    # overlapped rollouts: the step waits for the longer of rollout and training, then syncs
    step = (max(rollout, train) if params["train"].get("rollout_overlap") else rollout + train) + sync
    out = {"rollout_floor_s": round(rollout, 2), "train_floor_s": round(train, 2), "sync_floor_s": round(sync, 3),
           "step_floor_s": round(step, 2)}
    for phase in ("rollout", "train", "sync", "step"):
        measured = result.get(f"{phase}_s")
        floor = out[f"{phase}_floor_s"]
        out[f"{phase}_x_floor"] = round(measured / floor, 2) if measured and floor else None
    return out


def parse_config(item: str, default_gpus: int = 1) -> tuple[str, int]:
    """`NAME` or `NAME@GPUS` (training GPUs; server mode takes one more for the server)."""
    name, _, gpus = item.partition("@")
    if name not in CONFIGS:
        raise SystemExit(f"bench: unknown config {name!r} in {item!r}; choose from {sorted(CONFIGS)}")
    if gpus and not (gpus.isdigit() and int(gpus) >= 1):
        raise SystemExit(f"bench: {item!r}: the GPU count after @ must be a positive integer")
    return name, int(gpus or default_gpus)


def _devices(gpus: list[int]) -> str:
    """`gpus` index the GPUs this benchmark sees: a CUDA_VISIBLE_DEVICES given to it is respected."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("HIP_VISIBLE_DEVICES")
    names = visible.split(",") if visible else [str(i) for i in range(max(gpus) + 1)]
    return ",".join(names[i] for i in gpus)


def _env(gpus: list[int]) -> dict:
    devices = _devices(gpus)
    # vLLM's INFO lines (engine start-up split) are parsed from the logs: LOG_LEVEL=info keeps them
    return dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=devices, HIP_VISIBLE_DEVICES=devices,
                LOG_LEVEL=os.environ.get("LOG_LEVEL", "info"),
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


class VllmServer:
    """`make vllm-serve` (the project's target) on a GPU of its own, stopped with its process group."""

    def __init__(self, model_dir: Path, gpu: int, params: dict, log: Path):
        self.command = ["make", "-C", str(REPO), "--no-print-directory", "vllm-serve", "LOCAL=1",
                        f"GPUS={_devices([gpu])}", f"MODEL={model_dir.resolve()}", f"PORT={SERVER_PORT}",
                        f"MAX_MODEL_LEN={params['train']['vllm_max_model_length'] or params['model']['max_model_len']}",
                        f"PRECISION={params['train']['rollout_precision']}"]
        self.log = log

    def __enter__(self):
        from pipeline.rollout_server import wait_until_up

        with self.log.open("w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.startup_s = round(wait_until_up(f"http://127.0.0.1:{SERVER_PORT}", self.process, 600, self.log), 1)
        return self

    def __exit__(self, *exc):
        import signal

        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def run(name: str, params: dict, work: Path, warmup: int, gpus: int = 1, model_dir: Path | None = None) -> dict:
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = (run_dir / "stages.log").open("w")
    training = list(range(gpus))
    server = params["train"]["vllm_mode"] == "server"
    subprocess.run([sys.executable, "-m", "pipeline.prepare"], cwd=run_dir, env=_env(training), stdout=log,
                   stderr=log, check=True)
    extra = {}
    with GpuMemory(training + [gpus] if server else training) as memory, contextlib.ExitStack() as stack:
        if server:
            extra["server_startup_s"] = stack.enter_context(VllmServer(model_dir, gpus, params,
                                                                       run_dir / "server.log")).startup_s
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pipeline.train"], cwd=run_dir, env=_env(training),
                                stdout=log, stderr=log)
        wall = time.perf_counter() - started
    log.close()
    extra.update(startup_split((run_dir / "stages.log").read_text(errors="replace")))
    history_file = run_dir / "outputs" / params["run_id"] / "train_logs" / "log_history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    train = params["train"]
    completions = train["per_device_train_batch_size"] * train["gradient_accumulation_steps"] * gpus
    peaks = {f"gpu{d}": round(mib / 1024, 1) for d, mib in memory.peaks_mib.items()}
    return {"config": name, "exit_code": result.returncode, "wall_s": round(wall, 1), "gpus": gpus + server,
            "accelerate": Path(train["accelerate_config"]).stem if gpus > 1 else None,
            "completions_per_step": completions, "prompts_per_generation": completions // train["num_generations"],
            "peak_gpu_gib": round(memory.peak_mib / 1024, 1), "peak_gib_per_gpu": peaks, **extra,
            **phase_split(history, warmup, completions, gpus + server)}


STARTUP_PATTERNS = {  # the trainer's own lines (pipeline.train) and vLLM 0.24's
    "model_load_s": r"model loaded in ([\d.]+) s",
    "trainer_ready_s": r"trainer ready in ([\d.]+) s",
    "vllm_weights_s": r"Model loading took [\d.]+ GiB (?:memory )?and ([\d.]+) seconds",
    "vllm_engine_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
    "vllm_compile_s": r"init engine \(profile, create kv cache, warmup model\) took [\d.]+ s \(compilation: ([\d.]+) s",
    "cuda_graphs_s": r"Graph capturing finished in ([\d.]+) secs",
}


def startup_split(log: str) -> dict:
    """Where the start-up goes, from the first process's log: the trainer's model load, then the
    trainer's construction (the colocated vLLM engine: its weights, torch.compile, CUDA graphs).
    `compile_cache_hit`: vLLM loaded its compiled graphs from VLLM_CACHE_ROOT instead of compiling."""
    split = {}
    for key, pattern in STARTUP_PATTERNS.items():
        found = re.search(pattern, log)
        split[key] = float(found[1]) if found else None
    split["compile_cache_hit"] = "from the cache, took" in log
    return split


def logp_check(result: dict, limit: float) -> dict:
    """Every step's vLLM-vs-trainer log-prob difference at or below `limit` (issue 16)."""
    values = [v for v in result.get("logp_diff", []) if v == v]  # NaN: a step without the metric
    worst = max(values) if values else None
    return {"logp_diff_max": worst, "logp_ok": bool(values) and worst <= limit}


def suite_entries(folder: Path, run_dir: Path) -> list[dict]:
    """Copy the suite files under the run's data/ (where params require local sources) → evaluate.suite."""
    import shutil

    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise SystemExit(f"bench: no <benchmark>.parquet in {folder} (bench/suite_files.py writes them)")
    (run_dir / "data" / "suite").mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy(path, run_dir / "data" / "suite" / path.name)
    return [{"name": path.stem, "source": f"data/suite/{path.name}"} for path in files]


def run_evaluations(run_dir: Path, params: dict, rows: int, backends: list[str]) -> list[dict]:
    """The evaluate stage on a trained run (base and adapter, `rows` eval rows), once per backend:
    vLLM (one engine, the adapter as a LoRARequest) against batched transformers generate."""
    from pipeline.params import Reports

    env = _env([0])
    results = []
    for backend in backends:
        params = {**params, "evaluate": {**params["evaluate"], "max_rows": rows, "backend": backend}}
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        started = time.perf_counter()
        with (run_dir / f"evaluate-{backend}.log").open("w") as log, GpuMemory() as memory:
            result = subprocess.run([sys.executable, "-m", "pipeline.evaluate"], cwd=run_dir, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
        metrics_file = run_dir / Reports.evaluation
        metrics = json.loads(metrics_file.read_text()) if result.returncode == 0 else {}
        tokens = sum(metrics[m]["mean_completion_tokens"] * metrics[m]["rows"] for m in ("base", "adapter")
                     if m in metrics)
        text = (run_dir / f"evaluate-{backend}.log").read_text()
        passes = [{"model": m[0], "rows": int(m[1]), "tokens": int(m[2]), "seconds": float(m[3]),
                   "tokens_s": round(int(m[2]) / float(m[3]))}
                  for m in re.findall(r"([\w.-]+ \w+) \[\w+\]: (\d+) rows, (\d+) tokens in ([\d.]+) s", text)]
        suite = {name: {"rows": m.get("base", {}).get("rows")} for name, m in metrics.get("suite", {}).items()}
        engine = re.search(r"vLLM engine for .* ready in ([\d.]+) s", text)
        results.append({"backend": backend, "exit_code": result.returncode, "wall_s": round(wall, 1),
                        "rows": rows, "tokens": round(tokens), "tokens_per_s_wall": round(tokens / wall),
                        "engine_start_s": float(engine[1]) if engine else None, "passes": passes, "suite": suite,
                        "peak_gpu_gib": round(memory.peak_mib / 1024, 1)})
        print(json.dumps({"evaluate": results[-1]}), flush=True)
    return results


COLUMNS = [("config", "config", "{}"), ("GPUs", "gpus", "{}"), ("exit", "exit_code", "{}"),
           ("compl/step", "completions_per_step", "{}"), ("s/step", "step_s", "{:.2f}"),
           ("rollout s", "rollout_s", "{:.2f}"), ("sync s", "sync_s", "{:.2f}"), ("train s", "train_s", "{:.2f}"),
           ("other s", "other_s", "{:.2f}"), ("rollout tok/s", "rollout_tokens_s", "{}"),
           ("train tok/s", "train_tokens_s", "{}"), ("start s", "startup_s", "{}"), ("peak GiB", "peak_gpu_gib", "{}"),
           ("step/floor", "step_x_floor", "{}"), ("B/A", "speedup", "{}"), ("compl/s/GPU", "completions_s_gpu", "{}"),
           ("× 1 GPU", "scaling", "{}"), ("max logp diff", "logp_diff_max", "{}"),
           ("server rollout s", "server_rollout_s", "{}"), ("max stale", "staleness_max", "{}"),
           ("max masked", "masked_share_max", "{}")]


def print_table(shape: str, floors: dict, results: list[dict]) -> None:
    peer = f", GPU 0 → 1 {floors['peer_gb_s']} GB/s" if floors.get("peer_gb_s") else ""
    print(f"\n{shape} on {floors['gpus']} × {floors['device']}: copy {floors['copy_gb_s']} GB/s, bf16 matmul "
          f"{floors['matmul_tflop_s']} TFLOP/s{peer}")
    rows = [[fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(COLUMNS)]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    for r in results:
        if r.get("gpus", 1) > 1:
            print(f"  {r['config']}: peak GiB per GPU {r['peak_gib_per_gpu']}"
                  + (f", server start {r['server_startup_s']} s" if r.get("server_startup_s") else ""))
    for r in results:
        if r.get("model_load_s") is not None:
            cached = "loaded from the cache" if r.get("compile_cache_hit") else "compiled"
            print(f"  {r['config']}: start-up {r.get('startup_s')} s: model load {r['model_load_s']} s, trainer "
                  f"ready {r.get('trainer_ready_s')} s (vLLM: weights {r.get('vllm_weights_s')} s, engine "
                  f"{r.get('vllm_engine_s')} s of which torch.compile {r.get('vllm_compile_s')} s ({cached}) and "
                  f"CUDA graphs {r.get('cuda_graphs_s')} s)")
    for r in results:
        if r.get("step_floor_s"):
            print(f"  {r['config']}: floors rollout {r['rollout_floor_s']} s, train {r['train_floor_s']} s, "
                  f"sync {r['sync_floor_s']} s = {r['step_floor_s']} s; measured × floor: rollout "
                  f"{r['rollout_x_floor']}, train {r['train_x_floor']}, sync {r['sync_x_floor']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-gpu"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2_5_vl-7b")
    parser.add_argument("--configs", default="A-seed,B-tuned",
                        help="comma-separated NAME or NAME@GPUS (training GPUs; B-server takes one more)")
    parser.add_argument("--gpus", type=int, default=1, help="training GPUs for configs without @GPUS")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    parser.add_argument("--evaluate", type=int, default=0, metavar="ROWS",
                        help="then time the evaluate stage on the last config's adapter, vLLM vs transformers")
    parser.add_argument("--eval-tokens", type=int, default=256, help="max_new_tokens for --evaluate")
    parser.add_argument("--eval-backends", default="vllm,transformers", help="evaluate backends to time, in order")
    parser.add_argument("--eval-rows", type=int, default=0, metavar="N",
                        help="evaluate on a separate set of N MathVista-schema rows of mixed image sizes "
                             "(data.eval_source; 1000 = testmini's size) instead of a share of the training rows")
    parser.add_argument("--suite", type=Path, default=None, metavar="DIR",
                        help="with --evaluate: every <benchmark>.parquet in DIR (bench/suite_files.py writes them) "
                             "becomes an evaluate.suite entry of the last config, timed with it")
    parser.add_argument("--mixed-sizes", action="store_true", help="images of different sizes (MathVista's are)")
    parser.add_argument("--max-logp-difference", type=float, default=MAX_LOGP_DIFFERENCE,
                        help="fail (exit 1) when any step's sampling_logp_difference/mean is above this")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need --warmup >= 1 (vLLM compiles its first shapes) and --steps > --warmup")
    args.work = args.work.resolve()  # every stage runs in a folder of its own
    runs = [parse_config(item, args.gpus) for item in args.configs.split(",")]
    floors = measure_floors()
    needed = max(gpus + (CONFIGS[name].get("train.vllm_mode") == "server") for name, gpus in runs)
    if needed > floors["gpus"]:
        raise SystemExit(f"bench: the configs need {needed} GPUs, {floors['gpus']} visible")
    print(f"bench: floors {json.dumps(floors)}", flush=True)
    model_dir = build_model_dir(args.work / f"{args.shape}-random", args.shape)
    model = json.loads((model_dir / "bench_shape.json").read_text())
    data_dir = build_dataset(args.work / ("mathvista-mixed" if args.mixed_sizes else "mathvista-448"),
                             mixed_sizes=args.mixed_sizes)
    eval_dir = build_eval_dataset(args.work, args.eval_rows) if args.eval_rows else None
    results: list[dict] = []
    for name, gpus in runs:
        label = name if gpus == 1 else f"{name}-{gpus}gpu"  # a run id: letters, digits, '.', '_', '-'
        params = params_for(f"{args.shape}-{label}", CONFIGS[name], model_dir, data_dir, args.steps, eval_dir)
        if args.suite and (name, gpus) == runs[-1]:
            params["evaluate"]["suite"] = suite_entries(args.suite, args.work / args.shape / label)
        result = run(label, params, args.work / args.shape, args.warmup, gpus, model_dir)
        result.update(phase_floors(result, floors, model, params, gpus))
        result.update(logp_check(result, args.max_logp_difference))
        print(f"bench: {label}: sampling_logp_difference/mean per step {result.get('logp_diff')} "
              f"({result['prompts_per_generation']} prompts per generation batch)", flush=True)
        if results and results[0].get("step_s") and result.get("step_s") and gpus == 1:
            result["speedup"] = round(results[0]["step_s"] / result["step_s"], 2)
        one_gpu = next((r for r in results if r["gpus"] == 1 and r.get("completions_s_gpu")), None)
        if one_gpu and result.get("completions_s_gpu") and result["gpus"] > 1:  # completions/s, all GPUs
            result["scaling"] = round(result["completions_s_gpu"] * result["gpus"] / one_gpu["completions_s_gpu"], 2)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.write_text(json.dumps({"shape": args.shape, "model": model, "floors": floors,
                                            "steps": args.steps, "warmup": args.warmup, "results": results},
                                           indent=2) + "\n")
    print_table(args.shape, floors, results)
    if args.evaluate:
        params["evaluate"]["max_new_tokens"] = args.eval_tokens
        evaluations = run_evaluations(args.work / args.shape / label, params, args.evaluate,
                                      args.eval_backends.split(","))
        if args.out:
            report = json.loads(args.out.read_text())
            args.out.write_text(json.dumps({**report, "evaluate": evaluations}, indent=2) + "\n")
    bad = [r["config"] for r in results if not r.get("logp_ok")]
    if bad:
        raise SystemExit(f"bench: vLLM's and the trainer's log-probs differ by more than {args.max_logp_difference} "
                         f"on a step (or were not logged) in {bad}: see logp_diff per config (issue 16)")


if __name__ == "__main__":
    main()
