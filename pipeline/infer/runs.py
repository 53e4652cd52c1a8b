"""The inference CLI's runs: registry ids (`all` for every registered run, `base` for the params'
base model) → where each run's base model and adapter are. The adapter comes from its local folder
when it is there (no network, exactly what was evaluated), else from its recorded Hub revision;
otherwise the run's error says how to bring it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import registry
from pipeline.answer_format import SYSTEM_PROMPT
from pipeline.images import ImageRules
from pipeline.infer.images import split_list
from pipeline.params import OUTPUT_ROOT, Params

BASE = "base"
ALL = "all"


@dataclass
class RunTarget:
    """One requested run: where its base model and adapter are, or the reason it cannot run."""

    run_id: str
    base_model: str = ""
    base_revision: str = "main"
    adapter: str | None = None  # local folder with adapter_config.json; None for the base model
    adapter_source: str | None = None  # what to tell the user: a path or repo@revision
    preprocessing: dict = field(default_factory=dict)
    system_prompt: str = SYSTEM_PROMPT  # the one the run was trained and evaluated with, from its record
    error: str | None = None
    warning: str | None = None



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
        elif run_id in entries:
            targets.append(locate_adapter(run_id, entries[run_id]))
        elif (entry := entry_from_experiment(run_id)) is not None:
            targets.append(locate_adapter(run_id, entry))
        else:
            targets.append(RunTarget(run_id, error=registry_error or unknown_run(run_id, entries)))
    return targets



def unknown_run(run_id: str, entries: dict) -> str:
    """Why a run id cannot be served, and the one command that would fix it."""
    if experiment_commits(run_id):
        return (f"run {run_id!r} was not published (train and evaluate do not register a run): "
                f"`make publish RUN_ID={run_id}` registers it")
    known = ", ".join(sorted(entries)) or "none registered yet"
    return f"unknown run id (known: {known}; or 'all', 'base'); a run is registered by `make publish RUN_ID=<id>`"


def locate_adapter(run_id: str, entry: dict) -> RunTarget:
    """Local folder first (no network, exactly what was evaluated), else the Hub revision."""
    from pipeline.publish import folder_digest, hub_token, redact

    target = RunTarget(run_id, entry.get("base_model", ""), entry.get("base_model_revision") or "main",
                       preprocessing=entry.get("image_preprocessing") or {},
                       system_prompt=entry.get("system_prompt") or SYSTEM_PROMPT)
    local = Path(entry.get("adapter_path") or f"{OUTPUT_ROOT}/{run_id}/adapter")
    recorded = entry.get("adapter_digest")
    here = (local / "adapter_config.json").is_file()
    if here and (not recorded or folder_digest(local) == recorded):
        target.adapter, target.adapter_source = str(local), str(local)
        return target
    kept = adapter_from_experiment(run_id, local, recorded)
    if kept is not None:
        target.adapter, target.adapter_source = str(kept), f"DVC experiment {run_id!r} ({kept})"
        return target
    if here:
        target.adapter, target.adapter_source = str(local), str(local)
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


ADAPTER_CACHE = Path(".cache/adapters")  # adapters read out of DVC experiments, one folder per content digest


def experiment_commits(run_id: str) -> list[str]:
    """Commits of the DVC experiments named `run_id`, newest first (one per baseline commit)."""
    import subprocess

    listed = subprocess.run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname) %(objectname)",
                             "refs/exps"], capture_output=True, text=True)
    if listed.returncode != 0:
        return []
    return [commit for ref, commit in (line.split() for line in listed.stdout.splitlines())
            if ref.rsplit("/", 1)[-1] == run_id]


def entry_from_experiment(run_id: str) -> dict | None:
    """The run's registry entry as its DVC experiment recorded it: the publish stage's cached output
    (outputs/<run_id>/publish.json), for a run published in DVC's queue or in another clone
    (`dvc exp pull`). None when no experiment of that name was published."""
    commits = experiment_commits(run_id)
    if not commits:
        return None
    from dvc.api import DVCFileSystem

    record = f"{OUTPUT_ROOT}/{run_id}/publish.json"
    for commit in commits:
        try:
            with DVCFileSystem(".", rev=commit).open(record) as f:
                entry = json.load(f)
        except Exception:  # noqa: BLE001 - not published in that experiment, or not in this clone's cache
            continue
        if isinstance(entry, dict) and entry.get("run_id") == run_id:
            return entry
    return None


def adapter_from_experiment(run_id: str, local: Path, digest: str | None) -> Path | None:
    """The registered adapter out of the run's DVC experiment (its commit names the outputs, DVC's
    cache holds them, `dvc exp pull` brings both from another clone), whatever the working copy holds:
    a rerun that failed, or another run applied since. None when no experiment of that name has it."""
    import shutil

    commits = experiment_commits(run_id)
    if not commits:
        return None
    from dvc.api import DVCFileSystem

    from pipeline.publish import folder_digest

    for commit in commits:
        dest = ADAPTER_CACHE / f"{run_id}-{commit[:12]}"
        if not (dest / "adapter_config.json").is_file():
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            try:
                fs = DVCFileSystem(".", rev=commit)
                if not fs.exists(str(local)):
                    continue
                fs.get(str(local), str(partial), recursive=True)
            except Exception:  # noqa: BLE001 - its outputs are not in this clone's DVC cache: try the next
                continue
            partial.replace(dest)
        if digest is None or folder_digest(dest) == digest:
            return dest
    return None
