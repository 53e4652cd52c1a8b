"""Local inputs DVC would not hash are refused: outside data/ and models/, or behind a folder symlink."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from conftest import shipped_params_text

from pipeline.lineage import experiment_name_problem, uncovered_inputs
from pipeline.params import apply_overrides, parse_params


def _params(source: str):
    return parse_params(apply_overrides(yaml.safe_load(shipped_params_text()), {"data.source": source}))


def test_only_inputs_dvc_hashes_pass(tmp_path):
    (tmp_path / "data" / "real").mkdir(parents=True)
    (tmp_path / "data" / "real" / "a.jsonl").write_text("{}\n")
    (tmp_path / "ext" / "in").mkdir(parents=True)
    os.symlink(tmp_path / "ext", tmp_path / "data" / "link")
    os.symlink(tmp_path / "ext" / "in", tmp_path / "data" / "real" / "sub")
    (tmp_path / "data" / "file.jsonl").symlink_to(tmp_path / "data" / "real" / "a.jsonl")
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        verdicts = {source: uncovered_inputs(_params(source), Path(".")) for source in
                    ("data/real/a.jsonl", "data/file.jsonl", "AI4Math/MathVista", "ext", "data/link", "data/real")}
    finally:
        os.chdir(cwd)
    assert verdicts["data/real/a.jsonl"] == verdicts["data/file.jsonl"] == verdicts["AI4Math/MathVista"] == []
    assert "outside data/ or models/" in verdicts["ext"][0] and verdicts["ext"][0].startswith("data.source:")
    assert "data/link is a symlinked folder" in verdicts["data/link"][0]
    assert "data/real/sub is a symlinked folder" in verdicts["data/real"][0]


def test_the_experiment_name_must_be_the_run_id():
    params = _params("AI4Math/MathVista")
    assert experiment_name_problem(params, {}) is None
    assert experiment_name_problem(params, {"DVC_EXP_NAME": params.run_id}) is None
    assert "named 'other'" in experiment_name_problem(params, {"DVC_EXP_NAME": "other"})


def test_a_suite_benchmarks_local_copy_is_an_input_like_any_other(tmp_path):
    """`evaluate.suite` entries with a local `source` are hashed by DVC only under data/ or models/,
    and one named under data/ that is not there is reported before a run starts."""
    from pipeline.lineage import missing_local_inputs

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mv.parquet").write_bytes(b"x")
    (tmp_path / "mv.parquet").write_bytes(b"x")

    def params(source: str):
        raw = apply_overrides(yaml.safe_load(shipped_params_text()),
                              {"evaluate.suite": [{"name": "mathvista-testmini", "source": source}]})
        return parse_params(raw)

    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert uncovered_inputs(params("data/mv.parquet"), Path(".")) == []
        outside = uncovered_inputs(params("mv.parquet"), Path("."))
        missing = missing_local_inputs(params("data/absent.parquet"))
    finally:
        os.chdir(cwd)
    assert outside[0].startswith("evaluate.suite[0].source: 'mv.parquet' is a local path outside data/"), outside
    assert missing[0].startswith("evaluate.suite[0].source: 'data/absent.parquet' does not exist"), missing
