"""The model registry: one human-readable JSON file, one entry per run id.

Writes are atomic (temp file, fsync, rename) under a file lock, so concurrent writers lose no
entry and a reader never sees a half-written file. docs/model_registry.md is generated from it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

SCHEMA_VERSION = 1


class RegistryError(RuntimeError):
    pass


def read(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "runs": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RegistryError(f"{path}: not valid JSON ({error}); fix or restore it from git") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise RegistryError(f"{path}: expected an object with a 'runs' mapping")
    return data


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upsert(path: Path, run_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Merge `fields` into the run's entry (creating it) and return the entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        data = read(path)
        entry = {**data["runs"].get(run_id, {}), **fields, "run_id": run_id}
        data["runs"][run_id] = entry
        data["runs"] = dict(sorted(data["runs"].items()))
        _atomic_write(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
    return entry


def get(path: Path, run_id: str) -> dict[str, Any]:
    runs = read(path)["runs"]
    if run_id not in runs:
        known = ", ".join(sorted(runs)) or "none registered yet"
        raise RegistryError(f"unknown run id {run_id!r} (known: {known})")
    return runs[run_id]


def render_markdown(path: Path) -> str:
    runs = read(path)["runs"]
    lines = [
        "# Model registry",
        "",
        f"Generated from `{Path(path).name}` by the publish stage; do not edit by hand.",
        "",
        "| run id | base model | adapter | Hub | accuracy (base → adapter) | strict format | git commit | registered |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run_id, entry in runs.items():
        metrics = entry.get("metrics") or {}
        base, adapter = metrics.get("base", {}), metrics.get("adapter", {})
        hub = entry.get("hub_repo_id")
        hub_cell = f"{hub}@{entry.get('hub_revision', '')[:8]}" if hub and entry.get("hub_revision") else "—"
        lines.append(
            f"| {run_id} | {entry.get('base_model', '')} | `{entry.get('adapter_path', '')}` | {hub_cell} | "
            f"{base.get('accuracy', '—')} → {adapter.get('accuracy', '—')} | "
            f"{base.get('strict_format', '—')} → {adapter.get('strict_format', '—')} | "
            f"{(entry.get('git_commit') or '')[:8]} | {entry.get('registered_at', '')} |"
        )
    return "\n".join(lines) + "\n"
