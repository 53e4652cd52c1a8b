"""The inference CLI's results: printed, persisted (JSONL for machines, a markdown page for people)
and, on request, logged to W&B as a table run × image × response.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.infer.images import ImageSource
from pipeline.params import OUTPUT_ROOT, Params

RESULTS_ROOT = OUTPUT_ROOT / "inference"


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
    system_prompt: str | None = None  # the run's own (recorded when it was published) unless --system_prompt



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
    common = {"prompt": args.prompt, "user_text": args.user_text, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature}
    atomic_write(jsonl, "".join(json.dumps({**asdict(r), **common}, ensure_ascii=False) + "\n" for r in results))
    ok = [r for r in results if not r.error]
    problems = [r for r in results if r.error]
    lines = [
        f"# Inference {stamp}",
        "",
        f"- prompt as sent: {_md(args.user_text)}",
        *(f"- system prompt: {_md(system)}" for system in sorted({r.system_prompt for r in ok if r.system_prompt})),
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
                     config={"prompt": args.prompt, "user_text": args.user_text,
                             "system_prompts": sorted({r.system_prompt for r in results if r.system_prompt}),
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

