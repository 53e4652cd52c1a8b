"""Prompt length in tokens, image tokens included: what the prepare stage's length filter compares
with the room `model.max_model_len` leaves next to `train.max_completion_length`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.params import ModelParams

logger = logging.getLogger("pipeline.prepare")

TEMPLATE_SLACK = 16  # tokens a model's own chat template may add beyond plain ChatML (upper-bound count only)



def _offline_tokenizer(name: str, revision: str):
    """The model's tokenizer if it is already on this machine; never a download."""
    path = Path(name)
    try:
        if path.is_dir():
            if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                return None
        else:
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(name, "tokenizer_config.json", revision=revision), str):
                return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - no tokenizer means the conservative estimate, not a failure
        logger.warning("tokenizer of %s not loadable offline (%s)", name, error)
        return None



def chatml_segments(prompt: Sequence[dict]) -> list[tuple[str, bool]]:
    """Qwen's ChatML rendering as (text, is_special_token) pieces, one image placeholder in the user turn."""
    pieces: list[tuple[str, bool]] = []
    for message in prompt:
        pieces += [("<|im_start|>", True), (f"{message['role']}\n", False)]
        if message["role"] == "user":
            pieces += [("<|vision_start|>", True), ("<|image_pad|>", True), ("<|vision_end|>", True)]
        pieces += [(message["content"], False), ("<|im_end|>", True), ("\n", False)]
    return pieces + [("<|im_start|>", True), ("assistant\n", False)]



class PromptTokenCounter:
    """Prompt length in tokens, image tokens included.

    With the model's tokenizer on this machine: exact (its chat template, the one image placeholder
    replaced by the image's token count). Without it: an upper bound, one token per UTF-8 byte of the
    text (a byte-level BPE like Qwen's never needs more), so the filter can only drop too much, never
    let an over-long prompt through.
    """

    def __init__(self, model: ModelParams):
        self.tokenizer = _offline_tokenizer(model.name_or_path, model.revision)
        self.method = "tokenizer" if self.tokenizer is not None else "utf8_upper_bound"

    def count(self, prompts: Sequence[Sequence[dict]], image_tokens: Sequence[int]) -> list[int]:
        if not prompts:
            return []
        if self.tokenizer is not None:
            try:
                return self._exact(prompts, image_tokens)
            except Exception as error:  # noqa: BLE001 - a template that cannot render our prompts: estimate
                logger.warning("counting with the tokenizer failed (%s); using the upper bound", error)
                self.tokenizer, self.method = None, "utf8_upper_bound"
        return [self._upper_bound(p) + n for p, n in zip(prompts, image_tokens, strict=True)]

    def _exact(self, prompts: Sequence[Sequence[dict]], image_tokens: Sequence[int]) -> list[int]:
        texts = [self._render(prompt) for prompt in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        counts = []
        for row_ids, n in zip(ids, image_tokens, strict=True):
            placeholders = row_ids.count(pad)
            counts.append(len(row_ids) - placeholders + n + (0 if placeholders else 2))
        return counts

    def _render(self, prompt: Sequence[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return "".join(text for text, _ in chatml_segments(prompt))
        messages = [
            {"role": m["role"], "content": [{"type": "image"}, {"type": "text", "text": m["content"]}]}
            if m["role"] == "user" else {"role": m["role"], "content": m["content"]}
            for m in prompt
        ]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @staticmethod
    def _upper_bound(prompt: Sequence[dict]) -> int:
        text_tokens = sum(1 if special else len(text.encode()) for text, special in chatml_segments(prompt)
                          if text != "<|image_pad|>")
        return text_tokens + TEMPLATE_SLACK

