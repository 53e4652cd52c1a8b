"""Start runs: one DVC experiment per run id (`make demo/train/repro/check/sweep` call this).

A run is the committed `params.yaml`, plus a preset's overrides (e.g. presets/demo.yaml), plus the
run id and the training process count, handed to `dvc exp run -S …`. DVC writes those values into
the working copy's params.yaml (the working copy shows the last run) and records them in dvc.lock
and in the experiment, so `dvc exp show` / `dvc metrics diff` compare runs.

Your own uncommitted edits to params.yaml are kept. A params.yaml that merely holds the values of
the previous run (nothing edited since) is replaced by the committed one first, so the demo's
values never leak into the next run; `make check` validates the same base.

A run is a record users trust, so:
- one run at a time per working copy: a second one is refused before it touches anything, naming
  the run in progress (sweeps run in DVC's queue, each in a workspace of its own);
- a rerun of an existing run id keeps the finished run until the new one succeeds: the old
  experiment is set aside as `<id>.previous` and comes back if the new run fails (FORCE=1 removes
  it first instead);
- every parameter set is validated, and every local input checked (pipeline/lineage.py), before
  anything is written.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import lineage
from pipeline.params import (
    EXIT_BAD_PARAMS,
    PARAMS_FILE,
    Params,
    ParamsError,
    apply_overrides,
    dvc_set_args,
    parse_params,
    parse_value,
    read_overrides,
    run_id_problem,
)

EXIT_BUSY = 3
RUN_LOCK = Path(".dvc/tmp/grpo-run.lock")  # held by the runner for the whole run (fcntl: freed on any exit)
PREVIOUS = ".previous"  # a rerun sets the finished experiment aside under `<id>.previous`
COPY_PATHS = ("data", "models")  # their git-ignored local inputs: copied into a queued experiment's workspace


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


def base_params_text() -> tuple[str, bool]:
    """The params a run starts from, and whether the working copy must be reset to them first."""
    current = PARAMS_FILE.read_text() if PARAMS_FILE.exists() else ""
    committed = committed_params()
    if committed is not None and current != committed and params_left_by_last_run():
        return committed, True
    return current, False


def visible_gpus() -> int:
    import torch  # the CUDA API counts ROCm devices too; no device context is created

    return torch.cuda.device_count()


@dataclass
class Plan:
    """One run as it will start: its overrides over the base params, validated."""

    run_id: str
    overrides: dict
    params: Params
    reset_params: bool
    base_text: str
    presets: list[str]  # the preset files applied, base first (a preset and those it extends)

    @property
    def processes(self) -> int:
        return self.params.train.processes(1)

    def describe(self) -> str:
        train = self.params.train
        per_step = train.completions_per_step(self.processes)
        return (f"{self.processes} training process(es) × {train.per_device_train_batch_size} per device × "
                f"{train.gradient_accumulation_steps} accumulation = {per_step} completions per optimizer step")


def plan(run_id: str | None, preset: str | None, sets: list[str]) -> Plan:
    """Validate everything a run needs before anything is written; ParamsError names the problem."""
    base_text, reset = base_params_text()
    try:
        raw = yaml.safe_load(base_text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{PARAMS_FILE}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{PARAMS_FILE}: file not found or empty (run from the repository root)")
    overrides = read_overrides(preset, sets)
    if run_id:  # as given, not read as YAML: a run id such as `1e3` or `null` stays a string
        overrides.put("run_id", run_id, "--run-id")
    params = parse_params(apply_overrides(raw, overrides, "--set"), PARAMS_FILE, overrides.origins)
    if params.train.num_processes == "auto":
        # the process count decides the completions per optimizer step: a run records it as a param
        overrides.put("train.num_processes", params.train.processes(visible_gpus()), "the visible GPUs")
        params = parse_params(apply_overrides(raw, overrides, "--set"), PARAMS_FILE, overrides.origins)
    problems = lineage.missing_local_inputs(params) + lineage.uncovered_inputs(params, Path("."))
    if problems:
        raise ParamsError("\n".join(problems))
    return Plan(params.run_id, overrides, params, reset, base_text, overrides.files)


class RunLock:
    """One run per working copy. The lock file names the holder, so a refusal can say who it is."""

    def __init__(self, path: Path = RUN_LOCK):
        self.path = path
        self.handle = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return "another run"
        started = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
        return f"run {info.get('run_id')!r} (pid {info.get('pid')}, started {started})"

    def acquire(self, run_id: str) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"run_id": run_id, "pid": os.getpid(), "started": time.time()}))
        handle.flush()
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def experiment_names() -> set[str]:
    """The experiments of the current commit (DVC's experiment names are per baseline commit)."""
    listed = _run(["dvc", "exp", "list", "--name-only"], check=False)
    return set(listed.stdout.split()) if listed.returncode == 0 else set()


def _rename(old: str, new: str) -> None:
    _run(["dvc", "exp", "rename", old, new])


def set_aside_previous(run_id: str, force: bool) -> str | None:
    """Make room for a rerun: remove (force) or set aside the finished experiment; return its new name."""
    names = experiment_names()
    previous = run_id + PREVIOUS
    if previous in names and run_id not in names:  # a runner was killed mid-run: the finished run comes back
        print(f"experiments: restoring the finished run {run_id!r} set aside by an interrupted rerun")
        _rename(previous, run_id)
        names = experiment_names()
    if run_id not in names:
        return None
    if force:
        print(f"experiments: FORCE: removing the finished experiment {run_id!r} before the rerun")
        _run(["dvc", "exp", "remove", run_id])
        return None
    if previous in names:
        _run(["dvc", "exp", "remove", previous])
    _rename(run_id, previous)
    return previous


# `dvc exp run` checks the outputs out before it reproduces, and each output dvc.lock has no hash for
# (every output of a new run id: they are named outputs/<run_id>/…) gets a warning, "No file hash
# info found for '…'. It won't be created.": on every run, about outputs the stages then create.
# DVC has no option for it, and piping its output through a filter would cost the stages their
# terminal (progress bars, colour). So DVC runs in-process with a filter on exactly that record of
# the two loggers that emit it; every other message, warnings and errors included, is untouched.
_DVC_QUIET_CHECKOUT = """
import logging, sys
class NoHashWarning(logging.Filter):
    def filter(self, record):
        return not (record.levelno == logging.WARNING and str(record.msg).startswith("No file hash info found for "))
for name in ("dvc_data.index.checkout", "dvc_data.hashfile.checkout"):
    logging.getLogger(name).addFilter(NoHashWarning())
from dvc.cli import main
sys.exit(main(sys.argv[1:]))
"""


def dvc_without_checkout_noise(dvc_args: list[str]) -> list[str]:
    """The command line of `dvc <dvc_args>` without the checkout warning above."""
    return [sys.executable, "-c", _DVC_QUIET_CHECKOUT, *dvc_args]


def start(run_id: str, preset: str | None, targets: list[str], sets: list[str] | None = None,
          force: bool = False) -> int:
    lock = RunLock()
    if not lock.acquire(run_id):
        print(f"error: {lock.holder()} is in progress in this working copy; run {run_id!r} was not started and "
              "nothing was changed. Wait for it, or run several at once in DVC's queue (make sweep, docs/runs.md)",
              file=sys.stderr)
        return EXIT_BUSY
    try:
        try:
            run = plan(run_id, preset, sets or [])
        except ParamsError as error:
            print(f"error: invalid parameters\n{error}", file=sys.stderr)
            return EXIT_BAD_PARAMS
        if run.reset_params:
            print(f"experiments: {PARAMS_FILE} holds the previous run's values; starting from the committed file")
            PARAMS_FILE.write_text(run.base_text)
        previous = set_aside_previous(run_id, force)
        cmd = ["dvc", "exp", "run", "--name", run_id]
        for arg in dvc_set_args(run.overrides):
            cmd += ["-S", arg]
        print(f"experiments: {run.describe()}")
        print("experiments: " + " ".join(cmd + targets), flush=True)
        returncode = subprocess.run(dvc_without_checkout_noise(cmd[1:] + targets)).returncode
        if previous:
            if returncode == 0:
                _run(["dvc", "exp", "remove", previous])
            else:
                _rename(previous, run_id)
                print(f"experiments: run {run_id!r} failed; the finished run {run_id!r} is kept "
                      f"(dvc exp apply {run_id} brings its outputs back)", file=sys.stderr)
        return returncode
    finally:
        lock.release()


def check(run_id: str | None, preset: str | None, sets: list[str]) -> int:
    """`make check`: validate exactly what `make train` with the same arguments would run."""
    try:
        run = plan(run_id, preset, sets)
    except ParamsError as error:
        print(f"error: invalid parameters\n{error}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    base = "the committed params.yaml" if run.reset_params else str(PARAMS_FILE)
    print(f"ok: run_id={run.run_id}, model={run.params.model.name_or_path}, data={run.params.data.source} "
          f"({' + '.join([base, *run.presets])}); {run.describe()}", file=sys.stderr)
    return 0


def grid(specs: list[str]) -> list[dict[str, object]]:
    """`key=a,b` specs → every combination, as override dicts (DVC's sweep syntax, a cartesian product)."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise ParamsError(f"--grid {spec!r}: expected key=value1,value2,...")
        axes.append([(key, parse_value(value)) for value in values.split(",")])
    return [dict(point) for point in itertools.product(*axes)]


def local_inputs_to_copy() -> list[Path]:
    """What git leaves out of data/ and models/ (DVC-tracked entries come from DVC's cache instead)."""
    kept_by_git = {"README.md", ".gitignore"}
    return [entry for folder in COPY_PATHS if Path(folder).is_dir() for entry in sorted(Path(folder).iterdir())
            if entry.name not in kept_by_git and entry.suffix != ".dvc"
            and not entry.with_name(entry.name + ".dvc").exists()]


def _queue_states(names: set[str]) -> dict[str, str]:
    shown = _run(["dvc", "queue", "status"], check=False).stdout
    states = {}
    for line in shown.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in names:
            states[fields[1]] = fields[-1]
    return states


def sweep(prefix: str, preset: str | None, specs: list[str], sets: list[str], jobs: int,
          targets: list[str] | None = None) -> int:
    """Queue one experiment per grid point, each with its own run id `<prefix>-<n>`, run them in DVC's
    queue (each in a temporary workspace of its own) and wait for all of them."""
    try:
        points = grid(specs)
        runs = [(f"{prefix}-{n}", point) for n, point in enumerate(points, 1)]
        plans = [plan(run_id, preset, [*sets, *(f"{k}={json.dumps(v)}" for k, v in point.items())])
                 for run_id, point in runs]
    except ParamsError as error:
        print(f"error: invalid parameters\n{error}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    taken = experiment_names() & {run_id for run_id, _ in runs}
    if taken:
        print(f"error: run id(s) {', '.join(sorted(taken))} already exist; choose another prefix or remove them "
              f"(dvc exp remove {' '.join(sorted(taken))})", file=sys.stderr)
        return EXIT_BAD_PARAMS
    copy = [arg for entry in local_inputs_to_copy() for arg in ("-C", str(entry))]
    for (run_id, point), run in zip(runs, plans, strict=True):
        cmd = ["dvc", "exp", "run", "--queue", "--name", run_id, *copy]
        for arg in dvc_set_args(run.overrides):
            cmd += ["-S", arg]
        _run(cmd + (targets or []))
        print(f"sweep: queued {run_id}: " + ", ".join(f"{k}={v}" for k, v in point.items()))
    _run(["dvc", "queue", "start", "-j", str(jobs)])
    names = {run_id for run_id, _ in runs}
    states = _queue_states(names)
    while any(state in ("Queued", "Running") for state in states.values()) or len(states) < len(names):
        time.sleep(5)
        states = _queue_states(names)
    failed = sorted(name for name, state in states.items() if state != "Success")
    for name in failed:
        print(f"sweep: {name} ended {states[name]}: dvc queue logs {name}", file=sys.stderr)
    print(f"sweep: {len(names) - len(failed)} of {len(names)} runs succeeded; make compare shows them")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", help="the run's id (a sweep: the prefix of its runs' ids)")
    parser.add_argument("--preset", help="preset name (presets/<name>.yaml) or path; a preset may `extends:` another")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="one more override, after the preset's (e.g. train.num_processes=8)")
    parser.add_argument("--force", action="store_true", help="remove a finished run of the same id first")
    parser.add_argument("--check", action="store_true", help="validate only (make check)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep: one experiment per combination, run in DVC's queue (make sweep)")
    parser.add_argument("--jobs", type=int, default=1, help="sweep: experiments run at once")
    parser.add_argument("targets", nargs="*", help="stages to reproduce (default: all)")
    args = parser.parse_args(argv)
    # first: an id with a space or a shell character otherwise fails later as something unrelated
    problem = run_id_problem(args.run_id) if args.run_id is not None else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS)
    if args.check:
        raise SystemExit(check(args.run_id, args.preset, args.sets))
    if not args.run_id:
        parser.error("--run-id is required")
    if args.grid:
        raise SystemExit(sweep(args.run_id, args.preset, args.grid, args.sets, args.jobs, args.targets))
    raise SystemExit(start(args.run_id, args.preset, args.targets, args.sets, args.force))


if __name__ == "__main__":
    main()
