"""Start a run: one DVC experiment named after its run id (what `make demo/train/repro` call).

A run is the committed `params.yaml`, plus a preset's overrides (e.g. presets/demo.yaml), plus the
run id, handed to `dvc exp run -S …`. DVC writes those values into the working copy's params.yaml
(that is how DVC experiments work: the working copy shows the last run) and records them in
dvc.lock and in the experiment, so `dvc exp show` / `dvc metrics diff` compare runs.

Your own uncommitted edits to params.yaml are kept. A params.yaml that merely holds the values of
the previous run (nothing edited since) is reset to the committed one first, so the demo's values
never leak into the next run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.params import (
    EXIT_BAD_PARAMS,
    PARAMS_FILE,
    ParamsError,
    apply_overrides,
    dvc_set_args,
    parse_params,
    read_overrides,
)


def _run(cmd: list[str], check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, text=True, capture_output=capture)


def committed_params() -> str | None:
    result = _run(["git", "show", f"HEAD:{PARAMS_FILE}"], check=False)
    return result.stdout if result.returncode == 0 else None


def params_left_by_last_run() -> bool:
    """True when the working copy's params.yaml is exactly what the last run recorded in dvc.lock."""
    if not Path("dvc.lock").exists():
        return False
    status = _run(["dvc", "status", "--json"], check=False)
    if status.returncode != 0:
        return False
    try:
        report = json.loads(status.stdout or "{}")
    except json.JSONDecodeError:
        return False
    for changes in report.values():
        for change in changes:
            if isinstance(change, dict) and "changed params" in change:
                return False
    return True


def start(run_id: str, preset: str | None, targets: list[str], sets: list[str] | None = None) -> int:
    committed = committed_params()
    if committed is not None and PARAMS_FILE.read_text() != committed and params_left_by_last_run():
        print(f"experiments: {PARAMS_FILE} holds the previous run's values; starting from the committed file")
        PARAMS_FILE.write_text(committed)
    try:
        overrides = read_overrides(preset, [*(sets or []), f"run_id={run_id}"])
        raw = yaml.safe_load(PARAMS_FILE.read_text())
        parse_params(apply_overrides(raw, overrides, preset or "run id"), PARAMS_FILE)
    except ParamsError as error:
        print(f"error: invalid parameters\n{error}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    # an experiment of the same name is replaced; unchanged stages are still skipped (dvc.lock / run cache)
    _run(["dvc", "exp", "remove", run_id], check=False)
    cmd = ["dvc", "exp", "run", "--name", run_id]
    for arg in dvc_set_args(overrides):
        cmd += ["-S", arg]
    print("experiments: " + " ".join(cmd + targets), flush=True)
    return subprocess.run(cmd + targets).returncode


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--preset", help="preset name (presets/<name>.yaml) or path")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override, after the preset's (e.g. train.num_processes=8)")
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    args = parser.parse_args()
    preset = args.preset
    if preset and not preset.endswith((".yaml", ".yml")):
        preset = f"presets/{preset}.yaml"
    raise SystemExit(start(args.run_id, preset, args.targets, args.sets))


if __name__ == "__main__":
    main()
