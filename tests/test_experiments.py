"""The runner's arguments: errors that name the real mistake, presets by name or path, presets that
extend others, and DVC's checkout noise kept off the console."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import shipped_params_text

from pipeline import experiments
from pipeline.params import EXIT_BAD_PARAMS, read_overrides

REPO = Path(__file__).resolve().parents[1]
RUN_ID_RULE = "must be 1-64 characters of letters, digits, '.', '_' or '-'"
PRESET_LIST = "(presets: demo, gpu-fast, "


def _project(root: Path) -> Path:
    """A project folder as a newcomer has it: the committed params.yaml and the shipped presets."""
    (root / "params.yaml").write_text(shipped_params_text())
    shutil.copytree(REPO / "presets", root / "presets")
    return root


def _misspell(root: Path, key: str, wrong: str) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"][wrong] = params["train"].pop(key)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _runner(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline.experiments", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


# (case, files written over the project as {path: text}, runner arguments, a fragment of the message)
MISTAKES = [
    ("run id with a space, train", {}, ["--run-id", "my run", "train"], f"error: run id 'my run': {RUN_ID_RULE}"),
    ("run id with a space, check", {}, ["--check", "--run-id", "my run"], f"error: run id 'my run': {RUN_ID_RULE}"),
    ("run id with a shell character", {}, ["--check", "--preset", "demo", "--run-id", "v1;rm"],
     f"error: run id 'v1;rm': {RUN_ID_RULE}"),
    ("misspelt key in params.yaml", {"misspell": ""}, ["--check"],
     "params.yaml: train.learnin_rate: unknown key (did you mean train.learning_rate?)"),
    # demo sets train.learning_rate: the preset is right, params.yaml is not
    ("misspelt key in params.yaml, with a preset", {"misspell": ""}, ["--check", "--preset", "demo"],
     "params.yaml: train.learnin_rate: unknown key (did you mean train.learning_rate?)"),
    ("misspelt key in a preset", {"presets/mine.yaml": "extends: demo\ntrain.max_stepz: 3\n"},
     ["--check", "--preset", "mine"],
     "presets/mine.yaml: train.max_stepz: unknown key (did you mean train.max_steps?)"),
    ("misspelt key in the preset extended", {"presets/base.yaml": "extends: demo\ndata.columns.questoin: q\n",
                                             "presets/mine.yaml": "extends: base\ntrain.max_steps: 3\n"},
     ["--check", "--preset", "mine"],
     "presets/base.yaml: data.columns.questoin: unknown key (did you mean data.columns.question?)"),
    ("misspelt --set key, with a preset", {}, ["--check", "--preset", "demo", "--set", "train.learnin_rate=0.1"],
     "--set: train.learnin_rate: unknown key (did you mean train.learning_rate?)"),
    ("bad --set value, with a preset", {}, ["--check", "--preset", "demo", "--set", "train.max_steps=many"],
     "--set: train.max_steps: Input should be a valid integer (got 'many')"),
    ("GRPOConfig-like key that is none", {}, ["--check", "--set", "train.top_kk=5"],
     "--set: train.top_kk: unknown key (did you mean train.top_k?)"),
    ("unknown preset name", {}, ["--check", "--preset", "mydata"],
     f"preset 'mydata': no file mydata and no presets/mydata.yaml {PRESET_LIST}"),
    ("unknown preset path", {}, ["--check", "--preset", "presets/mydata.yaml"],
     f"preset 'presets/mydata.yaml': no file presets/mydata.yaml {PRESET_LIST}"),
    ("path outside presets/ not swapped for presets/<name>", {}, ["--check", "--preset", "elsewhere/demo.yaml"],
     f"preset 'elsewhere/demo.yaml': no file elsewhere/demo.yaml {PRESET_LIST}"),
    ("extends an unknown preset", {"presets/mine.yaml": "extends: demoo\n"}, ["--check", "--preset", "mine"],
     f"presets/mine.yaml: extends: preset 'demoo': no file demoo and no presets/demoo.yaml {PRESET_LIST}"),
    ("extends in a circle", {"presets/a.yaml": "extends: b\n", "presets/b.yaml": "extends: presets/a.yaml\n"},
     ["--check", "--preset", "a"],
     "presets/a.yaml: extends goes round in a circle: presets/a.yaml → presets/b.yaml → presets/a.yaml"),
    ("local data file not where the preset says", {}, ["--check", "--preset", "own-data-example"],
     "data.source: 'data/my-vqa/questions.jsonl' does not exist"),
]


@pytest.mark.parametrize(("files", "args", "message"), [case[1:] for case in MISTAKES],
                         ids=[case[0] for case in MISTAKES])
def test_each_mistake_gets_one_message_that_names_it(tmp_path, files, args, message):
    root = _project(tmp_path)
    for name, text in files.items():
        if name == "misspell":
            _misspell(root, "learning_rate", "learnin_rate")
        else:
            (root / name).write_text(text)
    result = _runner(root, *args)
    assert result.returncode == EXIT_BAD_PARAMS, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "missing" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(path.name for path in root.iterdir()) == ["params.yaml", "presets"]  # nothing written


@pytest.mark.parametrize("preset", ["demo", "demo.yaml", "presets/demo.yaml", "./presets/demo.yaml",
                                    "elsewhere/x.yaml", "./elsewhere/x.yaml"])
def test_a_preset_is_a_name_or_a_path(tmp_path, monkeypatch, preset):
    monkeypatch.chdir(_project(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.yaml").write_text("extends: demo\n")
    overrides = read_overrides(preset, [])
    assert overrides == read_overrides(REPO / "presets" / "demo.yaml", [])
    assert overrides.files[0] == "presets/demo.yaml"


def test_a_preset_extending_demo_needs_only_its_data_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(_project(tmp_path))
    mine = {"data.source": "data/mine.jsonl", "data.columns.question": "text", "data.columns.image": "picture"}
    (tmp_path / "presets" / "mine.yaml").write_text("extends: demo\n" + yaml.safe_dump(mine))
    demo = yaml.safe_load((REPO / "presets" / "demo.yaml").read_text())
    overrides = read_overrides("mine", ["train.max_steps=5"])
    assert overrides == {**demo, **mine, "train.max_steps": 5}
    assert overrides.files == ["presets/demo.yaml", "presets/mine.yaml"]
    assert overrides.origins["model.name_or_path"] == "presets/demo.yaml"
    assert overrides.origins["data.source"] == "presets/mine.yaml"
    assert overrides.origins["train.max_steps"] == "--set"


def test_the_own_data_example_checks_with_its_file_in_place(tmp_path, monkeypatch, capsys):
    """presets/own-data-example.yaml, the preset docs/your_own_data.md starts from, is what `make check
    PRESET=own-data-example` accepts once its data file is under data/ (git-ignored, so made here)."""
    monkeypatch.chdir(_project(tmp_path))
    source = yaml.safe_load((REPO / "presets" / "own-data-example.yaml").read_text())["data.source"]
    Path(source).parent.mkdir(parents=True)
    Path(source).write_text('{"qid": "q1", "text": "How many?", "picture": "images/q1.png", "label": "4"}\n')
    assert experiments.check("mine", "own-data-example", []) == 0
    checked = capsys.readouterr().err
    assert f"data={source}" in checked and "model=assets/embedded/tiny-qwen2_5_vl" in checked, checked
    assert "params.yaml + presets/demo.yaml + presets/own-data-example.yaml" in checked, checked
    run = experiments.plan("mine", "own-data-example", [])
    assert run.params.data.columns.question == "text" and run.params.data.columns.choices == "options"
    assert run.params.model.max_model_len == 1024  # demo's, not repeated in the example


def test_runs_do_not_print_dvcs_checkout_warning(tmp_path):
    """`dvc exp run` warns "No file hash info found" for every output of a new run id before it
    creates them; the runner's DVC leaves out exactly that line and nothing else."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    (tmp_path / "params.yaml").write_text("run_id: a\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  make:\n    cmd: mkdir -p out/${run_id} && touch out/${run_id}/f\n"
                                       "    params: [run_id]\n    outs:\n      - out/${run_id}\n")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "i"],
                ["dvc", "exp", "run", "-n", "a", "-S", "run_id=a"]):
        assert run(*cmd).returncode == 0
    plain = run("dvc", "exp", "run", "-n", "b", "-S", "run_id=b")
    assert "No file hash info found for" in plain.stderr + plain.stdout  # what DVC itself prints
    quiet = run(*experiments.dvc_without_checkout_noise(["exp", "run", "-n", "c", "-S", "run_id=c"]))
    assert quiet.returncode == 0 and "Running stage 'make'" in quiet.stdout, quiet.stdout + quiet.stderr
    assert "No file hash info" not in quiet.stdout + quiet.stderr
    failed = run(*experiments.dvc_without_checkout_noise(["exp", "run", "nostage"]))
    assert failed.returncode != 0 and "'nostage' does not exist" in failed.stderr
