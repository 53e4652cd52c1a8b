"""publish stage: record the run in the model registry (and, when enabled, push to the Hub).

Registration is local and always happens; the Hub upload needs `publish.push_to_hub: true` and an
`HF_TOKEN` in the environment. The token is read from the environment only, never from params,
and is never written anywhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import yaml

from pipeline import registry
from pipeline.params import Params, load_params_or_exit

logger = logging.getLogger("pipeline.publish")
DOC = Path("docs/model_registry.md")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


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


def params_digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


def registry_fields(params: Params) -> dict:
    root = params.output_dir
    metrics_file = root / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    return {
        "adapter_path": str(root / "adapter"),
        "base_model": params.model.name_or_path,
        "base_model_revision": params.model.revision,
        "dataset": params.data.source,
        "dvc_hashes": dvc_hashes(root),
        "git_commit": git_commit(),
        "params_digest": params_digest(params),
        "metrics": {name: {k: metrics[name][k] for k in ("accuracy", "strict_format", "rows")}
                    for name in ("base", "adapter")} if metrics else None,
        "registered_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }


def publish(params: Params) -> dict:
    adapter = params.output_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"publish: error: no adapter in {adapter}; run the train stage first")
    registry_file = Path(params.publish.registry_file)
    entry = registry.upsert(registry_file, params.run_id, registry_fields(params))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(registry.render_markdown(registry_file))
    if params.publish.push_to_hub and not os.environ.get("HF_TOKEN"):
        logger.warning("publish.push_to_hub is true but HF_TOKEN is not set: registered locally, nothing pushed")
    elif not params.publish.push_to_hub:
        logger.info("registered %s locally in %s (publish.push_to_hub is false: nothing pushed)",
                    params.run_id, registry_file)
    return entry


def main() -> None:
    params = load_params_or_exit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        entry = publish(params)
    except registry.RegistryError as error:
        raise SystemExit(f"publish: error: {error}") from None
    out = params.output_dir / "publish.json"
    out.write_text(json.dumps(entry, indent=2) + "\n")


if __name__ == "__main__":
    main()
