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
    metrics = json.loads((clone / "reports" / "eval_metrics.json").read_text())
    assert metrics["base"]["rows"] == metrics["adapter"]["rows"] > 0
    assert 0.0 <= metrics["adapter"]["accuracy"] <= 1.0
    report = json.loads((clone / "reports" / "data_report.json").read_text())
    assert report["train_rows"] + report["eval_rows"] == report["rows_kept"]
    registry = json.loads((clone / "registry.json").read_text())
    assert registry["runs"]["t1"]["adapter_path"] == "outputs/t1/adapter"
    assert "t1" in (clone / "docs" / "model_registry.md").read_text()
    curves = {p.name for p in (clone / "reports" / "train" / "plots" / "metrics").rglob("*.tsv")}
    assert "reward.tsv" in curves and "loss.tsv" in curves, "dvclive wrote no training curves"
    assert not curves & {"step_time.tsv", "train_runtime.tsv"}, "wall-clock values in a DVC-tracked output"
    assert (root / "train_logs" / "plots" / "metrics" / "step_time.tsv").is_file()  # timings: the run's logs
    assert (clone / "docs" / "results_comparison.md").read_text().startswith("# Results: base model vs run `t1`")
    assert (clone / "docs" / "sample_outputs" / "t1.md").is_file()


def test_the_demo_learns(clone, demo_run):
    """GRPO makes the warmed-up tiny model format and answer better. `make bench-demo` shows the
    targets on 3 seeds (last third of the reward ≥ 1.5 × the first, strict format ≥ 0.90, accuracy's
    95% interval above the base model's accuracy); here, on the committed seed, looser bounds, so a
    CPU that rounds differently does not fail it."""
    import csv

    series = clone / "reports" / "train" / "plots" / "metrics" / "reward.tsv"
    with series.open() as f:
        rewards = [float(row["reward"]) for row in csv.DictReader(f, delimiter="\t")]
    third = len(rewards) // 3
    first, last = sum(rewards[:third]) / third, sum(rewards[-third:]) / third
    assert last >= 1.25 * first, (first, last, rewards)
    metrics = json.loads((clone / "reports" / "eval_metrics.json").read_text())
    base, adapter = metrics["base"], metrics["adapter"]
    assert adapter["strict_format"] >= 0.8 and adapter["strict_format"] >= base["strict_format"] + 0.3
    assert adapter["accuracy_ci95"][0] > base["accuracy"], (base, adapter)


def test_mathvista_scores_layout_and_output_files(clone, demo_run):
    """metrics.json breaks accuracy down as MathVista reports it; the output files are what its own
    evaluation/calculate_score.py reads (tests/mathvista_scorer.py restates its rules)."""
    from mathvista_scorer import TARGET_KEYS, normalize, score

    metrics = json.loads((clone / "reports" / "eval_metrics.json").read_text())
    for model in ("base", "adapter"):
        by = metrics[model]["by"]
        assert set(by) <= set(TARGET_KEYS) and {"question_type", "answer_type", "language", "skills"} <= set(by)
        for groups in by.values():
            for stats in groups.values():
                assert stats["accuracy_ci95"][0] <= stats["accuracy"] <= stats["accuracy_ci95"][1]
        output = json.loads((clone / "outputs" / "t1" / "eval" / f"mathvista_output_{model}.json").read_text())
        assert len(output) == metrics[model]["rows"]
        official = score(output)
        assert official["average"]["total"] == metrics[model]["rows"] and set(official) == {"average", *TARGET_KEYS}
        ours = {pid: problem["true_false"] for pid, problem in output.items()}
        theirs = {pid: normalize(p["extraction"], p["choices"], p["question_type"], p["answer_type"], p["precision"])
                  == p["answer"] for pid, p in output.items()}
        disagree = [pid for pid in ours if ours[pid] != theirs[pid]]
        assert len(disagree) <= 0.1 * len(ours), disagree  # same extraction; the rules differ only at the edges


def test_the_restated_mathvista_rules():
    from mathvista_scorer import normalize

    colours = ["red", "green", "blue"]
    assert normalize("B", colours, "multi_choice", "text", None) == "green"
    assert normalize("(C) whatever", colours, "multi_choice", "text", None) == "blue"
    assert normalize("gren", colours, "multi_choice", "text", None) == "green"  # the nearest option
    assert normalize("3.0", None, "free_form", "integer", None) == "3"
    assert normalize("2.345", None, "free_form", "float", 2) == "2.35" and normalize("x", None, "free_form",
                                                                                         "float", 1) is None


def test_each_warning_once_per_stage_and_tables_readable(demo_run):
    """vLLM's CPU worker warns at every torch.set_num_threads call (hundreds per stage unfiltered)."""
    assert 1 <= demo_run.count("doesn't allow to use `torch.set_num_threads`") <= 2  # train and evaluate
    table_rows = [line for line in demo_run.splitlines() if line.startswith("│ │")]
    assert table_rows, "TRL printed no sample-completions table"
    assert min(len(line) for line in table_rows) > 120, "the table wrapped to a terminal's 80 columns"


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


def test_retraining_gives_byte_identical_outputs(clone, demo_run):
    """Two runs of the same train stage hash alike in dvc.lock: no wall-clock value in any output."""

    def train_outs() -> dict[str, str]:
        lock = yaml.safe_load((clone / "dvc.lock").read_text())
        return {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}

    before = train_outs()
    _run(["dvc", "repro", "--force", "--single-item", "train"], clone)
    assert train_outs() == before
    status = _run(["dvc", "status", "--json"], clone)
    assert json.loads(status.stdout) == {}  # evaluate and publish are still up to date


def _revisions(node) -> set[str]:
    """Every `rev` value anywhere in `dvc plots diff --json` output."""
    if isinstance(node, dict):
        found = {node["rev"]} if isinstance(node.get("rev"), str) else set()
        return found.union(*(_revisions(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_revisions(value) for value in node))
    return set()


def test_two_runs_compare_metrics_plots_and_params(clone, demo_run, tmp_path):
    t1_metrics = json.loads((clone / "reports" / "eval_metrics.json").read_text())
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

    metrics = _run(["dvc", "metrics", "diff", "t1", "t2", "--all", "--json"], clone)
    assert "failed to load" not in metrics.stderr
    evaluation = json.loads(metrics.stdout)["reports/eval_metrics.json"]
    for key in ("adapter.accuracy", "adapter.strict_format", "base.accuracy"):
        assert evaluation[key]["old"] == _dig(t1_metrics, key) and evaluation[key]["new"] is not None
    assert "step" in json.loads(metrics.stdout)["reports/train/metrics.json"]  # 24 → 4 steps
    exp_diff = json.loads(_run(["dvc", "exp", "diff", "t1", "t2", "--all", "--json"], clone).stdout)
    assert "train.max_steps" in json.dumps(exp_diff["params"])
    assert "adapter.accuracy" in exp_diff["metrics"]["reports/eval_metrics.json"]
    plots = json.loads(_run(["dvc", "plots", "diff", "t1", "t2", "--json"], clone).stdout)
    reward = {path: data for path, data in plots["data"].items() if path.endswith("/reward.tsv")}
    assert reward and {"t1", "t2"} <= _revisions(reward)

    table = _run([sys.executable, "-m", "pipeline.compare"], clone).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert {"t1", "t2"} <= set(rows) and "!" not in table
    assert f"{t1_metrics['adapter']['accuracy']:.3f}" in rows["t1"] and "train.max_steps=4" in rows["t2"]

    # the working copy shows the last run; any other run's outputs and metrics come back with apply
    _run(["dvc", "exp", "apply", "t1"], clone)
    assert (clone / "outputs" / "t1" / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((clone / "params.yaml").read_text())["run_id"] == "t1"
    assert json.loads((clone / "reports" / "eval_metrics.json").read_text()) == t1_metrics


def _dig(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data
