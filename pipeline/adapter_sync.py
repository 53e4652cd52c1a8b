"""Adapter-only weight sync for colocated vLLM (`train.vllm_weight_sync: adapter`).

TRL 1.16 keeps vLLM's copy of the policy current by merging the LoRA adapter into the base weights
and reloading every weight into the engine each step (7B: ~16 GB copied for ~20 MB that changed).
Here the engine is built with LoRA enabled, serves the untouched base weights, and gets the policy
as a LoRA adapter: each step the trainer writes the adapter's weights (a few MB) to a folder and
the next rollouts name it in a fresh `LoRARequest`. vLLM applies LoRA in its own kernels, which
costs some decode speed; `make bench-gpu` measures both settings (docs/performance.md).

The base weights must stay in the engine, so sleep mode (which discards them) is refused by the
params; the vision tower carries no adapter, so vLLM's encoder cache stays valid across steps.

vLLM applies an adapter only to the modules its `lora_target_modules` filter admits, matched
against its own (often packed: `qkv_proj`) module names; a filter that matches none of the
adapter's modules loads the adapter without error and serves the base model. `probe` checks at
engine start, on one prompt, that a non-zero adapter reaches vLLM's log-probs, and the run refuses
to start (`AdapterNotApplied`) when it does not.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.callbacks import RolloutMismatch
from pipeline.vllm_generator import engine_lora_options

logger = logging.getLogger("pipeline.adapter_sync")

PROBE_PROMPT = "Count the sides of a square, then of a triangle, and add the two numbers."
PROBE_TOKENS = 16  # greedy completion tokens compared
PROBE_TOLERANCE = 0.01  # mean |vLLM - trainer| log-prob per token allowed, or 3 x the base weights' own gap
# the probe adapter must move the trainer's log-probs by this and by 4 x the allowance: then vLLM
# cannot be within the allowance of both the adapted trainer and the base model
PROBE_MIN_SHIFT = 0.1


class AdapterNotApplied(RolloutMismatch):
    """vLLM with the synced adapter does not give the trainer's log-probabilities: it would sample from
    another policy than the one trained (the base model, when its LoRA target filter matches nothing)."""


def enable_lora_in_engine(rank: int, target_modules: list[str]) -> None:
    """Build TRL's colocated `vllm.LLM` with LoRA support for one adapter of `rank` on the adapter's
    own `target_modules`; call before the trainer is built (TRL creates the engine in its constructor)."""
    from pipeline import compat

    compat.add_vllm_engine_options(**engine_lora_options(rank, target_modules))


class AdapterSync:
    """Replaces TRL's `sync_weights` and hands the current adapter to every generate call."""

    def __init__(self, generation: Any, model: Any):
        from peft import get_peft_model_state_dict

        self._state_dict = get_peft_model_state_dict
        self.generation = generation
        self.model = model
        shm = Path("/dev/shm")
        self.root = Path(tempfile.mkdtemp(prefix="grpo-policy-", dir=shm if shm.is_dir() else None))
        self.version = 0
        self.request = None
        self.llm = generation.llm
        generation.llm = self
        generation.sync_weights = self.sync

    def sync(self) -> None:
        """Write the adapter (weights in the engine's dtype, PEFT's layout) and point the next
        rollouts at it. A new adapter id each time: vLLM caches adapters by id."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self.version += 1
        folder = self.root / f"v{self.version}"
        folder.mkdir()
        dtype = self.llm.llm_engine.model_config.dtype
        weights = {name: tensor.detach().to(dtype).contiguous().cpu()
                   for name, tensor in self._state_dict(self.model).items()}
        save_file(weights, str(folder / "adapter_model.safetensors"))
        config = self.model.peft_config["default"].to_dict()
        (folder / "adapter_config.json").write_text(json.dumps(config, default=_jsonable))
        self.request = LoRARequest(f"policy-v{self.version}", self.version, str(folder))
        shutil.rmtree(self.root / f"v{self.version - 2}", ignore_errors=True)  # the previous one may still load

    def generate(self, prompts: Any, *args: Any, **kwargs: Any):
        if self.request is not None:
            kwargs.setdefault("lora_request", self.request)
        return self.llm.generate(prompts, *args, **kwargs)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def forget(self) -> None:
        """Drop the current adapter: the next rollouts use the base weights until the next sync."""
        if self.request is not None:
            shutil.rmtree(self.root / f"v{self.version}", ignore_errors=True)
        self.request = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)


def trainer_base_weights(model: Any):
    """The base weights the trainer computes with, under the checkpoint's names: a 4-bit layer
    (`model.quantization: 4bit`) dequantized, so vLLM's base is the trainer's and not the checkpoint
    the quantization rounded; the adapter's own weights are left out (they travel by `sync`)."""
    import bitsandbytes as bnb

    prefix = model.prefix  # "lora_": PEFT's parameters
    for name, param in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if prefix in name:
            continue
        if isinstance(param, bnb.nn.Params4bit):
            yield name, bnb.functional.dequantize_4bit(param.data, param.quant_state)
        else:
            yield name, param.detach()


def _jsonable(value: Any) -> Any:
    """What json cannot write in a peft config: sets of module names, enums."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums (task_type, peft_type)
        return value.value
    return value


@dataclass
class ProbeResult:
    """Mean |difference| of log-probabilities per completion token, on one prompt, greedy."""

    tokens: int  # completion tokens compared
    scale: float  # std of the probe adapter's lora_B entries
    floor: float  # vLLM against the trainer, base weights (no adapter): the numerics' own gap
    shift: float  # the trainer with the probe adapter against the trainer without: what it changes
    to_trainer: float  # vLLM with the synced adapter against the trainer with it: must be small
    to_trainer_max: float  # the largest of those per-token differences
    to_base: float  # vLLM with the synced adapter against the trainer without it: must be large
    greedy_differs: bool  # vLLM's greedy completion with the adapter is not its base one
    seconds: float

    @property
    def allowance(self) -> float:
        return max(PROBE_TOLERANCE, 3 * self.floor)

    @property
    def applied(self) -> bool:
        return self.to_trainer <= self.allowance

    def as_dict(self) -> dict:
        return {**asdict(self), "allowance": self.allowance, "applied": self.applied}


def _prompt_ids(processing_class: Any) -> list[int]:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    messages = [{"role": "user", "content": [{"type": "text", "text": PROBE_PROMPT}]}]
    try:
        text = processing_class.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 - a processor without a chat template: the plain text will do
        text = PROBE_PROMPT
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _trainer_logps(model: Any, prompt: list[int], completion: list[int]):
    """The trainer's log-probabilities of `completion` after `prompt` (no dropout, no temperature:
    what vLLM's greedy decoding reports)."""
    import torch

    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, len(prompt) - 1:-1]
    logps = logits.float().log_softmax(-1)
    return logps.gather(-1, ids[0, len(prompt):, None]).squeeze(-1)


def _vllm_greedy(llm: Any, prompt: list[int], request: Any, stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """vLLM's greedy completion of `prompt` and the log-probability of each of its tokens; cut before
    the first vision token (the trainer's text-only forward cannot take one)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=PROBE_TOKENS, logprobs=0, ignore_eos=True)
    output = llm.generate([{"prompt_token_ids": prompt}], params, lora_request=request, use_tqdm=False)[0].outputs[0]
    tokens, logps = [], []
    for token, step in zip(output.token_ids, output.logprobs, strict=True):
        if token in stop_ids:
            break
        tokens.append(token)
        logps.append(step[token].logprob)
    return tokens, logps


def probe(sync: AdapterSync, model: Any, processing_class: Any, *, seed: int = 0) -> ProbeResult:
    """Sync a throwaway adapter (random non-zero lora_B, the trainer's own lora_A) through `sync`, and
    compare vLLM's greedy log-probabilities with it against the trainer's, with and without it.

    The adapter's size is raised until it moves the trainer's log-probs by clearly more than the
    allowed gap, so that "vLLM serves the base model" and "vLLM serves the adapter" cannot be
    confused. The trainer's weights, its RNG and the sync's state are left as they were (the next
    rollouts use the base weights, which equal the untrained adapter's, until TRL's first sync)."""
    import torch

    from pipeline import modeling

    started = time.perf_counter()
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    stop_ids = set(modeling.vision_token_ids(tokenizer))
    prompt = _prompt_ids(processing_class)
    lora_b = {name: param for name, param in model.named_parameters() if "lora_B" in name}
    if not lora_b:
        raise ValueError("adapter-only sync: the model carries no LoRA adapter")
    saved = {name: param.detach().clone() for name, param in lora_b.items()}
    generator = torch.Generator().manual_seed(seed)
    noise = {name: torch.randn(param.shape, generator=generator) for name, param in lora_b.items()}
    training = model.training
    model.eval()  # no dropout: vLLM has none
    try:
        base_tokens, base_vllm = _vllm_greedy(sync.llm, prompt, None, stop_ids)
        if not base_tokens:
            raise ValueError("adapter-only sync probe: vLLM's greedy completion starts with a vision token")
        base_trainer = _trainer_logps(model, prompt, base_tokens)
        floor = (base_trainer - torch.tensor(base_vllm, device=base_trainer.device)).abs().mean().item()
        # 3 x what `check` needs, measured on the base model's completion (the adapter's own differs);
        # no larger than that: in bf16 the numerics' gap grows with the activations
        target = 3 * max(PROBE_MIN_SHIFT, 4 * max(PROBE_TOLERANCE, 3 * floor))
        scale = 1e-3
        for _ in range(14):  # x2 each time: 1e-3 to ~8
            with torch.no_grad():
                for name, param in lora_b.items():
                    param.copy_(noise[name].to(param.device, param.dtype) * scale)
            if (_trainer_logps(model, prompt, base_tokens) - base_trainer).abs().mean().item() >= target:
                break
            scale *= 2
        sync.sync()
        tokens, vllm = _vllm_greedy(sync.llm, prompt, sync.request, stop_ids)
        if not tokens:
            raise ValueError("adapter-only sync probe: vLLM's greedy completion starts with a vision token")
        vllm = torch.tensor(vllm, device=base_trainer.device)
        with_adapter = _trainer_logps(model, prompt, tokens)
        with torch.no_grad():
            for name, param in lora_b.items():
                param.copy_(saved[name])
        without = _trainer_logps(model, prompt, tokens)
        gap = (vllm - with_adapter).abs()
        result = ProbeResult(tokens=len(tokens), scale=scale, floor=floor,
                             shift=(with_adapter - without).abs().mean().item(), to_trainer=gap.mean().item(),
                             to_trainer_max=gap.max().item(), to_base=(vllm - without).abs().mean().item(),
                             greedy_differs=tokens != base_tokens[:len(tokens)],
                             seconds=time.perf_counter() - started)
    finally:
        with torch.no_grad():
            for name, param in lora_b.items():
                param.copy_(saved[name])
        model.train(training)
        sync.forget()
    return result


def check(result: ProbeResult, targets: list[str] | None) -> None:
    """Refuse a run whose vLLM does not serve the synced adapter (see `probe`)."""
    numbers = (f"mean |log-prob difference| per token over {result.tokens} greedy tokens: vLLM with the adapter "
               f"against the trainer {result.to_trainer:.4f} (allowed {result.allowance:.4f}), against the base "
               f"model {result.to_base:.4f}; the adapter moves the trainer by {result.shift:.4f}")
    if result.shift < max(PROBE_MIN_SHIFT, 4 * result.allowance):
        raise AdapterNotApplied(f"train.vllm_weight_sync: adapter: the start-up probe is inconclusive ({numbers}): "
                                "vLLM and the trainer disagree too much on the base weights alone")
    if not result.applied:
        served = ("the base model: its LoRA target filter matched none of the adapter's modules"
                  if result.to_base < result.to_trainer else "neither the base model nor the adapter")
        raise AdapterNotApplied(
            f"train.vllm_weight_sync: adapter: vLLM serves {served} (lora_target_modules={targets}; {numbers}). "
            "Rollouts would not come from the trained policy: use train.vllm_weight_sync: merged")
    logger.info("adapter-only sync probe: vLLM serves the adapter (%s; %.1f s)", numbers, result.seconds)


def attach(trainer: Any) -> AdapterSync | None:
    """Switch a built GRPOTrainer's colocated engine to adapter-only sync; None without vLLM."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return None
    if generation.mode != "colocate":
        raise ValueError("adapter-only weight sync is implemented for colocate mode only")
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError("train.vllm_weight_sync: adapter needs the whole adapter on each process; FSDP shards "
                         "it: use merged with configs/accelerate/fsdp2.yaml")
    sync = AdapterSync(generation, trainer.model)
    logger.info("weight sync: the LoRA adapter only (vLLM serves the base weights with LoRA enabled)")
    try:
        if getattr(trainer.model, "is_loaded_in_4bit", False):  # model.quantization: 4bit
            from pipeline.rollout_precision import reload_weights

            reload_weights(sync.llm, trainer_base_weights(trainer.model))
            logger.info("vLLM's base weights: the trainer's 4-bit base, dequantized")
        check(probe(sync, trainer.model, trainer.processing_class, seed=trainer.args.seed), engine_targets(sync.llm))
    except Exception:
        from pipeline import compat

        sync.close()
        compat.shutdown_vllm(trainer)  # a refused start ends the process: the engine goes down first
        raise
    return sync


def engine_targets(llm: Any) -> list[str] | None:
    """The engine's LoRA target filter (`lora_target_modules`); None: every module vLLM supports."""
    llm = getattr(llm, "_llm", llm)  # compat.CollapsingLLM
    config = getattr(llm.llm_engine.vllm_config, "lora_config", None)
    targets = getattr(config, "target_modules", None)
    return sorted(targets) if targets else None
