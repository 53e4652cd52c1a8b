"""`make compare`: every run's headline metrics side by side, one row per DVC experiment.

`dvc exp show` prints every metric and parameter of every experiment, several screens wide, and
marks with `!` a commit that holds no metrics (the baseline before any run was committed). This
reads the same data (`dvc exp show --json`) and prints what a person compares first: training
steps and last reward, base and adapter accuracy, their difference, the adapter's strict format,
and the parameters that differ between the runs shown. `dvc metrics diff A B` and
`dvc plots diff A B` give the full picture of two runs. Each row is one run: the working copy
appears only when it is one run that no experiment row already shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from pipeline.params import Reports

COLUMNS = (  # header, metrics file, dotted key
    ("steps", Reports.train, "step"),
    ("last reward", Reports.train, "reward"),
    ("base acc", Reports.evaluation, "base.accuracy"),
    ("adapter acc", Reports.evaluation, "adapter.accuracy"),
    ("Δ acc", Reports.evaluation, "delta.accuracy"),
    ("adapter strict format", Reports.evaluation, "adapter.strict_format"),
)


def experiments(shown: list[dict]) -> Iterator[tuple[str, dict]]:
    """(name, data) for the workspace and every experiment, newest first, from `dvc exp show --json`."""
    for baseline in shown:
        if baseline.get("rev") == "workspace":
            yield "workspace", baseline.get("data") or {}
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                yield rev.get("name") or rev["rev"][:7], rev.get("data") or {}


def _dig(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def metric(data: dict, path, dotted: str) -> Any:
    found = (data.get("metrics") or {}).get(str(path)) or {}
    return _dig(found.get("data"), dotted)


def flat_params(data: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            out[prefix] = value

    walk("", ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    return out


def suite_columns(runs: list[dict]) -> list[tuple[str, Any, str]]:
    """The adapter's accuracy on each `evaluate.suite` benchmark any of the runs scored."""
    names = sorted({name for data in runs for name in (metric(data, Reports.evaluation, "suite") or {})})
    return [(f"{name} acc", Reports.evaluation, f"suite.{name}.adapter.accuracy") for name in names]


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:+.3f}" if value < 0 else f"{value:.3f}"
    return str(value)


def _row_values(data: dict) -> tuple:
    return (tuple(metric(data, path, key) for _, path, key in COLUMNS), json.dumps(flat_params(data), sort_keys=True))


def table(shown: list[dict], workspace_is_one_run: bool = True) -> str:
    """One row per run. The working copy is a run only when every stage is up to date (after a
    train-only run its metrics files come from two runs); it is left out then, and when it repeats
    an experiment's row."""
    runs = [(name, data) for name, data in experiments(shown)
            if any(metric(data, path, key) is not None for _, path, key in COLUMNS)]
    recorded = {_row_values(data) for name, data in runs if name != "workspace"}
    runs = [(name, data) for name, data in runs if name != "workspace"
            or (workspace_is_one_run and _row_values(data) not in recorded)]
    if not runs:
        return "no run has metrics yet: start one with `make demo` or `make repro RUN_ID=…`"
    params = [flat_params(data) for _, data in runs]
    varying = sorted(key for key in set().union(*params) if key != "run_id"
                     and len({json.dumps(p.get(key), sort_keys=True) for p in params}) > 1)
    columns = (*COLUMNS, *suite_columns([data for _, data in runs]))
    header = ["run", *(title for title, _, _ in columns), "params that differ"]
    body = [[name, *(_cell(metric(data, path, key)) for _, path, key in columns),
             ", ".join(f"{key}={_cell(p.get(key))}" for key in varying) or "—"]
            for (name, data), p in zip(runs, params, strict=True)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> None:
    result = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"compare: error: dvc exp show failed:\n{result.stderr.strip()}", file=sys.stderr)
        raise SystemExit(result.returncode)
    status = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True)
    up_to_date = status.returncode == 0 and json.loads(status.stdout or "{}") == {}
    print(table(json.loads(result.stdout or "[]"), workspace_is_one_run=up_to_date))


if __name__ == "__main__":
    main()
