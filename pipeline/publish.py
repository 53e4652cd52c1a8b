"""publish stage: record the run in the model registry and, when enabled, push the adapter to the Hub.

Local registration always happens first, so a run is findable by its id even when the Hub is out
of reach. The Hub upload needs `publish.push_to_hub: true` and an `HF_TOKEN` from the environment
or a `.env` file: never from params, because params end up in dvc.lock, git and W&B. The token is
handed to `HfApi` directly (not exported), and every message that could echo it is redacted.

The push is a sequence of registry checkpoints, so a failure at any point leaves a consistent entry
that says how far it got (`hub_status: pending`, `hub_commit` once the files are on the Hub), and
`python -m pipeline.publish` run again finishes the job instead of starting over:

1. create the repo (idempotent);
2. one commit with the adapter files and the model card (a Hub commit is all or nothing);
3. tag that commit with the run id: users fetch a run by a name they know, the registry records the
   commit sha, which is immutable even if someone moves the tag;
4. `hub_status: pushed` with `hub_revision`.

No token, offline, or the Hub unreachable: the run stays registered locally, the log says plainly
that nothing was pushed, and the stage still succeeds (exit 0) so the rest of the pipeline is not
held hostage by the network.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline import logs, registry
from pipeline.answer_format import SYSTEM_PROMPT
from pipeline.images import ImageRules
from pipeline.params import Params, Reports, load_params_or_exit

logger = logging.getLogger("pipeline.publish")
DOTENV = Path(".env")
IMAGE_TAG_ENV = "IMAGE_TAG"  # set by the container build; absent on a laptop
CARD_TAGS = ["grpo", "lora", "peft", "trl", "vision-language", "qwen-vl"]
# Files the pipeline itself rewrites during a run: changes to them do not make the code "dirty".
PIPELINE_WRITTEN = ("params.yaml", "dvc.lock")
PIPELINE_WRITTEN_DIRS = ("reports/",)
HUB_FIELDS = ("hub_repo_id", "hub_status", "hub_commit", "hub_revision", "hub_tag", "hub_url", "pushed_at",
              "hub_error")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
FULL_HASH_LIMIT = 64 * 2**20  # base-model files above this are fingerprinted by name and size only


# ---------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------
def hub_token(env: Mapping[str, str] | None = None, dotenv_file: Path = DOTENV) -> str | None:
    """HF_TOKEN from the environment, else from `.env`; the environment wins, as everywhere else."""
    env = os.environ if env is None else env
    token = (env.get("HF_TOKEN") or "").strip()
    if not token and dotenv_file.is_file():
        from dotenv import dotenv_values

        token = (dotenv_values(dotenv_file).get("HF_TOKEN") or "").strip()
    return token or None


def redact(text: str, token: str | None) -> str:
    """Errors from HTTP libraries can quote headers or URLs; no message leaves this module unredacted."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def hub_offline(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return (env.get("HF_HUB_OFFLINE") or "").strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return out.stdout


def git_commit() -> str | None:
    return (_git("rev-parse", "HEAD") or "").strip() or None


def git_dirty() -> bool | None:
    """Uncommitted code changes; the files a run rewrites itself do not count."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is None:
        return None
    changed = [line[3:].strip() for line in status.splitlines() if line.strip()]
    return any(path not in PIPELINE_WRITTEN and not path.startswith(PIPELINE_WRITTEN_DIRS) for path in changed)


def dvc_hashes(run_root: Path, lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """The content hashes DVC recorded for this run's prepared data and adapter."""
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    wanted = {str(run_root / "data"): "data", str(run_root / "adapter"): "adapter"}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in wanted and out.get("md5"):
                hashes[wanted[out["path"]]] = out["md5"]
    return hashes


def folder_digest(folder: Path, full_hash_limit: int | None = None) -> str:
    """sha256 over every file's relative path and content: the adapter's identity outside DVC too."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0")
        size = file.stat().st_size
        if full_hash_limit is not None and size > full_hash_limit:
            digest.update(f"size={size}".encode())
            continue
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def base_model_commit(name_or_path: str, revision: str) -> str | None:
    """The immutable commit behind a Hub id's branch or tag, read from the local HF cache (offline)."""
    if _SHA.match(revision):
        return revision
    if os.path.isdir(name_or_path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or cache is just "unknown"
        return None
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def params_digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def read_metrics(params: Params) -> dict | None:
    return json.loads(Reports.evaluation.read_text()) if Reports.evaluation.exists() else None


def key_metrics(metrics: Mapping[str, Any] | None) -> dict | None:
    if not metrics:
        return None
    keys = ("accuracy", "accuracy_ci95", "strict_format", "rows")
    return {name: {k: metrics[name][k] for k in keys if k in metrics.get(name, {})}
            for name in ("base", "adapter") if name in metrics}


# How the trainer held the base (model.quantization), as the model card states it
QUANTIZED_BASE = {"none": "unquantized (the checkpoint's dtype)",
                  "4bit": "4-bit NF4, double quantization (bitsandbytes)"}


def registry_fields(params: Params) -> dict:
    root = params.output_dir
    model = params.model
    base_is_local = os.path.isdir(model.name_or_path)
    return {
        "adapter_path": str(root / "adapter"),
        "adapter_digest": folder_digest(root / "adapter"),
        "base_model": model.name_or_path,
        "base_model_revision": model.revision,
        "base_model_commit": base_model_commit(model.name_or_path, model.revision),
        # a local folder has no commit: its content fingerprint tells whether it is still the same model
        "base_model_fingerprint": folder_digest(Path(model.name_or_path), FULL_HASH_LIMIT) if base_is_local else None,
        "dataset": params.data.source,
        "dataset_split": params.data.split,
        # what pipeline.infer needs to feed new images and prompts exactly as training and evaluation saw them
        "image_preprocessing": ImageRules.from_params(params).record(),
        "system_prompt": SYSTEM_PROMPT,
        "dvc_hashes": dvc_hashes(root),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "params_digest": params_digest(params),
        "image_tag": os.environ.get(IMAGE_TAG_ENV) or None,
        "metrics": key_metrics(read_metrics(params)),
        "registered_at": _now(),
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, list):
        return "–".join(_fmt(v) for v in value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def build_model_card(params: Params, entry: Mapping[str, Any], metrics: Mapping[str, Any] | None = None):
    """The Hub README: metadata the Hub indexes (peft, base model, datasets, eval results) + provenance."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_id = params.run_id
    repo_id = params.publish.hub_repo_id or f"<hub_repo_id>/{run_id}"
    base, data = params.model.name_or_path, params.data.source
    metrics = metrics if metrics is not None else (entry.get("metrics") or {})
    eval_results = []
    for model_name in ("adapter", "base"):
        for key in ("accuracy", "strict_format"):
            value = (metrics.get(model_name) or {}).get(key)
            if value is None:
                continue
            eval_results.append(EvalResult(
                task_type="visual-question-answering", dataset_type=data if is_hub_id(data) else "local",
                dataset_name=data, dataset_config=params.data.config, dataset_split=params.data.split,
                metric_type=key, metric_value=value, metric_name=f"{key} ({model_name})",
            ))
    card_data = ModelCardData(
        library_name="peft",
        # the Hub rejects metadata that names a repo it does not know: local paths go in the body only
        base_model=base if is_hub_id(base) else None,
        datasets=[data] if is_hub_id(data) else None,
        tags=[*CARD_TAGS, f"run-{run_id}"],
        pipeline_tag="image-text-to-text",
        model_name=f"{repo_id} ({run_id})",
        eval_results=eval_results or None,
    )
    hashes = entry.get("dvc_hashes") or {}
    revision_hint = f"{params.model.revision}" + (
        f" (commit {entry['base_model_commit']})" if entry.get("base_model_commit") else "")
    rows = [
        ("run id (Hub tag)", run_id),
        ("base model", f"{base} @ {revision_hint}"),
        ("base model fingerprint", entry.get("base_model_fingerprint")),
        ("base model in training", QUANTIZED_BASE.get(params.model.quantization, params.model.quantization)),
        ("dataset", f"{data} (split {params.data.split})"),
        ("git commit", f"{entry.get('git_commit') or 'unknown'}" + (" + uncommitted changes"
                                                                    if entry.get("git_dirty") else "")),
        ("DVC hash: prepared data", hashes.get("data")),
        ("DVC hash: adapter", hashes.get("adapter")),
        ("adapter digest", entry.get("adapter_digest")),
        ("params digest", entry.get("params_digest")),
        ("container image", entry.get("image_tag") or f"none ({IMAGE_TAG_ENV} not set)"),
        ("registered", entry.get("registered_at")),
    ]
    metric_rows = []
    for key in ("accuracy", "accuracy_ci95", "strict_format", "soft_format", "extraction_rate", "rows"):
        base_value, adapter_value = ((metrics.get(n) or {}).get(key) for n in ("base", "adapter"))
        if base_value is not None or adapter_value is not None:
            metric_rows.append(f"| {key} | {_fmt(base_value)} | {_fmt(adapter_value)} |")
    params_yaml = yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).rstrip()
    body = "\n".join([
        f"# {repo_id} — run `{run_id}`",
        "",
        f"A LoRA adapter for `{base}`, trained with GRPO (TRL) on `{data}` by the grpo-qwen-vl pipeline.",
        "Answers are requested as `<reasoning>…</reasoning><answer>…</answer>`.",
        *([f"The base was quantized while training ({QUANTIZED_BASE[params.model.quantization]}, QLoRA); "
           "the adapter applies to the unquantized base, as evaluated here."]
          if params.model.quantization != "none" else []),
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'base = AutoModelForImageTextToText.from_pretrained("{base}", revision="{params.model.revision}")',
        f'processor = AutoProcessor.from_pretrained("{base}", revision="{params.model.revision}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{run_id}")',
        "```",
        "",
        "or, in the project: `python -m pipeline.infer --run_id " + run_id + " --image_path <images>`.",
        "",
        "## Evaluation (held-out split, greedy)",
        "",
        "| metric | base | adapter |",
        "| --- | --- | --- |",
        *(metric_rows or ["| — | — | — |"]),
        "",
        "## Provenance",
        "",
        "| | |",
        "| --- | --- |",
        *(f"| {name} | {_fmt(value)} |" for name, value in rows),
        "",
        "## Parameters",
        "",
        "```yaml",
        params_yaml,
        "```",
        "",
    ])
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


# ---------------------------------------------------------------------------------------------
# Hub push
# ---------------------------------------------------------------------------------------------
class PushError(RuntimeError):
    """The push stopped; the message is safe to log (token redacted)."""


def _adapter_files(adapter: Path) -> list[Path]:
    # peft's own README is an empty template: the project's model card replaces it
    return sorted(p for p in adapter.rglob("*") if p.is_file() and p.relative_to(adapter).as_posix() != "README.md")


def push_adapter(params: Params, entry: dict, token: str, registry_file: Path, api=None) -> dict:
    """Steps 1-4 of the module docstring; each finished step is in the registry before the next starts."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi(token=token)
    repo_id, run_id = params.publish.hub_repo_id, params.run_id
    adapter = Path(entry["adapter_path"])
    commit = entry.get("hub_commit")
    if commit:
        logger.info("files already on the Hub in commit %s (earlier attempt): only the tag is missing", commit)
    else:
        api.create_repo(repo_id, private=params.publish.hub_private, exist_ok=True)
        card = build_model_card(params, entry, read_metrics(params))
        operations = [CommitOperationAdd(path_in_repo=f.relative_to(adapter).as_posix(), path_or_fileobj=str(f))
                      for f in _adapter_files(adapter)]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        info = api.create_commit(repo_id, operations=operations, commit_message=f"run {run_id}: adapter + model card",
                                 commit_description=f"params digest {entry.get('params_digest')}, git commit "
                                                    f"{entry.get('git_commit')}")
        commit = info.oid
        entry = registry.upsert(registry_file, run_id, {"hub_commit": commit, "hub_url": info.commit_url},
                                doc=registry.doc_path(registry_file))
    _tag(api, repo_id, run_id, commit)
    return registry.upsert(registry_file, run_id, {
        "hub_status": registry.HUB_PUSHED, "hub_revision": commit, "hub_tag": run_id, "pushed_at": _now(),
        "hub_error": None,
    }, doc=registry.doc_path(registry_file))


def _tag(api, repo_id: str, run_id: str, commit: str) -> None:
    """Tag `commit` with the run id; a tag left by an older publish of the same run id is moved."""
    refs = api.list_repo_refs(repo_id)
    existing = next((ref for ref in refs.tags if ref.name == run_id), None)
    if existing is not None and existing.target_commit == commit:
        return
    if existing is not None:
        logger.warning("Hub tag %r pointed at %s (an older publish of this run id); moving it to %s",
                       run_id, existing.target_commit, commit)
        api.delete_tag(repo_id, tag=run_id)
    api.create_tag(repo_id, tag=run_id, revision=commit, tag_message=f"grpo-qwen-vl run {run_id}")


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _hub_state_still_valid(previous: Mapping[str, Any] | None, fields: Mapping[str, Any], repo_id: str | None) -> bool:
    """An earlier push (or partial push) counts only for the same adapter bytes and the same repo."""
    return bool(previous) and previous.get("adapter_digest") == fields["adapter_digest"] and \
        previous.get("hub_repo_id") == repo_id and previous.get("hub_status") in (registry.HUB_PUSHED,
                                                                                   registry.HUB_PENDING)


def publish(params: Params, env: Mapping[str, str] | None = None, api=None) -> tuple[dict, str]:
    """Register, then push when asked and possible. Returns the entry and a one-line outcome for humans."""
    adapter = params.output_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"publish: error: no adapter in {adapter}; run the train stage first")
    registry_file = Path(params.publish.registry_file)
    repo_id = params.publish.hub_repo_id
    fields = registry_fields(params)
    previous = registry.runs(registry_file).get(params.run_id)
    keep_hub_state = _hub_state_still_valid(previous, fields, repo_id if params.publish.push_to_hub else
                                            (previous or {}).get("hub_repo_id"))
    if not keep_hub_state:
        fields.update(dict.fromkeys(HUB_FIELDS))
        fields["hub_status"] = registry.HUB_PENDING if params.publish.push_to_hub else registry.HUB_DISABLED
        fields["hub_repo_id"] = repo_id if params.publish.push_to_hub else None
    doc = registry.doc_path(registry_file)
    entry = registry.upsert(registry_file, params.run_id, fields, doc=doc)
    where = f"run {params.run_id!r} registered in {registry_file} and {doc}"

    if entry.get("hub_status") == registry.HUB_PUSHED:
        return entry, f"{where}; already on the Hub: {entry['hub_repo_id']}@{entry['hub_revision']} (nothing to push)"
    if not params.publish.push_to_hub:
        return entry, f"{where}; NOTHING pushed to the Hub (publish.push_to_hub is false)"
    token = hub_token(env)
    if not token:
        reason = "no HF_TOKEN in the environment or .env"
    elif hub_offline(env):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            entry = push_adapter(params, entry, token, registry_file, api=api)
        except Exception as error:  # noqa: BLE001 - any failure must leave a pending, retryable entry
            reason = redact(f"the push failed: {type(error).__name__}: {error}", token).splitlines()[0][:500]
        else:
            return entry, (f"{where}; pushed to the Hub: {repo_id}@{entry['hub_revision']} "
                           f"(tag {entry['hub_tag']!r})")
    entry = registry.upsert(registry_file, params.run_id, {"hub_error": reason}, doc=doc)
    partial = f" (files are in Hub commit {entry['hub_commit']}, tag missing)" if entry.get("hub_commit") else ""
    return entry, (f"{where}; NOTHING pushed to the Hub{partial}: {reason}. The entry is marked "
                   "hub_status: pending; run `python -m pipeline.publish` again to complete the push")


WALL_CLOCK_FIELDS = ("registered_at", "pushed_at")


def stage_record(entry: Mapping[str, Any]) -> dict:
    """The registry entry as the stage's DVC output: without the times it was registered and
    pushed (those stay in registry.json), so rerunning an unchanged run changes no hash in dvc.lock."""
    return {key: value for key, value in entry.items() if key not in WALL_CLOCK_FIELDS}


def main() -> None:
    params = load_params_or_exit()
    logs.configure()
    try:
        entry, outcome = publish(params)
    except registry.RegistryError as error:
        raise SystemExit(f"publish: error: {error}") from None
    if entry.get("hub_status") == registry.HUB_PENDING:
        logger.warning("%s", outcome)
    else:
        logger.info("%s", outcome)
    registry.atomic_write(params.output_dir / "publish.json", json.dumps(stage_record(entry), indent=2) + "\n")


if __name__ == "__main__":
    main()
