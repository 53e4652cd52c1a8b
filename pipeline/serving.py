"""One base model's requests answered with vLLM when it can serve them, else transformers: the one
place the vLLM → transformers fallback is decided (evaluation and the inference CLI both call
`serve`). The generators and their shared records are in pipeline/generation.py and
pipeline/vllm_generator.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.generation import BackendUnavailable, BaseModelUnavailable, Generation, TransformersGenerator

logger = logging.getLogger("pipeline.generation")


# ---------------------------------------------------------------------------------------------
# one base model's requests, with vLLM when it can serve them: the fallback, decided here only
# ---------------------------------------------------------------------------------------------
@dataclass
class Request:
    """Answers to produce with one base model: without an adapter (the base) or with one."""

    adapter: str | Path | None
    desc: str
    # called right before generating: (conversations, images); no images, nothing to generate
    inputs: Callable[[], tuple[Sequence[list[dict]], Sequence]]


@dataclass
class Served:
    """A request's answers and the backend that produced them, or the error that stopped it:
    `BackendUnavailable` when vLLM was required and cannot serve, else the adapter's load error."""

    request: Request
    backend: str
    generations: list[Generation] | None = None
    error: Exception | None = None


@dataclass(frozen=True)
class Settings:
    """How to load the base model and generate: the same in both backends."""

    revision: str
    dtype: str
    attn_implementation: str
    max_model_len: int  # vLLM only (capped at the checkpoint's own context)
    seed: int
    max_new_tokens: int
    temperature: float
    batch_size: int  # transformers only: vLLM schedules its own batches


def serve(model: str, requests: Sequence[Request], settings: Settings, *, backend: str, strict: bool,
          together: bool = False) -> Iterator[Served]:
    """Each request served once, in order, with vLLM first (`backend` is `select_backend`'s answer).

    One vLLM engine serves the base and every adapter (a `LoRARequest` each). When the engine cannot
    start, every request falls back to transformers; when it cannot load an adapter, that request
    does, or with `together` every request (so that all answers come from one backend). `strict`
    (vLLM asked for by name) turns each fallback into a `Served` with the `BackendUnavailable` error.
    The engine is shut down before the transformers model is loaded (they do not share the GPU).
    A base model neither backend can load raises `BaseModelUnavailable`."""
    pending = list(requests)
    if backend == "vllm":
        pending = yield from _serve_vllm(model, pending, settings, strict, together)
    if not pending:
        return
    try:
        generator = TransformersGenerator(model, revision=settings.revision, dtype=settings.dtype,
                                          attn_implementation=settings.attn_implementation,
                                          batch_size=settings.batch_size)
    except Exception as error:
        raise BaseModelUnavailable(str(error)) from error
    with generator:
        for request in pending:
            if request.adapter is not None:
                try:
                    generator.load_adapter(request.adapter)
                except Exception as error:  # noqa: BLE001 - this request only
                    yield Served(request, "transformers", error=error)
                    continue
            yield from _answer(generator, request, settings, "transformers")


def _answer(generator, request: Request, settings: Settings, backend: str) -> Iterator[Served]:
    conversations, images = request.inputs()
    if len(images):
        yield Served(request, backend, generator.generate(
            conversations, images, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            adapter=request.adapter, desc=request.desc))


def _serve_vllm(model: str, requests: list[Request], settings: Settings, strict: bool,
                together: bool) -> Generator[Served, None, list[Request]]:
    """Serve what vLLM can; returns the requests left for transformers."""
    def unavailable(error: BackendUnavailable, which: list[Request]) -> Generator[Served, None, list[Request]]:
        """`strict`: each request answered with the error; else all of them left for transformers."""
        if strict:
            yield from (Served(r, "vllm", error=error) for r in which)
            return []
        logger.warning("%s; %s: transformers generate instead", error, ", ".join(r.desc for r in which))
        return which

    from pipeline.vllm_generator import VllmGenerator

    adapters = [r.adapter for r in requests if r.adapter is not None]
    try:
        engine = VllmGenerator(model, revision=settings.revision, dtype=settings.dtype,
                               max_model_len=settings.max_model_len, seed=settings.seed, adapters=adapters)
    except BackendUnavailable as error:
        return (yield from unavailable(error, requests))
    except Exception as error:  # the model itself is unavailable: transformers cannot help
        raise BaseModelUnavailable(str(error)) from error
    left: list[Request] = []
    with engine:
        if together:
            try:
                for adapter in adapters:  # before any answer: a failure here can still fall back whole
                    engine.load_adapter(adapter)
            except BackendUnavailable as error:
                return (yield from unavailable(error, requests))
        for request in requests:
            if request.adapter is not None and not together:
                try:
                    engine.load_adapter(request.adapter)
                except BackendUnavailable as error:
                    left += yield from unavailable(error, [request])
                    continue
            yield from _answer(engine, request, settings, "vllm")
    return left
