"""Batched generation shared by evaluation and the inference CLI: vLLM, or transformers `generate`.

Both backends take the same calls (`load_adapter`, `generate(..., adapter=...)`) and return the
same `Generation` records:

- `VllmGenerator` (pipeline/vllm_generator.py): one `vllm.LLM` engine per base model, built with
  LoRA enabled, serves the base model (no LoRA request) and each adapter (a `LoRARequest`, one
  resident at a time). A whole list of prompts goes to the engine at once and vLLM schedules the
  batches itself.
- `TransformersGenerator`: the base model loaded once (on the GPU when there is one), each adapter
  attached with peft in turn; `generate_batched` runs `batch_size` prompts per `generate` call.

`select_backend` turns `evaluate.backend` (or the CLI's `--backend`) into one of them: `auto` is
vLLM when it is installed. `pipeline.serving.serve` is the one place the vLLM → transformers
fallback is decided (evaluation and the inference CLI both go through it). The two see the same inputs: the prompt is
rendered by the processor's chat template in both, images are sized by the same saved processor
config (vLLM loads the processor from the same folder and revision, so a prompt has the same
number of image tokens in both), an answer ends at the same tokens and is decoded by the same
tokenizer call. On the same weights greedy answers then agree up to numerics (on CPU both compute
in float32).

One bad row costs one answer (reported as an error, counted as failed), not the whole evaluation:
vLLM takes the requests one at a time, so a row it refuses fails alone, and a batch that fails
while generating (either backend) is retried row by row.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import logs

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")


@dataclass
class Generation:
    text: str | None  # None when generation failed for this row
    num_tokens: int = 0
    truncated: bool = False
    error: str | None = None
    prompt_tokens: int = 0  # prompt length, image tokens included (0 when unknown)


class BackendUnavailable(RuntimeError):
    """vLLM cannot serve this model or adapter here; the message says why."""


class BaseModelUnavailable(RuntimeError):
    """The base model itself cannot be loaded (by either backend); the cause is chained."""


def select_backend(requested: str) -> str:
    """`auto` → vLLM when it is installed, else transformers; `vllm` without vLLM is an error."""
    from pipeline.modeling import vllm_installed

    if requested not in BACKENDS:
        raise ValueError(f"unknown generation backend {requested!r}; expected one of {', '.join(BACKENDS)}")
    if requested == "transformers":
        return "transformers"
    if vllm_installed():
        return "vllm"
    if requested == "vllm":
        raise BackendUnavailable("backend 'vllm' was requested but vLLM is not installed")
    return "transformers"


def chat_texts(processor, conversations: Sequence[list[dict]]) -> list[str]:
    from trl.data_utils import prepare_multimodal_messages

    texts = []
    for messages in conversations:
        structured = prepare_multimodal_messages([dict(m) for m in messages], images=[None])
        for message in structured:  # placeholders only: the processor receives the images itself
            for part in message["content"]:
                part.pop("image", None)
        texts.append(processor.apply_chat_template(structured, add_generation_prompt=True))
    return texts


def stop_token_ids(tokenizer) -> set[int]:
    """An answer ends at the end-of-turn token or at padding, whichever comes first, in both backends."""
    return {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}


def log_throughput(desc: str, backend: str, results: Sequence[Generation], elapsed: float) -> None:
    tokens = sum(r.num_tokens for r in results)
    failed = sum(r.text is None for r in results)
    logger.info("%s [%s]: %d rows, %d tokens in %.1f s (%.2f rows/s, %.1f tokens/s)%s", desc, backend, len(results),
                tokens, elapsed, len(results) / elapsed if elapsed else 0.0, tokens / elapsed if elapsed else 0.0,
                f"; {failed} failed" if failed else "")


def error_text(error: BaseException) -> str:
    """`Type: first line`, and the root cause's when there is one (vLLM wraps processor errors)."""
    def one(e: BaseException) -> str:
        lines = str(e).strip().splitlines()
        return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__

    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return one(error) if cause is error else f"{one(error)} (cause: {one(cause)})"


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------
def _generate(model, processor, texts, images, max_new_tokens, temperature) -> list[Generation]:
    import torch

    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **sampling)
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    stop_ids = stop_token_ids(tokenizer)
    for row, prompt_length in zip(new_tokens.tolist(), prompt_lengths, strict=True):
        length = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        text = tokenizer.decode(row[:length], skip_special_tokens=True)
        results.append(Generation(text=text, num_tokens=length, truncated=length >= max_new_tokens,
                                  prompt_tokens=int(prompt_length)))
    return results


def generate_batched(model, processor, conversations: Sequence[list[dict]], images: Sequence, *,
                     max_new_tokens: int, temperature: float = 0.0, batch_size: int = 8,
                     desc: str = "generate") -> list[Generation]:
    """transformers `generate`, `batch_size` rows per call; a failing batch is retried row by row."""
    texts = chat_texts(processor, conversations)
    results: list[Generation] = []
    started = time.perf_counter()
    with logs.progress(desc=f"{desc} [transformers]", total=len(texts)) as bar:
        for start in range(0, len(texts), batch_size):
            chunk_texts = texts[start:start + batch_size]
            chunk_images = list(images[start:start + batch_size])
            try:
                results += _generate(model, processor, chunk_texts, chunk_images, max_new_tokens, temperature)
            except Exception as batch_error:  # noqa: BLE001 - isolate the bad row(s)
                logger.warning("%s: batch at row %d failed (%s); retrying row by row", desc, start, batch_error)
                for text, image in zip(chunk_texts, chunk_images, strict=False):
                    try:
                        results += _generate(model, processor, [text], [image], max_new_tokens, temperature)
                    except Exception as row_error:  # noqa: BLE001
                        results.append(Generation(text=None, error=error_text(row_error)))
            bar.update(len(chunk_texts))
    log_throughput(desc, "transformers", results, time.perf_counter() - started)
    return results


class ClosedOnExit:
    """A generator used in `with` is closed on the way out: its model freed, its engine shut down."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class TransformersGenerator(ClosedOnExit):
    """transformers `generate` behind the calls of `VllmGenerator`: the base model is loaded once
    (and moved to the GPU when there is one), an adapter is attached to it with peft when a generate
    call names one, one adapter resident at a time (the next is loaded, then the previous deleted, so
    memory stays flat). Raises what `modeling.load_model` raises when the base model is unavailable."""

    def __init__(self, model: str, *, revision: str = "main", dtype: str = "auto",
                 attn_implementation: str = "sdpa", batch_size: int = 8):
        import torch

        from pipeline import modeling

        self.processor = modeling.load_processor(model, revision)
        self.model = modeling.load_model(model, revision, dtype, attn_implementation)
        if torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.model.eval()
        self.batch_size = batch_size
        self._peft_model = None
        self._adapter: str | None = None  # the resident adapter's path
        self._names: dict[str, str] = {}  # adapter path → peft adapter name

    def close(self) -> None:
        self.model = self._peft_model = None

    def load_adapter(self, adapter: str | Path) -> None:
        """Make `adapter` the resident one (raises what peft raises for an adapter it cannot load)."""
        from peft import PeftModel

        path = str(adapter)
        if path == self._adapter:
            return
        name = self._names.setdefault(path, f"run{len(self._names)}")
        if self._peft_model is None:
            self._peft_model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
        else:
            self._peft_model.load_adapter(path, adapter_name=name)
            self._peft_model.set_adapter(name)
            previous = self._names.get(self._adapter) if self._adapter else None
            if previous is not None and previous in self._peft_model.peft_config:
                self._peft_model.delete_adapter(previous)
        self._peft_model.eval()
        self._adapter = path

    def generate(self, conversations: Sequence[list[dict]], images: Sequence, *, max_new_tokens: int,
                 temperature: float = 0.0, adapter: str | Path | None = None,
                 desc: str = "generate") -> list[Generation]:
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=self.batch_size, desc=desc)
        if adapter is not None:
            self.load_adapter(adapter)
            return generate_batched(self._peft_model, self.processor, conversations, images, **options)
        if self._peft_model is not None:  # peft changed the base model's layers in place
            with self._peft_model.disable_adapter():
                return generate_batched(self._peft_model, self.processor, conversations, images, **options)
        return generate_batched(self.model, self.processor, conversations, images, **options)
