"""Run registered adapters (or the base model) on new images: `python -m pipeline.infer`.

    python -m pipeline.infer --run_id all,base --image_path images/ --prompt "How many bars are there?"

Runs are looked up in the model registry named by `publish.registry_file`; the base model and the
generation defaults come from the same validated params (`--params`, default params.yaml), so this
CLI reads no YAML of its own. For each run the adapter is taken from its local folder when it is
there, else from its recorded Hub revision. DVC experiments keep only the last run's outputs in
the working copy; for another run the error says how to bring it back (`dvc exp apply <run_id>`).

Every image of a run goes through one batched generate call, and each distinct base model is
loaded once: with vLLM (`--backend auto` when it is installed, the default from `evaluate.backend`)
one engine per base model serves the base and every run's adapter as a `LoRARequest`, each run's
images in one engine call; with transformers (`--backend transformers`, or no vLLM) the model is
loaded once and each run's adapter is attached to it with peft, images in chunks of `--batch_size`.
Either way ten runs over fifty images cost one model load and ten batched generations, not five
hundred calls. Images get the preprocessing the run was trained with (recorded in the registry),
so answers are comparable with the run's evaluation.

A bad image or an unknown run is reported for that item and the rest carry on; the exit code is 1
when anything failed, 2 for bad parameters or arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import answer_format, logs, prompts
from pipeline.generation import BACKENDS, BackendUnavailable, select_backend
from pipeline.images import ImageRules, prepare_image
from pipeline.infer.images import MAX_IMAGE_BYTES, URL_TIMEOUT_S, ImageSource, collect_images
from pipeline.infer.output import RESULTS_ROOT, Result, log_to_wandb, persist, print_results
from pipeline.infer.runs import RunTarget, resolve_runs
from pipeline.params import PARAMS_FILE, Params, load_params_or_exit

logger = logging.getLogger("pipeline.infer")
ANSWER_TYPES = ("integer", "float", "list")  # the answer types whose hint pipeline.prompts words


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def score(text: str | None) -> tuple[str | None, bool]:
    return answer_format.extract_answer(text), answer_format.is_strict(text)


def run_inference(targets: list[RunTarget], images: list[ImageSource], params: Params, args) -> list[Result]:
    """Group runs by base model: one model (or vLLM engine) per base, the base run before its adapters.

    With vLLM a run whose adapter the engine cannot load falls back to transformers under
    `--backend auto` (the reason is logged) and is reported as failed under `--backend vllm`."""
    usable = [image for image in images if image.data is not None]
    groups: dict[tuple[str, str], list[RunTarget]] = {}
    for target in targets:
        if target.error is None:
            groups.setdefault((target.base_model, target.base_revision), []).append(target)
    results: list[Result] = []
    if not usable:
        return results
    job = _Job(usable, params, args, results)
    for (base_model, revision), members in groups.items():
        members.sort(key=lambda t: t.adapter is not None)  # stable: the base model before adapters
        _run_group(base_model, revision, members, job)
    return results


@dataclass
class _Job:
    """What every run of one invocation shares: images, prompt, options, and the results so far."""

    usable: list[ImageSource]
    params: Params
    args: Any
    results: list[Result]
    cache: dict[ImageRules, list] = field(default_factory=dict)  # → [(source, image, error)]
    reported: set[str] = field(default_factory=set)  # an unusable image is reported once, not once per run

    def system_prompt(self, target: RunTarget) -> str:
        return self.args.system_prompt if self.args.system_prompt is not None else target.system_prompt

    def conversation(self, target: RunTarget) -> list[dict]:
        """The run's own system prompt and the user turn built as in training (pipeline.prompts)."""
        return prompts.conversation(self.args.user_text, self.system_prompt(target))

    def add(self, target: RunTarget, prepared: list[ImageSource], generations, backend: str) -> None:
        for source, generation in zip(prepared, generations, strict=True):
            answer, format_ok = score(generation.text)
            self.results.append(Result(target.run_id, source.source, generation.text, answer, format_ok,
                                       generation.num_tokens, generation.truncated, target.adapter_source,
                                       generation.error, backend, self.system_prompt(target)))


def _base_error(base_model: str, error: Exception) -> str:
    return f"cannot load base model {base_model!r}: {str(error).strip().splitlines()[0][:300]}"


def _run_group(base_model: str, revision: str, members: list[RunTarget], job: _Job) -> None:
    """One base model (one vLLM engine, or one transformers model) for all its runs' adapters."""
    from pipeline import generation, serving

    args, model = job.args, job.params.model
    settings = serving.Settings(
        revision=revision, dtype=model.dtype, attn_implementation=model.attn_implementation,
        max_model_len=model.max_model_len, seed=job.params.seed, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, batch_size=args.batch_size)
    prepared: dict[str, list[ImageSource]] = {}  # run id → the images its answers belong to
    done: set[str] = set()  # runs whose images were prepared or that failed: not the base model's fault

    def inputs(target: RunTarget):
        def prepare():
            done.add(target.run_id)
            prepared[target.run_id], batch_images = _prepare_images(target, job)
            return [job.conversation(target)] * len(batch_images), batch_images
        return prepare

    requests = [serving.Request(t.adapter, f"infer {t.run_id}", inputs(t)) for t in members]
    by_request = {id(request): target for request, target in zip(requests, members, strict=True)}
    try:
        for served in serving.serve(base_model, requests, settings, backend=args.generation_backend,
                                       strict=args.backend == "vllm"):
            target = by_request[id(served.request)]
            done.add(target.run_id)
            if isinstance(served.error, generation.BackendUnavailable):
                job.results.append(Result(target.run_id, None, adapter=target.adapter_source,
                                          error=f"{served.error} (--backend vllm)"))
            elif served.error is not None:
                job.results.append(Result(target.run_id, None, adapter=target.adapter_source,
                                          error=f"cannot load adapter {target.adapter_source}: {served.error}"))
            else:
                job.add(target, prepared[target.run_id], served.generations, served.backend)
    except generation.BaseModelUnavailable as error:  # one unavailable base must not stop the other groups
        job.results.extend(Result(t.run_id, None, error=_base_error(base_model, error))
                           for t in members if t.run_id not in done)


def _prepare_images(target: RunTarget, job: _Job):
    rules = ImageRules.from_record(target.preprocessing, job.params)
    if rules not in job.cache:
        job.cache[rules] = []
        for source in job.usable:
            try:
                job.cache[rules].append((source, prepare_image(source.data, rules), None))
            except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
                job.cache[rules].append((source, None, str(error)))
    prepared, batch_images = [], []
    for source, image, error in job.cache[rules]:
        if error is None:
            prepared.append(source)
            batch_images.append(image)
        elif source.source not in job.reported:
            job.reported.add(source.source)
            job.results.append(Result(None, source.source, error=error))
    return prepared, batch_images


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------
def build_parser(params: Params | None = None) -> argparse.ArgumentParser:
    defaults = params.evaluate if params else None
    parser = argparse.ArgumentParser(prog="python -m pipeline.infer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run_id", action="append", required=True,
                        help="registered run id, a comma list, 'all' (every registered run) or 'base' (no adapter)")
    parser.add_argument("--image_path", action="append", required=True,
                        help="image file, folder of images, http(s) URL, or a comma list of these (repeatable)")
    parser.add_argument("--prompt", required=True, help="the question asked about every image")
    parser.add_argument("--answer_type", choices=ANSWER_TYPES,
                        help="adds training's answer hint to the question (integer: 'Give an integer.'), as the "
                             "run's training and evaluation prompts had it")
    parser.add_argument("--choices", help="comma list of options: asked as a multiple-choice question, as in training")
    parser.add_argument("--unit", help="the answer's unit, hinted as in training")
    parser.add_argument("--precision", type=int, help="decimal places of a numeric answer, hinted as in training")
    parser.add_argument("--system_prompt", default=None,
                        help="system message (default: each run's own, recorded when it was published)")
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens if defaults else 512)
    parser.add_argument("--temperature", type=float, default=defaults.temperature if defaults else 0.0,
                        help="0 = greedy")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size if defaults else 8,
                        help="images per generate call (transformers backend; vLLM batches by itself)")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend if defaults else "auto",
                        help="auto: vLLM (one engine per base model, adapters as LoRA requests) when installed, "
                             "else transformers generate")
    parser.add_argument("--enable_wandb", action="store_true",
                        help="log a W&B table run × image × response (offline without WANDB_API_KEY)")
    parser.add_argument("--persist_result_local", action="store_true",
                        help=f"write JSONL + a markdown page under {RESULTS_ROOT}/")
    parser.add_argument("--url_timeout", type=float, default=URL_TIMEOUT_S, help="seconds per image download")
    parser.add_argument("--max_image_bytes", type=int, default=MAX_IMAGE_BYTES, help="size cap per image")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (registry location, base model)")
    return parser


def _params_path(argv: list[str]) -> str:
    """--params must be known before the parser is built, because it supplies the parser's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", default=str(PARAMS_FILE))
    return pre.parse_known_args(argv)[0].params


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    params = load_params_or_exit(_params_path(argv))
    args = build_parser(params).parse_args(argv)
    for name in ("max_new_tokens", "batch_size", "max_image_bytes"):
        if getattr(args, name) <= 0:
            print(f"error: --{name} must be positive", file=sys.stderr)
            return 2
    if args.temperature < 0 or args.url_timeout <= 0:
        print("error: --temperature must be >= 0 and --url_timeout > 0", file=sys.stderr)
        return 2
    if args.precision is not None and args.precision < 0:
        print("error: --precision must be >= 0 (decimal places)", file=sys.stderr)
        return 2
    choices = [c.strip() for c in args.choices.split(",") if c.strip()] if args.choices else None
    args.user_text = prompts.user_text(args.prompt, choices, args.unit, args.precision, args.answer_type)
    logs.configure()
    try:
        args.generation_backend = select_backend(args.backend)
    except BackendUnavailable as error:
        print(f"error: --backend: {error}", file=sys.stderr)
        return 2
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

    targets = resolve_runs(args.run_id, params)
    images = collect_images(args.image_path, args.url_timeout, args.max_image_bytes)
    problems = [Result(t.run_id, None, error=t.error) for t in targets if t.error]
    problems += [Result(None, i.source, error=i.error) for i in images if i.error]
    for target in targets:
        if target.warning:
            logger.warning("%s: %s", target.run_id, target.warning)
    runnable = [t for t in targets if t.error is None]
    usable = [i for i in images if i.data is not None]
    logger.info("%d run(s) × %d image(s): %s; generation backend %s (--backend %s)", len(runnable), len(usable),
                ", ".join(t.run_id for t in runnable), args.generation_backend, args.backend)
    results = run_inference(runnable, images, params, args) if runnable and usable else []
    order = {t.run_id: i for i, t in enumerate(targets)}
    results.sort(key=lambda r: order.get(r.run_id, len(order)))  # stable: images keep their order
    results = problems + results

    print_results(results)
    failures = [r for r in results if r.error]
    for failure in failures:
        what = f"run {failure.run_id!r}" if failure.run_id else "image"
        print(f"error: {what}{' ' + repr(failure.image) if failure.image else ''}: {failure.error}", file=sys.stderr)
    if args.persist_result_local:
        jsonl, page = persist(results, args, stamp)
        print(f"results: {jsonl} and {page}", file=sys.stderr)
    if args.enable_wandb:
        try:
            mode = log_to_wandb(results, images, params, args, stamp)
            print(f"W&B: table logged ({mode}{'; `wandb sync` to upload' if mode == 'offline' else ''})",
                  file=sys.stderr)
        except Exception as error:  # noqa: BLE001 - W&B trouble is reported, the answers above stand
            failures.append(Result(None, None, error=f"W&B logging failed: {error}"))
            print(f"error: W&B logging failed: {error}", file=sys.stderr)
    answered = len(results) - len([r for r in results if r.error])
    print(f"{answered} response(s) from {len(runnable)} run(s) × {len(usable)} image(s); "
          f"{len(failures)} problem(s)", file=sys.stderr)
    return 1 if failures or not answered else 0
