"""Batched generation with transformers, shared by evaluation and the inference CLI.

A batch that fails is retried row by row, so one bad row costs one answer (reported as an error),
not the whole evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str | None  # None when generation failed for this row
    num_tokens: int = 0
    truncated: bool = False
    error: str | None = None


def _chat_texts(processor, conversations: Sequence[list[dict]]) -> list[str]:
    from trl.data_utils import prepare_multimodal_messages

    texts = []
    for messages in conversations:
        structured = prepare_multimodal_messages([dict(m) for m in messages], images=[None])
        for message in structured:  # placeholders only: the processor receives the images itself
            for part in message["content"]:
                part.pop("image", None)
        texts.append(processor.apply_chat_template(structured, add_generation_prompt=True))
    return texts


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
    results = []
    eos_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for row in new_tokens.tolist():
        length = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        text = tokenizer.decode(row[:length], skip_special_tokens=True)
        results.append(Generation(text=text, num_tokens=length, truncated=length >= max_new_tokens))
    return results


def generate_batched(model, processor, conversations: Sequence[list[dict]], images: Sequence, *,
                     max_new_tokens: int, temperature: float = 0.0, batch_size: int = 8,
                     desc: str = "generate") -> list[Generation]:
    from tqdm.auto import tqdm

    texts = _chat_texts(processor, conversations)
    results: list[Generation] = []
    started = time.perf_counter()
    with tqdm(total=len(texts), desc=desc, unit="row") as bar:
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
                        results.append(Generation(text=None, error=f"{type(row_error).__name__}: {row_error}"))
            bar.update(len(chunk_texts))
    elapsed = time.perf_counter() - started
    tokens = sum(r.num_tokens for r in results)
    logger.info("%s: %d rows, %d tokens in %.1f s (%.1f tokens/s)", desc, len(results), tokens, elapsed,
                tokens / elapsed if elapsed else 0.0)
    return results
