"""The four DVC stages on the embedded default, in a fresh clone, exactly as `make demo` runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import clone_repo, git_env

# one pytest-xdist worker, with test_readme_commands.py when a session runs both (it restores this
# module's demo from the shared DVC cache); README's sweep there, two colocated vLLM train stages at
# once in DVC's queue, is what covers the per-run port (make test-docs, not make test)
pytestmark = pytest.mark.xdist_group("clone")

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return git_env()


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def clone(tmp_path_factory, shared_dvc_cache, embedded_root) -> Path:
    """A fresh clone whose `embedded` stage is recorded as done with the session's build (the same
    code built it: its BUILD.json names the source digest), so the clone's runs skip its warm-up
    training. The README test (tests/test_readme_commands.py) builds it through DVC from nothing."""
    import shutil

    clone = clone_repo(tmp_path_factory.mktemp("clone") / "repo", shared_dvc_cache)
    shutil.copytree(embedded_root, clone / "assets" / "embedded")
    subprocess.run(["dvc", "commit", "--force", "embedded"], cwd=clone, env=_env(), check=True, capture_output=True)
    return clone


def _experiments(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.experiments", *args], cwd=clone, env=_env(),
                          capture_output=True, text=True, timeout=900)


def make_demo(clone: Path) -> str:
    """`make demo` as README says it: the run `demo` on the embedded default."""
    result = _run(["make", "demo"], clone)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def demo_run(clone) -> str:
    return make_demo(clone)


def test_four_stages_write_their_outputs(clone, demo_run):
    root = clone / "outputs" / "demo"
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
    registry = json.loads((clone / "outputs" / "registry.json").read_text())
    assert registry["runs"]["demo"]["adapter_path"] == "outputs/demo/adapter"
    assert "| demo |" in (clone / "outputs" / "model_registry.md").read_text()
    curves = {p.name for p in (clone / "reports" / "train" / "plots" / "metrics").rglob("*.tsv")}
    assert "reward.tsv" in curves and "loss.tsv" in curves, "dvclive wrote no training curves"
    assert not curves & {"step_time.tsv", "train_runtime.tsv"}, "wall-clock values in a DVC-tracked output"
    assert (root / "train_logs" / "plots" / "metrics" / "step_time.tsv").is_file()  # timings: the run's logs
    assert (clone / "reports" / "results.md").read_text().startswith("# Results: base model vs run `demo`")
    assert (clone / "reports" / "sample_outputs.md").is_file()
    # a run documents itself in what DVC experiments record, and leaves every committed file as it was
    changed = _run(["git", "status", "--porcelain"], clone).stdout.splitlines()
    assert all(line[3:].startswith(("params.yaml", "dvc.lock", "reports/")) for line in changed), changed


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
        output = json.loads((clone / "outputs" / "demo" / "eval" / f"mathvista_output_{model}.json").read_text())
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
    assert set(lock["stages"]) == {"embedded", "prepare", "train", "evaluate", "publish"}


def test_second_run_does_no_stage_work(clone, demo_run):
    again = make_demo(clone)
    assert "Running stage" not in again
    assert again.count("didn't change, skipping") == 5  # embedded and the four stages


def _exp_file(clone: Path, name: str, path: str) -> str:
    """A file as experiment `name` committed it (DVC experiments are git commits under refs/exps)."""
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], clone).stdout.split()
    ref = next(ref for ref in refs if ref.rsplit("/", 1)[-1] == name)
    return _run(["git", "show", f"{ref}:{path}"], clone).stdout


def _experiment_names(clone: Path) -> set[str]:
    return set(_run(["dvc", "exp", "list", "--name-only"], clone).stdout.split())


def _lock_holder(clone: Path) -> str | None:
    try:
        return json.loads((clone / ".dvc" / "tmp" / "grpo-run.lock").read_text() or "{}").get("run_id")
    except (OSError, json.JSONDecodeError):
        return None


@pytest.fixture(scope="module")
def fast_preset(clone, tmp_path_factory) -> Path:
    """The demo's settings in 4 steps with transformers rollouts: a short second run."""
    path = tmp_path_factory.mktemp("presets") / "fast.yaml"
    demo = yaml.safe_load((clone / "presets" / "demo.yaml").read_text())
    path.write_text(yaml.safe_dump({**demo, "train.use_vllm": False, "train.max_steps": 4}))
    return path


@pytest.fixture(scope="module")
def concurrent_runs(clone, demo_run, fast_preset):
    """Run t2; while it runs, start t3 in the same working copy."""
    import time

    first = subprocess.Popen([sys.executable, "-m", "pipeline.experiments", "--run-id", "t2", "--preset",
                              str(fast_preset)], cwd=clone, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while _lock_holder(clone) != "t2" and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    second = _experiments(clone, "--run-id", "t3", "--preset", "demo")
    params_after_refusal = yaml.safe_load((clone / "params.yaml").read_text())
    output, _ = first.communicate(timeout=900)
    assert first.returncode == 0, output[-5000:]
    return {"second": second, "run_id_after_refusal": params_after_refusal["run_id"]}


def test_a_second_run_is_refused_while_one_runs_and_the_first_is_unharmed(clone, concurrent_runs):
    second = concurrent_runs["second"]
    assert second.returncode == 3, second.stdout + second.stderr
    assert "run 't2'" in second.stderr and "nothing was changed" in second.stderr
    assert concurrent_runs["run_id_after_refusal"] != "t3"
    assert not (clone / "outputs" / "t3").exists() and "t3" not in _experiment_names(clone)
    assert (clone / "outputs" / "t2" / "adapter" / "adapter_model.safetensors").is_file()

    # t2's adapter is byte-identical to the same train stage run alone (no wall-clock value in any output)
    def train_outs() -> dict[str, str]:
        lock = yaml.safe_load((clone / "dvc.lock").read_text())
        return {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}

    before = train_outs()
    _run(["dvc", "repro", "--force", "--single-item", "train"], clone)
    assert train_outs() == before
    assert json.loads(_run(["dvc", "status", "--json"], clone).stdout) == {}  # evaluate and publish still up to date


def _revisions(node) -> set[str]:
    """Every `rev` value anywhere in `dvc plots diff --json` output."""
    if isinstance(node, dict):
        found = {node["rev"]} if isinstance(node.get("rev"), str) else set()
        return found.union(*(_revisions(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_revisions(value) for value in node))
    return set()


def test_two_runs_compare_metrics_plots_and_params(clone, demo_run, concurrent_runs):
    demo_metrics = json.loads(_exp_file(clone, "demo", "reports/eval_metrics.json"))
    assert (clone / "outputs" / "t2" / "adapter" / "adapter_config.json").is_file()
    registry = json.loads((clone / "outputs" / "registry.json").read_text())
    assert {"demo", "t2"} <= set(registry["runs"])
    assert {"demo", "t2"} <= _experiment_names(clone)

    metrics = _run(["dvc", "metrics", "diff", "demo", "t2", "--all", "--json"], clone)
    assert "failed to load" not in metrics.stderr
    evaluation = json.loads(metrics.stdout)["reports/eval_metrics.json"]
    for key in ("adapter.accuracy", "adapter.strict_format", "base.accuracy"):
        assert evaluation[key]["old"] == _dig(demo_metrics, key) and evaluation[key]["new"] is not None
    assert "step" in json.loads(metrics.stdout)["reports/train/metrics.json"]  # 40 → 4 steps
    exp_diff = json.loads(_run(["dvc", "exp", "diff", "demo", "t2", "--all", "--json"], clone).stdout)
    assert "train.max_steps" in json.dumps(exp_diff["params"])
    assert "adapter.accuracy" in exp_diff["metrics"]["reports/eval_metrics.json"]
    plots = json.loads(_run(["dvc", "plots", "diff", "demo", "t2", "--json"], clone).stdout)
    reward = {path: data for path, data in plots["data"].items() if path.endswith("/reward.tsv")}
    assert reward and {"demo", "t2"} <= _revisions(reward)

    table = _run([sys.executable, "-m", "pipeline.compare"], clone).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert {"demo", "t2"} <= set(rows) and "!" not in table
    assert "workspace" not in rows  # the working copy is t2, which its own row shows
    assert f"{demo_metrics['adapter']['accuracy']:.3f}" in rows["demo"] and "train.max_steps=4" in rows["t2"]
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["num_processes"] == 1  # `auto`, resolved

    # the working copy shows the last run; any other run's outputs and metrics come back with apply
    _run(["dvc", "exp", "apply", "demo"], clone)
    assert (clone / "outputs" / "demo" / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((clone / "params.yaml").read_text())["run_id"] == "demo"
    assert json.loads((clone / "reports" / "eval_metrics.json").read_text()) == demo_metrics


def _infer(clone: Path, run_id: str, tmp_path: Path) -> subprocess.CompletedProcess:
    from pipeline import synthetic

    image = tmp_path / "square.png"
    synthetic.make_rows(1, seed=5)[0]["decoded_image"].save(image)
    return subprocess.run([sys.executable, "-m", "pipeline.infer", "--run_id", run_id, "--image_path", str(image),
                           "--prompt", "How many squares are in the image?", "--max_new_tokens", "8"],
                          cwd=clone, env=_env(), capture_output=True, text=True, timeout=600)


def test_a_failed_rerun_keeps_the_finished_run(clone, concurrent_runs, fast_preset, tmp_path):
    adapter_md5 = yaml.safe_load(_exp_file(clone, "t2", "dvc.lock"))["stages"]["train"]["outs"][0]["md5"]
    failed = _experiments(clone, "--run-id", "t2", "--preset", str(fast_preset),
                          "--set", "data.columns.question=questio")
    assert failed.returncode != 0 and "questio" in failed.stdout + failed.stderr
    assert "the finished run 't2' is kept" in failed.stderr
    assert {"demo", "t2"} <= _experiment_names(clone) and "t2.previous" not in _experiment_names(clone)
    assert yaml.safe_load(_exp_file(clone, "t2", "dvc.lock"))["stages"]["train"]["outs"][0]["md5"] == adapter_md5
    rows = [line.split()[0] for line in _run([sys.executable, "-m", "pipeline.compare"], clone).stdout.splitlines()]
    assert "t2" in rows

    # infer answers from t2's registry entry and adapter out of its experiment, whatever the working copy
    # holds (here demo, applied by the test before)
    import shutil

    shutil.rmtree(clone / "outputs" / "t2", ignore_errors=True)
    answered = _infer(clone, "t2", tmp_path)
    assert answered.returncode == 0 and "[t2]" in answered.stdout and "response:" in answered.stdout, (
        answered.stdout[-2000:] + answered.stderr[-3000:])
    _run(["dvc", "exp", "apply", "t2"], clone)
    assert (clone / "outputs" / "t2" / "adapter" / "adapter_config.json").is_file()


def test_local_data_is_content_hashed(clone, fast_preset):
    """A dataset under data/ is a dependency of prepare: one edit reruns it; a path elsewhere is refused."""
    import pyarrow.parquet as pq

    table = pq.read_table(next((clone / "assets" / "embedded" / "synthetic-mathvista").rglob("*.parquet")))
    pq.write_table(table, clone / "data" / "mine.parquet")
    pq.write_table(table, clone.parent / "outside.parquet")

    def prepare(source: str) -> subprocess.CompletedProcess:
        return _experiments(clone, "--run-id", "mine", "--preset", str(fast_preset), "--set",
                            f"data.source={source}", "prepare")

    params_before = (clone / "params.yaml").read_text()
    outside = prepare(str(clone.parent / "outside.parquet"))
    assert outside.returncode == 2 and "data.source" in outside.stderr and "outside data/" in outside.stderr
    assert (clone / "params.yaml").read_text() == params_before

    def rows_in() -> int:
        return json.loads((clone / "reports" / "data_report.json").read_text())["rows_in"]

    first = prepare("data/mine.parquet")
    assert first.returncode == 0 and "Running stage 'prepare'" in first.stdout, first.stdout[-3000:] + first.stderr
    assert rows_in() == table.num_rows
    assert "Running stage 'prepare'" not in prepare("data/mine.parquet").stdout
    pq.write_table(table.slice(0, table.num_rows - 4), clone / "data" / "mine.parquet")
    edited = prepare("data/mine.parquet")
    assert edited.returncode == 0 and "Running stage 'prepare'" in edited.stdout
    assert rows_in() == table.num_rows - 4

    # a raw DVC experiment whose name is not the run id is stopped before prepare writes anything
    raw = subprocess.run(["dvc", "exp", "run", "-n", "other", "-S", "data.max_rows=100", "prepare"], cwd=clone,
                         env=_env(), capture_output=True, text=True)
    assert raw.returncode != 0 and "named 'other' but run_id is 'mine'" in raw.stdout + raw.stderr


def test_a_run_shared_through_a_dvc_remote_answers_in_another_clone(clone, demo_run, tmp_path):
    """The DVC user's way to share runs: git for the experiment, a DVC remote for its data."""
    store, remote = tmp_path / "dvc-store", tmp_path / "remote.git"
    _run(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    _run(["git", "remote", "add", "shared", str(remote)], clone)
    _run(["git", "push", "-q", "shared", "HEAD:refs/heads/main"], clone)
    _run(["dvc", "remote", "add", "--local", "-d", "store", str(store)], clone)
    _run(["dvc", "exp", "push", "shared", "demo"], clone)

    other = tmp_path / "other"
    _run(["git", "clone", "-q", "-b", "main", str(remote), str(other)], tmp_path)
    _run(["dvc", "remote", "add", "--local", "-d", "store", str(store)], other)
    _run(["dvc", "exp", "pull", "origin", "demo"], other)
    _run(["dvc", "exp", "apply", "demo"], other)
    assert json.loads(_run(["dvc", "status", "--json"], other).stdout) == {}  # nothing to rerun
    answered = _infer(other, "demo", tmp_path)
    assert answered.returncode == 0 and "[demo]" in answered.stdout, answered.stdout[-2000:] + answered.stderr[-3000:]


def test_check_validates_what_train_would_run(clone, demo_run):
    """After a demo run the working copy holds the demo's values; a preset is checked on the committed base."""
    checked = _experiments(clone, "--check", "--preset", "gpu-fast", "--run-id", "v9")
    assert checked.returncode == 0, checked.stderr
    assert "model=Qwen/Qwen2.5-VL-7B-Instruct" in checked.stderr and "gpu-fast" in checked.stderr
    unknown = _experiments(clone, "--check", "--preset", "nope")
    assert unknown.returncode == 2 and "presets: demo" in unknown.stderr


def _dig(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data
