"""Rollouts below bf16 (`train.rollout_precision: fp8`): vLLM generates from FP8 weights while the
trainer stays in bf16, and TRL's importance-sampling correction accounts for the gap.

Decoding 16 sequences reads every weight once per token, so halving the weight bytes is the one
way to make a memory-bound rollout markedly faster. vLLM quantizes a bf16 checkpoint itself at
load time (`fp8_per_tensor`: e4m3fn on NVIDIA, e4m3fnuz on MI300X, chosen by vLLM's platform),
so the run needs no FP8 checkpoint. What each place does with it:

- colocated engine: built with the quantization (`engine_options`). With the adapter-only sync
  the FP8 base is quantized once and only the bf16 LoRA weights move; with the merged sync each
  step's weights go through vLLM's layer-wise reload, which quantizes them again
  (`ReloadingSync`): TRL's own per-tensor `load_weights` would copy bf16 values into the FP8
  parameters without new scales.
- server (`make vllm-serve PRECISION=fp8`): `server_arguments`; vLLM's weight-transfer endpoint
  already reloads layer-wise. The trainer reads the server's configuration and refuses a
  server whose precision is not the run's (`check_server`).
- CPU: vLLM's CPU build has no FP8 kernels; `refuse_without_a_gpu` stops the stage first.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# vLLM's online quantization method for each precision (None: the checkpoint's own bf16 weights).
# `fp8_per_tensor` exists in every vLLM this project pins (0.24 on GPUs, 0.31 on CPUs); plain `fp8`
# stopped quantizing bf16 checkpoints online in later releases.
QUANTIZATION = {"bf16": None, "fp8": "fp8_per_tensor"}


class PrecisionMismatch(RuntimeError):
    """The vLLM server generates at another precision than the run's `train.rollout_precision`."""


def engine_options(precision: str) -> dict:
    """Options of the colocated `vllm.LLM` (compat.add_vllm_engine_options) for `precision`. Always
    explicit: TRL 1.16 asks vLLM for `bitsandbytes` when the trainer's base is 4-bit, while this
    project keeps vLLM on the unquantized checkpoint and sends it the adapter (model.quantization)."""
    return {"quantization": QUANTIZATION[precision]}


def check_engine(llm: Any, precision: str) -> None:
    """The colocated engine generates at the run's precision: an option lost on the way to TRL's
    `vllm.LLM` would otherwise leave a bf16 engine under an fp8 run's record, with no error."""
    built = llm.llm_engine.model_config.quantization
    if built != QUANTIZATION[precision]:
        raise PrecisionMismatch(f"train.rollout_precision is {precision} but the colocated vLLM engine was built "
                                f"with quantization {built!r} (expected {QUANTIZATION[precision]!r})")
    logger.info("the colocated vLLM engine generates at precision %s (quantization %s)", precision, built)


def server_arguments(precision: str) -> list[str]:
    """Arguments of `vllm serve` for `precision` (pipeline.rollout_server)."""
    method = QUANTIZATION[precision]
    return ["--quantization", method] if method else []


def refuse_without_a_gpu(precision: str, *, gpu: bool, use_vllm: bool) -> None:
    """fp8 rollouts need vLLM on a GPU: its CPU build has no FP8 kernels (it stops at the first
    quantized layer), and the transformers fallback would silently generate in bf16."""
    if precision == "bf16":
        return
    if not use_vllm:
        raise SystemExit(f"train.rollout_precision: {precision} needs vLLM for the rollouts, which is not installed "
                         "here: install requirements/gpu.txt (or run in the project's image) or set bf16")
    if not gpu:
        raise SystemExit(f"train.rollout_precision: {precision} needs a GPU (CUDA or ROCm): vLLM's CPU build has no "
                         "FP8 kernels; set train.rollout_precision: bf16 on this machine")


def server_precision(config: dict) -> str:
    """The precision a vLLM server generates at, from its `/server_info?config_format=json` config:
    a key of QUANTIZATION (`bf16`: the checkpoint's own weights), else vLLM's method name."""
    method = (config.get("model_config") or {}).get("quantization")
    for precision, known in QUANTIZATION.items():
        if method == known:
            return precision
    return str(method)


def check_server(base_url: str, precision: str, timeout: float = 30.0) -> None:
    """Refuse a server that does not generate at the run's precision: its rollouts would come from
    weights the run's records do not describe (the importance sampling would hide the difference)."""
    import requests

    try:
        response = requests.get(f"{base_url}/server_info", params={"config_format": "json"}, timeout=timeout)
        response.raise_for_status()
        served = server_precision(response.json()["vllm_config"])
    except (requests.RequestException, ValueError, KeyError) as error:
        raise PrecisionMismatch(f"cannot read the vLLM server's precision at {base_url}/server_info ({error}); "
                                "start it with `make vllm-serve` (it enables that endpoint)") from error
    if served != precision:
        raise PrecisionMismatch(f"the vLLM server at {base_url} runs at precision {served} but "
                                f"train.rollout_precision is {precision}: restart it with "
                                f"`make vllm-serve PRECISION={precision}`")
    logger.info("the vLLM server at %s runs at precision %s, as train.rollout_precision says", base_url, served)


class ReloadingSync:
    """TRL's merged weight sync through vLLM's `reload_weights` instead of TRL's per-tensor
    `load_weights`: vLLM's layer-wise loader processes each layer once all its shards are in, so a
    quantized engine quantizes the new weights again (new scales) and the CPU backend repacks them
    (compat: "full weight reload on vLLM's CPU backend"). Per tensor, TRL would copy bf16 values
    into FP8 parameters with the old scales, or fail on the CPU's repacked layers."""

    def __init__(self, generation: Any):
        self.generation = generation
        generation.sync_weights = self

    def weights(self):
        """TRL's stream of merged weights, each one copied: TRL unmerges the adapter in place once
        the stream ends, and vLLM may hold a layer's shards until the layer is complete."""
        for name, tensor in self.generation._iter_named_params():
            yield name, tensor.detach().clone()

    def __call__(self) -> None:
        import torch

        generation = self.generation
        if generation.enable_sleep_mode:  # as TRL's own sync: map the weights' memory back first
            torch.cuda.empty_cache()
            generation.llm.wake_up(tags=["weights"])
            generation._llm_weights_sleeping = False
        reload_weights(generation.llm, self.weights())


def reload_weights(llm: Any, weights) -> None:
    """Load (checkpoint name, tensor) pairs into a colocated `vllm.LLM` through its layer-wise
    reload (each layer processed, e.g. quantized, once complete), then drop the caches that hold
    what the old weights computed."""
    import torch
    from vllm.config import set_current_vllm_config

    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    with set_current_vllm_config(llm.llm_engine.vllm_config), torch.device(runner.device):
        runner.reload_weights(weights_iterator=under_lora_wrappers(llm, weights))
    llm.reset_prefix_cache()
    llm.llm_engine.reset_encoder_cache()


LORA_AWARE_RELOAD = (0, 31)  # the first vLLM release known to reload a LoRA-enabled engine by plain names


def under_lora_wrappers(llm: Any, weights):
    """(name, tensor) pairs with `.base_layer` inserted where vLLM's LoRA-enabled engine wrapped the
    layer the weight belongs to (`qkv_proj.base_layer.weight`). vLLM 0.24's Qwen2 loader (the GPU pin)
    looks parameters up by name and fails on a wrapped layer's plain name (KeyError
    'layers.0.self_attn.qkv_proj.weight'); vLLM 0.31 (the CPU pin) strips the wrapper from the names
    in its `reload_weights` and refuses the wrapped spelling. Releases between the two are untested:
    the renaming applies below 0.31. No upstream issue names it (the reload became LoRA-aware in a
    later release). A wrapped layer is recognised by its last four name parts (`layers.0.self_attn.
    qkv_proj`), after the engine's packing of shards (`q_proj` into `qkv_proj`)."""
    import vllm
    from packaging.version import Version

    if Version(vllm.__version__).release[:2] >= LORA_AWARE_RELOAD:
        yield from weights
        return
    model = llm.llm_engine.model_executor.driver_worker.model_runner.get_model()
    wrapped = {".".join(name.split(".base_layer.")[0].split(".")[-4:])
               for name, _ in model.named_parameters() if ".base_layer." in name}
    packed = {shard: fused for fused, shards in (getattr(model, "packed_modules_mapping", None) or {}).items()
              for shard in shards}
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        *head, last = module.split(".")
        if ".".join([*head, packed.get(last, last)][-4:]) in wrapped:
            name = f"{module}.base_layer.{leaf}"
        yield name, tensor
