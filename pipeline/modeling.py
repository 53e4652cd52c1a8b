"""Loading Qwen-VL models, and building the tiny offline ones the demo and tests use.

`load_model` and `load_processor` are the only loaders: the checkpoint's own config picks the
model class (Qwen2.5-VL, Qwen3-VL, ...), and `from_pretrained` serves the 7B model and the tiny
one alike. `build_tiny_model` writes a randomly initialised Qwen2.5-VL or Qwen3-VL with the
real architecture classes, its own byte-level BPE tokenizer with Qwen's special tokens and chat
template, and a Qwen image processor, so everything runs without the Hugging Face Hub.

Every vLLM engine of the project (the train stage's rollouts, evaluation, the inference CLI) gets
its dtype from `vllm_dtype` and, on a CPU machine, its environment from `cpu_vllm_environment`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's chat template, reduced to what the project sends: text and image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_KINDS = ("qwen2_5_vl", "qwen3_vl")
TINY_VOCAB = 1024
# Image processor for the tiny models: 8-px patches merged 2×2, so one image token covers 16×16 px.
TINY_PATCH, TINY_MERGE = 8, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 16 * 16 * 4, 16 * 16 * 64


class ModelNotAvailableError(RuntimeError):
    """The model cannot be loaded here (e.g. Hub weights on a machine without Hub access)."""


def _tokenizer_corpus() -> list[str]:
    from pipeline.answer_format import TAGS
    from pipeline.synthetic import COLORS, make_rows

    words = (
        "the a an of in on is are what which how many much sum average tallest bar color image grid number "
        "numbers answer question hint please provide final end choices reasoning count there so total "
        "circles squares shapes figure value equals plus minus divided by times first then because"
    ).split()
    texts = [row["query"] for row in make_rows(200, seed=12345)]
    texts += [*TAGS, " ".join(words), " ".join(COLORS)]
    texts += [f"{i} {i}.{i % 10} ({chr(65 + i % 4)})" for i in range(200)]
    return texts


def build_tokenizer():
    """A small byte-level BPE wrapped as Qwen2Tokenizer: same class and special tokens as Qwen's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB - len(SPECIAL_TOKENS) - 8,  # 8 spare ids for the tag tokens below
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    serialised = json.loads(bpe.to_str())["model"]
    vocab = serialised["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in serialised["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def tiny_config(kind: str, tokenizer) -> Any:
    """Settings that run on vLLM's CPU backend: head_dim 32, mrope sections summing to head_dim/2."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = _token_ids(tokenizer)
    vocab_size = len(tokenizer)
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
    )
    token_ids = {k: ids[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id")}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=TINY_PATCH, spatial_merge_size=TINY_MERGE, temporal_patch_size=2)
    if kind == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
        vision.update(window_size=32, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    elif kind == "qwen3_vl":
        text.update(head_dim=32)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 6, 6],
                                   "mrope_interleaved": True}
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    config.eos_token_id = ids["eos_token_id"]
    config.pad_token_id = ids["pad_token_id"]
    return config


def build_processor(kind: str, tokenizer, patch_size: int = TINY_PATCH, min_pixels: int = TINY_MIN_PIXELS,
                    max_pixels: int = TINY_MAX_PIXELS):
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl import Qwen3VLVideoProcessor

    image_kwargs = dict(patch_size=patch_size, merge_size=TINY_MERGE, temporal_patch_size=2,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    image_processor = Qwen2VLImageProcessor(**image_kwargs)
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    if kind == "qwen2_5_vl":
        video = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=TINY_MERGE)
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video, chat_template=CHAT_TEMPLATE)
    video = Qwen3VLVideoProcessor(patch_size=patch_size, merge_size=TINY_MERGE)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video, chat_template=CHAT_TEMPLATE)


def build_tiny_model(kind: str, out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny random model + processor to `out_dir`; same seed, same weights."""
    import torch
    from transformers import AutoModelForImageTextToText

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(kind, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    processor = build_processor(kind, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()  # true on ROCm builds too


def resolve_dtype(dtype: str):
    """bf16 on GPUs (CUDA and ROCm alike), fp32 on CPU, unless params say otherwise."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if on_gpu() else torch.float32


# ---------------------------------------------------------------------------------------------
# vLLM engines (train-stage rollouts, evaluation, the inference CLI)
# ---------------------------------------------------------------------------------------------
def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_dtype(dtype: str) -> str:
    """The dtype to give `vllm.LLM`, the one transformers loads: left at "auto", vLLM's CPU backend
    downcasts a float32 checkpoint to bfloat16 and its answers drift from the transformers ones."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


MAX_RPC_DIR_LENGTH = 64  # vLLM's IPC sockets are <dir>/<uuid4>: 107 bytes at most on Linux


def cpu_vllm_environment() -> None:
    """vLLM's CPU backend: a KV cache size of its own (the default fraction counts the trainer's
    memory and fails), in-process engine (start 1 s, not 12 s), caches inside the workspace.
    Call before the first engine is built; values already in the environment win."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM drops the process to one torch thread unless OMP_NUM_THREADS is set; training needs them all
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cache = Path(".cache").resolve()
    rpc = cache / "vllm-rpc"
    if len(str(rpc)) > MAX_RPC_DIR_LENGTH:  # a socket path (dir + 37) must fit 107 bytes: deep folders cannot
        rpc = Path(tempfile.gettempdir()) / f"vllm-rpc-{os.getuid()}"
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(rpc))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    Path(os.environ["VLLM_RPC_BASE_PATH"]).mkdir(parents=True, exist_ok=True)


def load_processor(name_or_path: str, revision: str = "main", **kwargs):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, revision=revision, **kwargs)
    except OSError as error:
        raise ModelNotAvailableError(_not_available(name_or_path, error)) from None


# Kept in the checkpoint's dtype when the base is quantized: the frozen vision tower, whose
# features must stay vLLM's (vLLM serves the unquantized checkpoint), and the LM head (log-probs).
UNQUANTIZED_MODULES = ["model.visual", "lm_head"]  # prefixes (transformers matches from the start)


def quantization_config(quantization: str, dtype: str = "auto"):
    """transformers' `BitsAndBytesConfig` for `model.quantization` (None for `none`): QLoRA's NF4
    with double quantization, computing in the model's dtype (bf16 on GPUs)."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute = resolve_dtype(dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8,
                              llm_int8_skip_modules=UNQUANTIZED_MODULES)


def load_model(name_or_path: str, revision: str = "main", dtype: str = "auto",
               attn_implementation: str = "sdpa", quantization: str = "none"):
    """The model class comes from the checkpoint's config, so Qwen2.5-VL and Qwen3-VL share this code.
    `quantization: 4bit` loads the base for QLoRA training (`prepare_for_kbit_training` next)."""
    from transformers import AutoModelForImageTextToText

    options = {}
    if quantization != "none":  # bitsandbytes quantizes as it places the weights: on this process's GPU
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if on_gpu() else "cpu"
        options = {"quantization_config": quantization_config(quantization, dtype), "device_map": {"": device}}
    try:
        return AutoModelForImageTextToText.from_pretrained(
            name_or_path, revision=revision, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation,
            **options)
    except OSError as error:
        raise ModelNotAvailableError(_not_available(name_or_path, error)) from None


def prepare_for_kbit_training(model, gradient_checkpointing: bool):
    """peft's preparation of a quantized base for adapter training (layer norms in float32, input
    gradients for checkpointing); before the adapter is added."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def _not_available(name_or_path: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"model {name_or_path!r} is not available on this machine ({first_line}). "
        "Download it first (huggingface-cli download), point model.name_or_path at a local copy, "
        "or run on the embedded default: `make train PRESET=demo`."
    )


def vision_token_ids(tokenizer) -> list[int]:
    """Token ids a completion must never contain (they break the next forward pass)."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS]
    return [i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
