"""The model registry: one human-readable JSON file, one entry per published run id.

Why a plain file and not a service: diffable and readable without any tool. It lives under outputs/
(`publish.registry_file`, git-ignored), so it belongs to the working copy, not to one experiment:
it grows with every run published here, and `dvc exp apply` of one run drops no other. Each run's
own entry also travels with its experiment, as the publish stage's cached output
(outputs/<run_id>/publish.json), which is where `pipeline.infer.runs` finds a run published in
another working copy or in DVC's queue. Its two hazards are handled here:

- concurrent writers (two runs publishing at once, a retry racing a stage) serialise on a lock
  file next to the registry, and each one re-reads the file under the lock, so no entry is lost;
- a crash mid-write never leaves a half-written file: the new content goes to a temp file in the
  same folder, is fsynced, then renamed over the old one (atomic on POSIX). Readers take no lock:
  they see the old file or the new one, never a mix.

`model_registry.md` next to it (`doc_path`) is rendered from the same data inside the same lock, so
the page can never describe an older registry than the JSON next to it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

SCHEMA_VERSION = 1
LOCK_TIMEOUT_S = 60
HUB_PUSHED, HUB_PENDING, HUB_DISABLED = "pushed", "pending", "disabled"


class RegistryError(RuntimeError):
    pass


def doc_path(path: Path | str) -> Path:
    """The registry's human-readable page, next to the JSON."""
    return Path(path).with_name("model_registry.md")


def empty() -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "runs": {}}


def read(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return empty()
    return parse(path.read_text(), str(path))


def parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RegistryError(f"{where}: not valid JSON ({error}); fix or restore it from git") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise RegistryError(f"{where}: expected an object with a 'runs' mapping")
    if data.get("schema_version", SCHEMA_VERSION) > SCHEMA_VERSION:
        raise RegistryError(f"{where}: schema_version {data['schema_version']} is newer than this code "
                            f"({SCHEMA_VERSION}); update the project")
    return data


def runs(path: Path | str) -> dict[str, dict[str, Any]]:
    return read(path)["runs"]


def get(path: Path | str, run_id: str) -> dict[str, Any]:
    known = runs(path)
    if run_id not in known:
        names = ", ".join(sorted(known)) or "none registered yet"
        raise RegistryError(f"unknown run id {run_id!r} (known: {names})")
    return known[run_id]


def _lock(path: Path) -> FileLock:
    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: Path | str, text: str) -> None:
    """Temp file in the target's folder (a rename across filesystems is not atomic), fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        # mkstemp makes 0600 files; the registry is a shared, committed file, so keep the usual mode
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut only once the directory entry is on disk
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _remove_stale_temps(path: Path) -> None:
    """Temp files left by a writer that was killed; safe under the lock, where no one else is writing."""
    for stale in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        stale.unlink(missing_ok=True)


def upsert(path: Path | str, run_id: str, fields: Mapping[str, Any], doc: Path | str | None = None) -> dict[str, Any]:
    """Merge `fields` into the run's entry (creating it), optionally re-render `doc`; return the entry.

    Read-modify-write happens entirely under the lock: a writer that read before taking the lock
    would overwrite entries added meanwhile.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        _remove_stale_temps(path)
        data = read(path)
        entry = {**data["runs"].get(run_id, {}), **fields, "run_id": run_id}
        data["runs"][run_id] = entry
        data["runs"] = dict(sorted(data["runs"].items()))
        data["schema_version"] = SCHEMA_VERSION
        atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        if doc is not None:
            atomic_write(doc, render_markdown(data, source_name=path.name))
    return entry


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _hub_cell(entry: Mapping[str, Any]) -> str:
    status = entry.get("hub_status") or HUB_DISABLED
    repo = entry.get("hub_repo_id")
    if status == HUB_PUSHED and repo and entry.get("hub_revision"):
        return f"[{repo}@{entry['hub_revision'][:10]}](https://huggingface.co/{repo}/tree/{entry['hub_revision']})"
    if status == HUB_PENDING:
        return f"pending ({repo})" if repo else "pending"
    return "not pushed"


def _pair(metrics: Mapping[str, Any], key: str) -> str:
    base, adapter = (metrics.get("base") or {}).get(key), (metrics.get("adapter") or {}).get(key)
    if base is None and adapter is None:
        return "—"
    return f"{_cell(base)} → {_cell(adapter)}"


def render_markdown(data_or_path: Mapping[str, Any] | Path | str, source_name: str | None = None) -> str:
    if isinstance(data_or_path, Mapping):
        data = data_or_path
    else:
        data = read(data_or_path)
        source_name = source_name or Path(data_or_path).name
    source_name = source_name or "registry.json"
    lines = [
        "# Model registry",
        "",
        f"Generated from `{source_name}` by the publish stage (`pipeline/registry.py`); do not edit by hand.",
        "Run any entry on your own images with `python -m pipeline.infer --run_id <run id> --image_path <dir>`",
        "(see `docs/inference_guide.md`); it finds each run's adapter in the working copy, in the run's DVC",
        "experiment, or at its Hub revision.",
        "",
        "| run id | base model | adapter | Hub | accuracy (base → adapter) | strict format (base → adapter) "
        "| DVC data / adapter | git commit | params | registered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run_id, entry in data["runs"].items():
        metrics = entry.get("metrics") or {}
        hashes = entry.get("dvc_hashes") or {}
        base = entry.get("base_model", "")
        commit = (entry.get("base_model_commit") or "")[:10]
        base_cell = f"{base}@{commit}" if commit else f"{base} ({entry.get('base_model_revision') or '—'})"
        dvc_cell = f"{(hashes.get('data') or '—')[:8]} / {(hashes.get('adapter') or '—')[:8]}"
        git = (entry.get("git_commit") or "")[:8] + (" (dirty)" if entry.get("git_dirty") else "")
        lines.append(" | ".join([
            f"| {_cell(run_id)}", _cell(base_cell), f"`{_cell(entry.get('adapter_path'))}`", _hub_cell(entry),
            _pair(metrics, "accuracy"), _pair(metrics, "strict_format"), _cell(dvc_cell), _cell(git),
            f"`{_cell(entry.get('params_digest'))}`", f"{_cell(entry.get('registered_at'))} |",
        ]))
    if not data["runs"]:
        lines.append("")
        lines.append("No run registered yet: `make demo` registers the `demo` run.")
    return "\n".join(lines) + "\n"
