"""What DVC records about a run must be the whole truth about it.

DVC skips a stage when its recorded dependencies and params are unchanged, so anything that changes
a result but is not recorded gives a wrong result with no error. Three rules close the gaps:

- Local inputs (a dataset file or folder, a local base model) are content-hashed dependencies:
  they must live under one of `INPUT_DIRS`, the folders dvc.yaml's stages depend on. DVC hashes
  through a symlinked file but not into a symlinked folder, so a folder link is refused too.
  Hub sources are pinned by their id and revision, which are params.
- The run id names the run's outputs, W&B run and registry entry, so it is the DVC experiment's
  name (`make train RUN_ID=…` sets both; a sweep gives each point its own).
- The training process count decides how many completions one optimizer step sees, so a run
  records it as a param (`train.num_processes`, resolved from `auto` by the runner).

These checks run before a run touches anything (pipeline/experiments.py) and again in the prepare
stage when DVC runs it (a raw `dvc exp run`, DVC's queue), where `DVC_STAGE` is set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.params import EXIT_BAD_PARAMS, Params

# dvc.yaml: prepare, train and evaluate depend on these folders (tests/test_dvc_stages.py checks it)
INPUT_DIRS = (Path("data"), Path("models"), Path("assets/embedded"))


def named_inputs(params: Params) -> list[tuple[str, str]]:
    """(params key, value) of every input that may be a local path: the data sources, the base
    model and the evaluation suite's local copies."""
    named = [("data.source", params.data.source), ("model.name_or_path", params.model.name_or_path)]
    if params.data.eval_source is not None:
        named.append(("data.eval_source.source", params.data.eval_source.source))
    named += [(f"evaluate.suite[{index}].source", entry.source) for index, entry in enumerate(params.evaluate.suite)
              if not isinstance(entry, str) and entry.source is not None]
    return named


def local_inputs(params: Params) -> list[tuple[str, str]]:
    """(params key, path) of every input that is a local path rather than a Hub id."""
    return [(key, value) for key, value in named_inputs(params) if os.path.lexists(value)]


def _symlinked_folder(path: Path) -> Path | None:
    """The first folder at or below `path` that is a symlink (DVC does not hash what is behind it)."""
    if path.is_symlink() and path.is_dir():
        return path
    if not path.is_dir():
        return None
    for folder, dirs, _ in os.walk(path):
        for name in dirs:
            if (Path(folder) / name).is_symlink():
                return Path(folder) / name
    return None


def missing_local_inputs(params: Params) -> list[str]:
    """A source or model named under data/ or models/ that is not there. A path that does not exist
    reads as a Hub id, so it would pass every check and fail only in the prepare stage, after the
    run started: the usual cause is a file copied somewhere else, or a preset's example path."""
    homes = INPUT_DIRS[:2]
    return [f"{key}: {value!r} does not exist: put the file or folder there, or point {key} at where it is "
            f"(local inputs live under {homes[0]}/ or {homes[1]}/: docs/your_own_data.md)"
            for key, value in named_inputs(params) if Path(value).parts[:1] in [home.parts for home in homes]
            and not os.path.lexists(value)]


def uncovered_inputs(params: Params, root: Path) -> list[str]:
    """One message per local input that DVC would not hash, naming the key, the path and the fix."""
    problems = []
    folders = " or ".join(f"{folder}/" for folder in INPUT_DIRS[:2])
    for key, value in local_inputs(params):
        relative = Path(os.path.relpath(os.path.abspath(Path(root, value)), os.path.abspath(root)))
        home = next((folder for folder in INPUT_DIRS if relative.is_relative_to(folder)), None)
        if home is None:
            problems.append(f"{key}: {value!r} is a local path outside {folders}, so DVC cannot hash it and an edit "
                            f"would not rerun the stages: move it (or a copy) under {folders} and point {key} there")
            continue
        between = [Path(root, part) for part in reversed(relative.parents[:-1]) if part != home]
        link = next((part for part in between if part.is_symlink()), None) or _symlinked_folder(Path(root, relative))
        if link is not None:
            problems.append(f"{key}: {link} is a symlinked folder; DVC does not hash what is behind it, so an edit "
                            "would not rerun the stages: copy the folder (file symlinks are fine)")
    return problems


def experiment_name_problem(params: Params, environ: os._Environ | dict = os.environ) -> str | None:
    """Inside a DVC experiment, the experiment's name must be the run id (None when it is)."""
    name = environ.get("DVC_EXP_NAME")
    if not name or name == params.run_id:
        return None
    return (f"this DVC experiment is named {name!r} but run_id is {params.run_id!r}: a run id names the run's "
            "outputs, W&B run and registry entry, so each experiment needs its own. Start runs with "
            f"`make train RUN_ID=<id>`, sweeps with `make sweep`, or raw DVC as `dvc exp run -n <id> -S run_id=<id>`")


def problems(params: Params, root: Path = Path(".")) -> list[str]:
    found = uncovered_inputs(params, root)
    name = experiment_name_problem(params)
    return found + ([name] if name else [])


def check_stage_or_exit(params: Params, stage: str) -> None:
    """Under DVC (DVC_STAGE set), stop a stage whose record would not be the whole truth, exit 2."""
    if not os.environ.get("DVC_STAGE"):
        return
    found = problems(params)
    if found:
        print("\n".join(f"{stage}: error: {problem}" for problem in found), file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS)
