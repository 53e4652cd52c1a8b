"""The four DVC stages on the embedded default, in a fresh clone, exactly as `make demo` runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.invalid", GIT_COMMITTER_NAME="ci",
               GIT_COMMITTER_EMAIL="ci@example.invalid", PYTHONUNBUFFERED="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory, embedded_root) -> Path:
    path = tmp_path_factory.mktemp("clone") / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(path)], check=True)
    (path / "assets").mkdir()
    (path / "assets" / "embedded").symlink_to(embedded_root)
    return path


def _start(clone: Path, run_id: str, preset: str) -> str:
    result = _run([sys.executable, "-m", "pipeline.experiments", "--run-id", run_id, "--preset", preset], clone)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo_run(clone) -> str:
    return _start(clone, "t1", "demo")


def test_four_stages_write_their_outputs(clone, demo_run):
    root = clone / "outputs" / "t1"
    for stage in ("prepare", "train", "evaluate", "publish"):
        assert f"Running stage '{stage}'" in demo_run
    assert (root / "data" / "train.parquet").is_file() and (root / "data" / "eval.parquet").is_file()
    assert (root / "adapter" / "adapter_config.json").is_file()
    assert (root / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["base"]["rows"] == metrics["adapter"]["rows"] > 0
    assert 0.0 <= metrics["adapter"]["accuracy"] <= 1.0
    report = json.loads((root / "data_report.json").read_text())
    assert report["train_rows"] + report["eval_rows"] == report["rows_kept"]
    registry = json.loads((clone / "registry.json").read_text())
    assert registry["runs"]["t1"]["adapter_path"] == "outputs/t1/adapter"
    assert "t1" in (clone / "docs" / "model_registry.md").read_text()
    plots = list((root / "train_logs" / "plots" / "metrics").rglob("*.tsv"))
    assert plots, "dvclive wrote no training plots"
    assert (clone / "docs" / "results_comparison.md").read_text().startswith("# Results: base model vs run `t1`")
    assert (clone / "docs" / "sample_outputs" / "t1.md").is_file()


def test_the_demo_learns(clone, demo_run):
    """The warmed-up tiny model formats sometimes; GRPO makes it format (and the reward rise)."""
    import csv

    series = next((clone / "outputs" / "t1" / "train_logs" / "plots" / "metrics").rglob("reward.tsv"))
    with series.open() as f:
        rewards = [float(row["reward"]) for row in csv.DictReader(f, delimiter="\t")]
    third = len(rewards) // 3
    assert sum(rewards[-third:]) / third > sum(rewards[:third]) / third
    metrics = json.loads((clone / "outputs" / "t1" / "eval" / "metrics.json").read_text())
    assert metrics["adapter"]["strict_format"] >= metrics["base"]["strict_format"] + 0.3


def test_dvc_status_clean_and_dvc_yaml_untouched(clone, demo_run):
    status = _run(["dvc", "status", "--json"], clone)
    assert json.loads(status.stdout) == {}
    assert subprocess.run(["git", "diff", "--quiet", "--", "dvc.yaml"], cwd=clone).returncode == 0
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "train", "evaluate", "publish"}


def test_second_run_does_no_stage_work(clone, demo_run):
    again = _start(clone, "t1", "demo")
    assert "Running stage" not in again
    assert again.count("didn't change, skipping") == 4


def test_two_run_ids_keep_separate_outputs_and_compare(clone, demo_run, tmp_path):
    fast = tmp_path / "fast.yaml"
    demo = yaml.safe_load((clone / "presets" / "demo.yaml").read_text())
    fast.write_text(yaml.safe_dump({**demo, "train.use_vllm": False, "train.max_steps": 4}))
    _start(clone, "t2", str(fast))
    assert (clone / "outputs" / "t2" / "adapter" / "adapter_config.json").is_file()
    registry = json.loads((clone / "registry.json").read_text())
    assert {"t1", "t2"} <= set(registry["runs"])
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], clone).stdout)
    names = {exp.get("name") for baseline in shown for exp in (baseline.get("experiments") or [])}
    assert {"t1", "t2"} <= names
    diff = _run(["dvc", "exp", "diff", "t1", "t2", "--json"], clone)
    assert "train.max_steps" in diff.stdout
    # the working copy shows the last run; any other run's outputs come back from the DVC cache
    _run(["dvc", "exp", "apply", "t1"], clone)
    assert (clone / "outputs" / "t1" / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((clone / "params.yaml").read_text())["run_id"] == "t1"
