"""`make compare` shows one run per row: the working copy only when it is one run not shown already."""

from __future__ import annotations

from pipeline.compare import table
from pipeline.params import Reports


def _data(steps: int, accuracy: float | None, lr: float) -> dict:
    metrics = {str(Reports.train): {"data": {"step": steps, "reward": 0.5}}}
    if accuracy is not None:
        metrics[str(Reports.evaluation)] = {"data": {"adapter": {"accuracy": accuracy}}}
    return {"metrics": metrics, "params": {"params.yaml": {"data": {"train": {"learning_rate": lr}}}}}


def _shown(workspace: dict, runs: dict[str, dict]) -> list[dict]:
    return [{"rev": "workspace", "data": workspace},
            {"rev": "abc", "experiments": [{"revs": [{"name": name, "rev": name, "data": data}]}
                                           for name, data in runs.items()]}]


def _names(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[2:]]


def test_the_working_copy_is_a_row_only_when_it_is_one_run_not_shown_already():
    demo = _data(40, 0.19, 3e-3)
    mixed = _data(12, 0.19, 1e-3)  # a train-only run's steps next to the last evaluation's accuracy
    assert _names(table(_shown(mixed, {"demo": demo}), workspace_is_one_run=False)) == ["demo"]
    assert _names(table(_shown(mixed, {"demo": demo}), workspace_is_one_run=True)) == ["workspace", "demo"]
    assert _names(table(_shown(demo, {"demo": demo}), workspace_is_one_run=True)) == ["demo"]  # a repeat
