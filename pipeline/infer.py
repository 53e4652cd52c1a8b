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
import io
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import answer_format, logs, prompts, registry
from pipeline.generation import BACKENDS, BackendUnavailable, select_backend
from pipeline.images import ImageRules, prepare_image
from pipeline.params import OUTPUT_ROOT, PARAMS_FILE, Params, load_params_or_exit

logger = logging.getLogger("pipeline.infer")

RESULTS_ROOT = OUTPUT_ROOT / "inference"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
URL_SCHEMES = ("http://", "https://")
URL_TIMEOUT_S = 20.0
MAX_IMAGE_BYTES = 20 * 2**20  # an image larger than this is not a photo or chart a VL model needs
BASE = "base"
ALL = "all"


@dataclass
class ImageSource:
    """One requested image: raw bytes once read, or the reason it could not be."""

    source: str
    data: bytes | None = None
    error: str | None = None


@dataclass
class RunTarget:
    """One requested run: where its base model and adapter are, or the reason it cannot run."""

    run_id: str
    base_model: str = ""
    base_revision: str = "main"
    adapter: str | None = None  # local folder with adapter_config.json; None for the base model
    adapter_source: str | None = None  # what to tell the user: a path or repo@revision
    preprocessing: dict = field(default_factory=dict)
    error: str | None = None
    warning: str | None = None


@dataclass
class Result:
    run_id: str | None
    image: str | None
    response: str | None = None
    answer: str | None = None
    format_ok: bool | None = None
    num_tokens: int = 0
    truncated: bool = False
    adapter: str | None = None
    error: str | None = None
    backend: str | None = None  # vllm or transformers: what generated the response


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def split_list(values: list[str], paths: bool = False) -> list[str]:
    """Repeated flags and comma lists alike; with `paths`, a value that exists as a path is never split."""
    items = []
    for value in values:
        if paths and os.path.exists(value):
            items.append(value)
        else:
            items += [part.strip() for part in value.split(",") if part.strip()]
    return items


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Download with a deadline for the whole transfer and a size cap enforced while reading.

    Content-Length is checked first but not trusted: a server may omit or understate it.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "grpo-qwen-vl-infer"})
    deadline = time.monotonic() + timeout
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked by caller
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise ValueError(f"{int(declared)} bytes, over the {max_bytes}-byte limit (--max_image_bytes)")
        chunks, size = [], 0
        while chunk := response.read(1 << 16):
            size += len(chunk)
            if size > max_bytes:
                raise ValueError(f"more than {max_bytes} bytes, over the limit (--max_image_bytes)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"download took longer than {timeout:g} s (--url_timeout)")
            chunks.append(chunk)
    return b"".join(chunks)


def collect_images(specs: list[str], timeout: float = URL_TIMEOUT_S,
                   max_bytes: int = MAX_IMAGE_BYTES) -> list[ImageSource]:
    """Files, folders (their image files, sorted) and URLs → raw bytes; failures stay in the list."""
    images: list[ImageSource] = []
    for spec in split_list(specs, paths=True):
        if "://" in spec:
            if not spec.lower().startswith(URL_SCHEMES):
                images.append(ImageSource(spec, error="unsupported URL scheme (only http and https)"))
                continue
            try:
                images.append(ImageSource(spec, data=fetch_url(spec, timeout, max_bytes)))
            except urllib.error.HTTPError as error:
                images.append(ImageSource(spec, error=f"download failed: HTTP {error.code} {error.reason}"))
            except urllib.error.URLError as error:
                images.append(ImageSource(spec, error=f"download failed: {error.reason}"))
            except (OSError, ValueError) as error:  # timeouts are OSErrors
                images.append(ImageSource(spec, error=f"download failed: {error}"))
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                images.append(ImageSource(spec, error=f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder"))
            images += [_read_file(p, max_bytes) for p in files]
        elif path.is_file():
            images.append(_read_file(path, max_bytes))
        else:
            images.append(ImageSource(spec, error="no such file or folder"))
    return images


def _read_file(path: Path, max_bytes: int) -> ImageSource:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return ImageSource(str(path), error=f"{size} bytes, over the {max_bytes}-byte limit (--max_image_bytes)")
        return ImageSource(str(path), data=path.read_bytes())
    except OSError as error:
        return ImageSource(str(path), error=f"cannot read: {error.strerror or error}")


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def resolve_runs(specs: list[str], params: Params) -> list[RunTarget]:
    """`all` → every registered run, `base` → the params' base model, else registry ids; order kept."""
    registry_file = Path(params.publish.registry_file)
    registry_error = None
    try:
        entries = registry.runs(registry_file)
    except registry.RegistryError as error:
        entries, registry_error = {}, str(error)
    wanted: list[str] = []
    targets: list[RunTarget] = []
    for spec in split_list(specs):
        if spec == ALL:
            if registry_error:
                targets.append(RunTarget(ALL, error=registry_error))
            elif not entries:
                targets.append(RunTarget(ALL, error=f"no run registered in {registry_file} yet "
                                                    "(the publish stage registers runs: make demo)"))
            wanted += list(entries)
        else:
            wanted.append(spec)
    seen = set()
    for run_id in wanted:
        if run_id in seen:
            continue
        seen.add(run_id)
        if run_id == BASE:
            targets.append(RunTarget(BASE, params.model.name_or_path, params.model.revision,
                                     preprocessing=ImageRules.from_params(params).record()))
        elif run_id not in entries:
            known = ", ".join(sorted(entries)) or "none registered yet"
            reason = registry_error or f"unknown run id (known: {known}; or 'all', 'base')"
            targets.append(RunTarget(run_id, error=reason))
        else:
            targets.append(locate_adapter(run_id, entries[run_id]))
    return targets


def locate_adapter(run_id: str, entry: dict) -> RunTarget:
    """Local folder first (no network, exactly what was evaluated), else the Hub revision."""
    from pipeline.publish import folder_digest, hub_token, redact

    target = RunTarget(run_id, entry.get("base_model", ""), entry.get("base_model_revision") or "main",
                       preprocessing=entry.get("image_preprocessing") or {})
    local = Path(entry.get("adapter_path") or f"{OUTPUT_ROOT}/{run_id}/adapter")
    if (local / "adapter_config.json").is_file():
        target.adapter, target.adapter_source = str(local), str(local)
        recorded = entry.get("adapter_digest")
        if recorded and folder_digest(local) != recorded:
            target.warning = (f"the adapter in {local} is not the one registered for {run_id!r} (content differs): "
                              "it was retrained since it was published; using it anyway")
        return target
    repo, revision = entry.get("hub_repo_id"), entry.get("hub_revision")
    restore = f"restore it with `dvc exp apply {run_id}` (DVC keeps every run's outputs in its cache)"
    if repo and revision:
        token = hub_token()
        try:
            from huggingface_hub import snapshot_download

            target.adapter = snapshot_download(repo, revision=revision, token=token)
            target.adapter_source = f"{repo}@{revision}"
            return target
        except Exception as error:  # noqa: BLE001 - offline, private, deleted: all mean "not here"
            first = redact(str(error).strip(), token).splitlines()[0] if str(error).strip() else type(error).__name__
            target.error = (f"adapter not in the working copy ({local}) and the Hub revision {repo}@{revision} "
                            f"could not be fetched ({type(error).__name__}: {first[:200]}); {restore}")
            return target
    target.error = (f"adapter not in the working copy ({local}): the working copy holds only the last DVC "
                    f"experiment's outputs; {restore}, or publish it to the Hub (publish.push_to_hub)")
    return target


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
    job = _Job(usable, params, args, prompts.conversation(prompts.user_text(args.prompt), args.system_prompt),
               results)
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
    conversation: list[dict]
    results: list[Result]
    cache: dict[ImageRules, list] = field(default_factory=dict)  # → [(source, image, error)]
    reported: set[str] = field(default_factory=set)  # an unusable image is reported once, not once per run

    def add(self, target: RunTarget, prepared: list[ImageSource], generations, backend: str) -> None:
        for source, generation in zip(prepared, generations, strict=True):
            answer, format_ok = score(generation.text)
            self.results.append(Result(target.run_id, source.source, generation.text, answer, format_ok,
                                       generation.num_tokens, generation.truncated, target.adapter_source,
                                       generation.error, backend))


def _base_error(base_model: str, error: Exception) -> str:
    return f"cannot load base model {base_model!r}: {str(error).strip().splitlines()[0][:300]}"


def _run_group(base_model: str, revision: str, members: list[RunTarget], job: _Job) -> None:
    """One base model (one vLLM engine, or one transformers model) for all its runs' adapters."""
    from pipeline import generation

    args, model = job.args, job.params.model
    settings = generation.Settings(
        revision=revision, dtype=model.dtype, attn_implementation=model.attn_implementation,
        max_model_len=model.max_model_len, seed=job.params.seed, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, batch_size=args.batch_size)
    prepared: dict[str, list[ImageSource]] = {}  # run id → the images its answers belong to
    done: set[str] = set()  # runs whose images were prepared or that failed: not the base model's fault

    def inputs(target: RunTarget):
        def prepare():
            done.add(target.run_id)
            prepared[target.run_id], batch_images = _prepare_images(target, job)
            return [job.conversation] * len(batch_images), batch_images
        return prepare

    requests = [generation.Request(t.adapter, f"infer {t.run_id}", inputs(t)) for t in members]
    by_request = {id(request): target for request, target in zip(requests, members, strict=True)}
    try:
        for served in generation.serve(base_model, requests, settings, backend=args.generation_backend,
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
# output
# ---------------------------------------------------------------------------------------------
def print_results(results: list[Result], out=None) -> None:
    out = out or sys.stdout  # looked up per call: callers (and tests) may have replaced sys.stdout
    for result in results:
        if result.error:
            continue
        status = "followed" if result.format_ok else "NOT followed"
        print(f"[{result.run_id}] {result.image}", file=out)
        print(f"  answer: {result.answer if result.answer is not None else '(none extracted)'}   "
              f"format: {status}   tokens: {result.num_tokens}{' (truncated)' if result.truncated else ''}",
              file=out)
        print("  response: " + (result.response or "").replace("\n", "\n            "), file=out)


def _md(text: Any) -> str:
    return "—" if text is None or text == "" else str(text).replace("|", "\\|").replace("\n", "<br>")


def _problem_subject(result: Result) -> str:
    parts = [f"run `{result.run_id}`"] if result.run_id else []
    parts += [f"image `{result.image}`"] if result.image else []
    return _md(", ".join(parts) or "W&B")


def persist(results: list[Result], args, stamp: str, root: Path = RESULTS_ROOT) -> tuple[Path, Path]:
    """JSONL for machines, a markdown page for people; one pair per invocation, never overwritten."""
    from pipeline.registry import atomic_write

    root.mkdir(parents=True, exist_ok=True)
    jsonl, page = root / f"{stamp}.jsonl", root / f"{stamp}.md"
    common = {"prompt": args.prompt, "system_prompt": args.system_prompt, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature}
    atomic_write(jsonl, "".join(json.dumps({**asdict(r), **common}, ensure_ascii=False) + "\n" for r in results))
    ok = [r for r in results if not r.error]
    problems = [r for r in results if r.error]
    lines = [
        f"# Inference {stamp}",
        "",
        f"- prompt: {_md(args.prompt)}",
        f"- system prompt: {_md(args.system_prompt)}",
        f"- generation: max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, "
        f"batch size {args.batch_size}, backend {', '.join(sorted({r.backend for r in results if r.backend})) or '—'}",
        f"- {len(ok)} responses, {len(problems)} problems; machine-readable: `{jsonl.name}`",
        "",
        "| run | image | answer | format followed | response |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {_md(r.run_id)} | {_md(r.image)} | {_md(r.answer)} | {'yes' if r.format_ok else 'no'} | "
          f"{_md(r.response)} |" for r in ok),
    ]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {_problem_subject(r)}: {_md(r.error)}" for r in problems]
    atomic_write(page, "\n".join(lines) + "\n")
    return jsonl, page


def log_to_wandb(results: list[Result], images: list[ImageSource], params: Params, args, stamp: str) -> str:
    """A W&B table run × image × response; offline without WANDB_API_KEY (`wandb sync` later)."""
    import wandb
    from PIL import Image

    # --enable_wandb is an explicit request, so params' `disabled` still logs, but never online
    online = os.environ.get("WANDB_API_KEY") and params.tracking.wandb_mode in ("auto", "online")
    mode = "online" if online else "offline"
    RESULTS_ROOT.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=params.tracking.wandb_project, job_type="inference", name=f"infer-{stamp}",
                     mode=mode, dir=str(RESULTS_ROOT), settings=wandb.Settings(console="off"),
                     config={"prompt": args.prompt, "system_prompt": args.system_prompt,
                             "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                             "runs": sorted({r.run_id for r in results if r.run_id})})
    data = {image.source: image.data for image in images if image.data is not None}
    table = wandb.Table(columns=["run_id", "image", "source", "response", "answer", "format_followed", "error"])
    for r in results:
        picture = None
        if r.image in data:
            picture = wandb.Image(Image.open(io.BytesIO(data[r.image])).convert("RGB"))
        table.add_data(r.run_id, picture, r.image, r.response, r.answer, r.format_ok, r.error)
    run.log({"inference": table})
    run.finish()
    return mode


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
    parser.add_argument("--system_prompt", default=answer_format.SYSTEM_PROMPT,
                        help="system message (default: the one used in training)")
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


if __name__ == "__main__":
    raise SystemExit(main())
