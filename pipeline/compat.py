"""Every workaround for a bug or gap in a library we depend on, in one place.

Each one names the upstream issue, is guarded by the versions it applies to, and has a test in
tests/test_compat.py that fails when the workaround stops working or is no longer needed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from importlib.metadata import version
from typing import Any

from packaging.version import Version

logger = logging.getLogger(__name__)

# huggingface/trl#6294, #6401: in colocate mode TRL 1.16 hands vLLM prompt ids whose image
# placeholders the HF processor already expanded, and vLLM expands each of them again. Rollouts come
# from a corrupted prompt (on a 7B-shaped Qwen2.5-VL: importance ratio 0, loss 0, nothing learnt).
# Fixed upstream after 1.16; re-check when raising the TRL pin.
TRL_DOUBLE_IMAGE_EXPANSION = (Version("1.0.0"), Version("1.17.0"))


def trl_version() -> Version:
    return Version(version("trl"))


def needs_image_pad_collapse(trl: Version | None = None) -> bool:
    low, high = TRL_DOUBLE_IMAGE_EXPANSION
    return low <= (trl or trl_version()) < high


def collapse_image_pads(token_ids: Sequence[int], image_pad_id: int) -> list[int]:
    """Shrink each run of image-pad tokens to one placeholder, the form vLLM expects to expand."""
    collapsed: list[int] = []
    for token in token_ids:
        if token == image_pad_id and collapsed and collapsed[-1] == image_pad_id:
            continue
        collapsed.append(token)
    return collapsed


class CollapsingLLM:
    """Wraps TRL's colocated `vllm.LLM`: collapses image placeholders before every generate call."""

    def __init__(self, llm: Any, image_pad_id: int):
        self._llm = llm
        self._image_pad_id = image_pad_id

    def generate(self, prompts: Iterable[Any], *args: Any, **kwargs: Any):
        fixed = []
        for prompt in prompts:
            if isinstance(prompt, dict) and "prompt_token_ids" in prompt and prompt.get("multi_modal_data"):
                prompt = {**prompt, "prompt_token_ids": collapse_image_pads(prompt["prompt_token_ids"],
                                                                            self._image_pad_id)}
            fixed.append(prompt)
        return self._llm.generate(fixed, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)


# TRL 1.16 `log_completions` + W&B: TRL hands wandb.Table the multimodal prompt messages as nested
# dicts whose content parts differ ({"type","text"} vs {"type"} for the image placeholder); wandb
# cannot type the column and raises "Data row contained incompatible types" at the first logging
# step, killing the run. Not found reported upstream; flattening the messages to text fixes it.
TRL_WANDB_COMPLETIONS_TABLE = (Version("1.0.0"), Version("1.17.0"))


def messages_as_text(messages: Any) -> Any:
    """`role: text` lines, with `<image>` where an image part was: a plain string W&B can type."""
    if not isinstance(messages, list):
        return messages
    lines = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, list):
            content = "".join("<image>" if part.get("type") == "image" else str(part.get("text", ""))
                              for part in content if isinstance(part, dict))
        role = message.get("role", "") if isinstance(message, dict) else ""
        lines.append(f"{role}: {content}")
    return "\n".join(lines)


def patch_completions_table() -> bool:
    low, high = TRL_WANDB_COMPLETIONS_TABLE
    if not low <= trl_version() < high:
        return False
    from trl.trainer import grpo_trainer

    grpo_trainer.strip_images_from_messages = messages_as_text
    logger.info("workaround: completions table as text for W&B (TRL %s)", trl_version())
    return True


# transformers 5.x: Qwen2.5-VL's vision tower names `patch_embed` as an input embedding
# (`_input_embed_layer`), so `enable_input_require_grads()`, which TRL and peft call for an adapter
# with gradient checkpointing, hooks it too. The frozen vision tower's output then requires grad and
# every backward pass runs (and under checkpointing recomputes) all 32 vision blocks although nothing
# in them trains: on 7B shapes (H100, 448×448 images) the training phase of a step fell from
# 4.9 s to 1.9 s without it (docs/performance.md). Qwen3-VL's vision model declares no input
# embedding and is not affected. Not reported upstream yet.
def keep_frozen_vision_out_of_backward(model) -> list[str]:
    """For each vision tower with no trainable parameter: drop the require-grad hook on its input
    layer, and hide that layer from `enable_input_require_grads`, which `Trainer.train()` and TRL's
    rollouts call again (each call would add the hook back). Returns the towers changed. Gradients
    reaching the adapter are unchanged (tests/test_train.py)."""
    changed = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "visual" or not hasattr(module, "get_input_embeddings"):
            continue
        if any(parameter.requires_grad for parameter in module.parameters()):
            continue  # a vision tower that trains needs its gradients
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:  # Qwen3-VL (or already done): no input embedding, so no hook
            continue
        hooks = getattr(embeddings, "_forward_hooks", {})
        for key in [k for k, hook in hooks.items() if getattr(hook, "__name__", "") == "make_inputs_require_grads"]:
            del hooks[key]
        module.get_input_embeddings = _no_input_embeddings  # enable_input_require_grads skips it
        changed.append(name)
    for name in changed:
        logger.info("workaround: frozen vision tower %s kept out of the backward pass", name)
    return changed


def _no_input_embeddings():
    raise NotImplementedError("frozen vision tower: kept out of the backward pass (pipeline.compat)")


# TRL times its phases (vLLM.generate, sync_weights, _prepare_inputs, compute_loss, each reward)
# but sends the timings only to W&B, MLflow or Trackio, one call at a time. We add them up here so
# the trainer can log a per-step split to every logger, log_history.json and DVC plots included.
_PHASE_SECONDS: dict[str, float] = {}


def capture_trl_phase_times() -> dict[str, float]:
    """Hook TRL's profiling contexts (once); returns the dict they add seconds to, by phase name."""
    from trl.extras import profiling

    cls = profiling.ProfilingContext
    if not getattr(cls, "_grpo_captures_phases", False):
        original = cls._log_metrics

        def _log_metrics(self, duration: float) -> None:
            phase = self.name.split(".", 1)[-1]  # "GRPOTrainer.vLLM.generate" -> "vLLM.generate"
            _PHASE_SECONDS[phase] = _PHASE_SECONDS.get(phase, 0.0) + duration
            original(self, duration)

        cls._log_metrics = _log_metrics
        cls._grpo_captures_phases = True
    return _PHASE_SECONDS


def _cpu_sync_weights(generation) -> None:
    """vLLM's CPU backend repacks linear weights after loading, so TRL's per-tensor `load_weights`
    fails ('Parameter' object has no attribute 'weight_loader'). Reload the full set through the
    model runner instead, then drop the prefix and encoder caches that still hold the old weights."""
    # clone: TRL merges the LoRA adapter while iterating and unmerges in place afterwards
    weights = [(name, tensor.detach().clone()) for name, tensor in generation._iter_named_params()]
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=weights)
    generation.llm.reset_prefix_cache()
    generation.llm.llm_engine.reset_encoder_cache()


def add_vllm_engine_options(**options: Any) -> None:
    """TRL 1.16 builds its colocated `vllm.LLM` from a fixed set of arguments (no pass-through for
    others, such as a dtype or LoRA support); add to them. Call before building the trainer.
    Repeated calls add up (a later value of the same option wins)."""
    import functools

    from trl.generation import vllm_generation

    vllm_generation.LLM = functools.partial(vllm_generation.LLM, **options)


def use_fp32_vllm_on_cpu() -> None:
    """TRL builds its colocated `vllm.LLM` without a dtype, and vLLM's CPU backend then downcasts a
    float32 checkpoint to bfloat16 while the trainer computes in float32: sampling and training
    log-probs disagree (TRL's sampling_logp_difference ~3e-3 instead of ~5e-5 before any update),
    which adds noise to the importance-sampling correction. Call before building the trainer; CPU only."""
    add_vllm_engine_options(dtype="float32")
    logger.info("vLLM on CPU computes in float32, like the trainer")


def patch_vllm_colocate(trainer, on_gpu: bool, reload_merged_weights: bool = True) -> list[str]:
    """Apply the colocate-mode fixes to a built GRPOTrainer; returns what was applied (for the log).
    `reload_merged_weights`: False when only the adapter is synced (pipeline/adapter_sync.py)."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or generation.mode != "colocate":
        return []
    applied = []
    if needs_image_pad_collapse():
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        generation.llm = CollapsingLLM(generation.llm, image_pad_id)
        applied.append("collapse image placeholders before vLLM (trl#6294/#6401)")
    if not on_gpu and reload_merged_weights:
        generation.sync_weights = lambda: _cpu_sync_weights(generation)
        applied.append("full weight reload on vLLM's CPU backend")
    for item in applied:
        logger.info("workaround: %s", item)
    return applied


# TRL 1.16 GRPOTrainer (and TRL main as of 2026-07) scores a generation batch of several prompts by
# left-padding the prompt ids itself, but takes `mm_token_type_ids` (which tokens are image tokens)
# from a second call of the processor, `processing_class(images=…, text=…, padding=True)`, that pads
# on the processor's own side. Qwen's processors, the real checkpoints' and ours alike, pad on the
# right, so for every prompt shorter than the longest in the batch the image markers are shifted
# against the ids. Qwen2.5-VL's and Qwen3-VL's `get_rope_index` then gives the image (and the text
# around it) wrong M-RoPE positions: silently (a shift shorter than the text before the image) or
# with a shape error (a longer one). The trainer's log-probabilities, the loss and the importance
# ratio are computed for a context vLLM never saw: sampling_logp_difference/mean 0.56-0.73 on the
# steps whose two prompts differ in length (7B shapes, H200), ~0.06 otherwise (docs/training.md).
# huggingface/trl#5785 reported it; the maintainers closed it as the caller's configuration (TRL
# left-pads only a processor it loads itself) and would take a warning, not a fix. So this is a
# setting, not a version-guarded patch: it stays needed for as long as TRL builds the two tensors
# apart. tests/test_logp_agreement.py fails when a right-padding processor stops mattering.
GRPO_PROCESSOR_PADDING_SIDE = "left"


def left_pad_for_grpo(processor) -> bool:
    """Make the processor pad on the left, as TRL's GRPOTrainer assumes; returns whether it changed."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "padding_side", None) == GRPO_PROCESSOR_PADDING_SIDE:
        return False
    tokenizer.padding_side = GRPO_PROCESSOR_PADDING_SIDE
    logger.info("setting: the processor pads on the left for GRPO scoring (trl#5785)")
    return True


def shutdown_llm(llm) -> None:
    """Shut a `vllm.LLM` engine down now instead of leaving it to the garbage collector.

    Left to the garbage collector, vLLM's teardown at interpreter exit aborted the process on the
    H100 (`terminate called without an active exception`, exit 134) after a successful run; DVC then
    marks the stage failed. Used for the train stage's colocated engine and for the evaluation and
    inference engines (pipeline/generation.py); a later engine in the same process starts cleanly.
    """
    llm = getattr(llm, "_llm", llm)  # CollapsingLLM
    try:
        engine = llm.llm_engine
        engine_core = getattr(engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
    except Exception as error:  # noqa: BLE001 - best effort at the end of a successful run
        logger.warning("vLLM shutdown: %s", error)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as error:  # noqa: BLE001
        logger.warning("process group shutdown: %s", error)


def shutdown_vllm(trainer) -> None:
    """Shut the trainer's colocated engine down before interpreter exit (see `shutdown_llm`)."""
    generation = getattr(trainer, "vllm_generation", None)
    llm = getattr(generation, "llm", None)
    if llm is None:
        return
    generation.llm = None
    shutdown_llm(llm)
