"""Server-mode rollouts: guarded against a failing server, and overlapped with training.

With `train.rollout_overlap: 1` the vLLM server generates the next step's completions, with the
current weights, while the trainer trains on the completions it generated a step earlier. At
optimizer step t (one generation batch per step):

1. wait for the rollout of batch t, started during step t-1 with the weights of step t-1;
2. TRL pushes the weights of step t to the server, which is idle now;
3. start the rollout of batch t+1 with them, in a background thread (HTTP requests to the server);
4. hand batch t's completions to TRL, which scores and trains on them while 3 runs.

A step then takes max(rollout, scoring + training) + weight sync instead of their sum. The
completions are one step stale; TRL's vLLM importance-sampling correction (the trainer's
log-probabilities over the sampler's, masked per sequence by default) corrects for that as it
corrects any sampler mismatch. Logged per step: `rollout/staleness` (optimizer steps between the
weights that sampled a batch and the weights trained on it), `rollout/seconds` (the server's time
for the batch; `time/vLLM.generate` is the part the step waited for), TRL's
`sampling/importance_sampling_*` and `sampling/importance_sampling_masked_share` (pipeline/on_policy.py).

The next batch comes from the Trainer's `get_batch_samples`, which fetches a step's batches before
the step and here fetches one more. Nothing is in flight at the first step, after a resume (the
batch that was in flight at a crash is generated again) or at an epoch's first step: those steps
generate synchronously.

With several training processes (DDP), each process sends its own prompts to the server over HTTP
and receives its own completions (`local_generate`), on its own background thread: TRL's server
path gathers every process's prompts to the main process instead, a collective that cannot run
beside the training thread's. The server must be idle while the main process pushes weights and
must not generate with half-pushed ones, so every process waits for its own rollout and then for
the others before TRL's weight push, and again after it (`_synced_weights`).

`rollout_overlap: 0` keeps TRL's synchronous schedule, with the same guard: a server that stops
answering is a `RolloutServerError` naming it, after `train.rollout_timeout` seconds at most (with
one training process; with several, TRL gathers every process's prompts inside the rollout, so it
runs on the training thread and only the health check before each weight push guards it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("pipeline.rollouts")


HEALTH_EVERY = 5.0  # seconds between health checks while a rollout is awaited


class RolloutServerError(RuntimeError):
    pass


def prompt_key(prompt_ids: list[list[int]]) -> tuple:
    return tuple(tuple(ids) for ids in prompt_ids)


@dataclass
class Rollout:
    key: tuple  # the prompt ids it answers
    weights_step: int  # the optimizer step whose weights sampled it
    future: Future
    seconds: float = 0.0  # how long the server took for it (overlapped or not)


def rollout_inputs(trainer: Any, rows: list[dict]) -> tuple[list[list[int]], list | None]:
    """A generation batch's prompt ids and images, as TRL 1.16's `_generate_and_score_completions`
    and `_generate` make them before calling vLLM (there is no TRL function to call for it). A
    difference shows as a rollout that answers other prompts: counted in `rollout/regenerated`."""
    from trl.data_utils import prepare_multimodal_messages

    prompts = [row["prompt"] for row in rows]
    if "images" in rows[0]:
        images = [row.get("images") for row in rows]
    elif "image" in rows[0]:
        images = [[row["image"]] if row.get("image") is not None else None for row in rows]
    else:
        images = None
    if images is not None and all(image_list == [] for image_list in images):
        images = None
    if images is not None:
        prompts = [prepare_multimodal_messages(prompt, images=image_list)
                   for prompt, image_list in zip(prompts, images, strict=True)]
    prompt_ids, images, _ = trainer._tokenize_prompts(copy.deepcopy(prompts))
    return prompt_ids, images


class ServerRollouts:
    """Takes over a built GRPOTrainer's server-mode generation (instance attributes; TRL unchanged)."""

    def __init__(self, trainer: Any, *, overlap: int, timeout: float):
        from trl.extras.profiling import profiling_context

        self.trainer = trainer
        self.overlap = overlap
        self.timeout = timeout
        self.generation = trainer.vllm_generation
        self.url = (self.generation.server_base_url
                    or f"http://{self.generation.server_host}:{self.generation.server_port}")
        self._profiling = profiling_context
        self._generate = self.generation.generate
        self._generate_single_turn = trainer._generate_single_turn
        self._get_batch_samples = trainer.get_batch_samples
        self.in_flight: Rollout | None = None
        self.next_rows: list[dict] | None = None
        self._peeked_from: Any = None
        trainer._generate_single_turn = self.generate_single_turn
        self.generation.generate = self.generate
        if overlap:
            trainer.get_batch_samples = self.get_batch_samples
            if trainer.accelerator.num_processes > 1:  # every process talks to the server itself
                self.client = self._own_client()
                logger.info("training process %d of %d sends its own rollout requests to %s",
                            trainer.accelerator.process_index, trainer.accelerator.num_processes, self.url)
                self._generate = self.local_generate
                self._sync_weights = self.generation.sync_weights
                self.generation.sync_weights = self._synced_weights

    def _own_client(self):
        """The main process's client (it also pushes the weights); an HTTP-only one elsewhere."""
        if self.trainer.accelerator.is_main_process:
            return self.generation.vllm_client
        from trl.generation.vllm_client import VLLMClient

        return VLLMClient(base_url=self.url, connection_timeout=self.generation.server_timeout)

    def local_generate(self, prompts, images, num_generations):
        """TRL 1.16's server-mode `generate` for this process's prompts alone (TRL has no per-process
        form: it gathers all prompts to the main process). Same request, same result layout: each
        prompt's `num_generations` copies are consecutive in the batch, so each is sent once with n."""
        generation = self.generation
        unique = prompts[::num_generations]
        if [ids for ids in unique for _ in range(num_generations)] != list(prompts):
            raise RolloutServerError("this process's generation batch does not hold whole groups of num_generations "
                                     "copies of a prompt, which per-process rollouts need (train.rollout_overlap)")
        features = None
        if images is not None and any(image is not None for image in images):
            features = [generation._place_features(found, ids) for found, ids in
                        zip(self.client.image_features(images[::num_generations]), unique, strict=True)]
        output = self.client.generate(
            prompts=unique, features=features, n=num_generations, repetition_penalty=generation.repetition_penalty,
            temperature=generation.temperature, top_p=generation.top_p, top_k=generation.top_k,
            min_p=0.0 if generation.min_p is None else generation.min_p,
            max_tokens=generation.max_completion_length, logprobs=generation.logprobs,
            structured_outputs_regex=generation.structured_outputs_regex,
            generation_kwargs=generation.generation_kwargs)
        prompt_ids = [ids for ids in output["prompt_ids"] for _ in range(num_generations)]
        return prompt_ids, output["completion_ids"], output["logprobs"], output.get("logprob_token_ids")

    def _synced_weights(self):
        """TRL's weight push with every process's rollout finished before it and none started until it ends."""
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()
        self._sync_weights()
        accelerator.wait_for_everyone()

    # -- the next generation batch -----------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's batches for this step, and the first batch of the next (kept for it)."""
        batches = []
        if self.next_rows is not None and self._peeked_from is epoch_iterator:
            batches.append(self.next_rows)
        self.next_rows = None
        if num_batches > len(batches):
            more, _ = self._get_batch_samples(epoch_iterator, num_batches - len(batches), device)
            batches += more
        ahead, _ = self._get_batch_samples(epoch_iterator, 1, device)
        self.next_rows, self._peeked_from = (ahead[0], epoch_iterator) if ahead else (None, None)
        return batches, self.trainer._get_num_items_in_batch(batches, device)

    # -- TRL's two calls -------------------------------------------------------------------------
    def generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        """Wait for what is in flight before TRL pushes weights (the server must be idle), and check
        the server answers at all (a weight broadcast to a dead server would wait forever)."""
        if self.in_flight is not None:
            with self._profiling(self.trainer, "vLLM.generate"):  # the rollout time the step still sees
                self._wait(self.in_flight)
        self._check_alive()
        try:
            return self._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs)
        except RolloutServerError:
            raise
        except OSError as error:  # requests' ConnectionError and timeouts are OSErrors
            raise RolloutServerError(f"the vLLM server at {self.url} failed: {error}") from error

    def generate(self, prompts, images, num_generations, profiler=None):
        """Hand back the rollout of `prompts` (started a step ago, or now), then start the next one."""
        step = self.trainer.state.global_step
        if not self.trainer.model.training:  # evaluation: as TRL, through the guard
            with profiler or contextlib.nullcontext():
                return self._wait(self._start(prompts, images, num_generations, step))
        rollout, self.in_flight = self.in_flight, None
        metrics = self.trainer._metrics["train"]
        if rollout is not None and rollout.key != prompt_key(prompts):
            logger.warning("the rollout in flight answers other prompts than step %d's: generating again", step)
            metrics["rollout/regenerated"].append(1.0)
            rollout = None
        if rollout is None:
            rollout = self._start(prompts, images, num_generations, step)
        with profiler or contextlib.nullcontext():  # TRL's `vLLM.generate` timer: the part still waited for
            result = self._wait(rollout)
        metrics["rollout/staleness"].append(float(step - rollout.weights_step))
        metrics["rollout/seconds"].append(rollout.seconds)
        self._start_next(num_generations, step)
        return result

    # -- the background thread -------------------------------------------------------------------
    def _start(self, prompts, images, num_generations, step: int) -> Rollout:
        rollout = Rollout(prompt_key(prompts), step, Future())

        def run():
            started = time.perf_counter()
            try:
                result = self._generate(prompts, images, num_generations)
                rollout.seconds = time.perf_counter() - started
                rollout.future.set_result(result)
            except BaseException as error:  # handed to the training thread, which raises it
                rollout.future.set_exception(error)

        if self.trainer.accelerator.num_processes > 1 and not self.overlap:
            run()  # TRL gathers the prompts of every process here: collectives stay on the training thread
        else:  # a daemon thread: a hung server cannot keep the process from exiting
            threading.Thread(target=run, name=f"rollout-{step}", daemon=True).start()
        return rollout

    def _start_next(self, num_generations: int, step: int) -> None:
        state = self.trainer.state
        if not self.overlap or self.next_rows is None or step + 1 >= state.max_steps:
            return
        prompts, images = rollout_inputs(self.trainer, self.next_rows)
        self.in_flight = self._start(prompts, images, num_generations, step)

    def _wait(self, rollout: Rollout):
        """The rollout's result; the server's health is checked every HEALTH_EVERY seconds meanwhile, so a
        dead server stops the run at once (TRL's client retries a refused connection for ~60 s)."""
        started = time.perf_counter()
        while (waited := time.perf_counter() - started) < self.timeout:
            try:
                return rollout.future.result(timeout=min(HEALTH_EVERY, self.timeout - waited))
            except FutureTimeout:
                self._check_alive()
            except Exception as error:  # the thread only talks to the server (TRL raises plain Exceptions too)
                raise RolloutServerError(f"the vLLM server at {self.url} failed while generating a rollout with "
                                         f"the weights of step {rollout.weights_step}: {type(error).__name__}: "
                                         f"{error}") from error
        raise RolloutServerError(
            f"no rollout from the vLLM server at {self.url} within train.rollout_timeout = {self.timeout:g} s: "
            "it answers but does not finish: overloaded or hung? Its log says more")

    def _check_alive(self) -> None:
        import requests

        try:
            requests.get(f"{self.url}/health", timeout=min(self.timeout, 30.0)).raise_for_status()
        except requests.RequestException as error:
            raise RolloutServerError(f"the vLLM server at {self.url} does not answer ({error}); "
                                     "start it with `make vllm-serve` or check its log") from None

    def close(self) -> None:
        """Nothing waits for a rollout still in flight at the end (the next run starts its own)."""
        self.in_flight = None
        self.next_rows = None


def attach(trainer: Any, *, overlap: int, timeout: float) -> ServerRollouts | None:
    """Guard (and with `overlap` 1, overlap) a built GRPOTrainer's server-mode rollouts."""
    if not (trainer.use_vllm and trainer.vllm_generation.mode == "server"):
        return None
    args = trainer.args
    if overlap and (args.steps_per_generation != args.gradient_accumulation_steps or args.num_iterations != 1):
        raise RolloutServerError(  # params check this for a known process count; `auto` is resolved only here
            f"train.generation_batch_size: train.rollout_overlap: 1 needs one generation batch per optimizer step on "
            f"{trainer.accelerator.num_processes} processes; TRL schedules one per {args.steps_per_generation} "
            f"micro-steps ({args.gradient_accumulation_steps} per step): leave generation_batch_size unset")
    return ServerRollouts(trainer, overlap=overlap, timeout=timeout)
