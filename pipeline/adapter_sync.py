"""Adapter-only weight sync for colocated vLLM (`train.vllm_weight_sync: adapter`).

TRL 1.16 keeps vLLM's copy of the policy current by merging the LoRA adapter into the base weights
and reloading every weight into the engine each step (7B: ~16 GB copied for ~20 MB that changed).
Here the engine is built with LoRA enabled, serves the untouched base weights, and gets the policy
as a LoRA adapter: each step the trainer writes the adapter's weights (a few MB) to a folder and
the next rollouts name it in a fresh `LoRARequest`. vLLM applies LoRA in its own kernels, which
costs some decode speed; `make bench-gpu` measures both settings (docs/performance.md).

The base weights must stay in the engine, so sleep mode (which discards them) is refused by the
params; the vision tower carries no adapter, so vLLM's encoder cache stays valid across steps.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipeline.adapter_sync")


def enable_lora_in_engine(rank: int, target_modules: list[str]) -> None:
    """Build TRL's colocated `vllm.LLM` with LoRA support for one adapter of `rank`; call before the
    trainer is built (TRL creates the engine in its constructor).

    `target_modules` (the adapter's own) limits LoRA to the layers the adapter changes: otherwise
    vLLM wraps every linear layer it supports (attention, MLP and the vision tower's) and runs the
    LoRA kernels on each of them at every decoded token, with zero weights in all but two."""
    from pipeline import compat

    compat.add_vllm_engine_options(enable_lora=True, max_lora_rank=rank, max_loras=1,
                                   lora_target_modules=list(target_modules))


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)


def _jsonable(value: Any) -> Any:
    """What json cannot write in a peft config: sets of module names, enums."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):  # enums (task_type, peft_type)
        return value.value
    return value


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
    return sync
