"""`evaluate.suite` through the real stages: every shipped benchmark, as a local file in its dataset's
exact schema (rows from each benchmark's own test module, MathVista's from the embedded dataset,
which has MathVista's schema), goes through `pipeline.prepare` and `pipeline.evaluate` with one
vLLM engine; its metrics land under `suite.<name>` and its official output file is written.
The scorers' verdicts on hand-made answers are in tests/test_benchmark_<module>.py."""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import Workspace, demo_params

from pipeline.benchmarks import MODULES, registry
from pipeline.params import ParamsError, parse_params

pytestmark = pytest.mark.xdist_group("suite")
MAX_ROWS = 3


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_rows(embedded_root: Path) -> dict[str, list[dict]]:
    """Each benchmark's rows in its own schema: the benchmark modules' tests provide them."""
    import datasets

    rows: dict[str, list[dict]] = {}
    for module in MODULES:
        if module == "mathvista":  # the embedded dataset is MathVista's schema
            files = sorted((embedded_root / "synthetic-mathvista" / "data").glob("*.parquet"))
            table = datasets.load_dataset("parquet", data_files=str(files[0]), split="train").select(range(4))
            rows["mathvista-testmini"] = [dict(r, decoded_image={"bytes": _encode(r["decoded_image"]), "path": None})
                                          for r in table]
        else:
            rows.update(importlib.import_module(f"test_benchmark_{module}").sample_rows(_png()))
    return rows


def _encode(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_shipped_benchmark_has_rows_in_its_schema(embedded_root):
    assert set(sample_rows(embedded_root)) == set(registry())


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory, embedded_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ws = Workspace(tmp_path_factory.mktemp("suite"), embedded_root)
    entries = []
    for name, rows in sample_rows(embedded_root).items():
        path = ws.root / "data" / "suite" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        entries.append({"name": name, "source": f"data/suite/{name}.parquet"})
    ws.write_params(demo_params("suite", evaluate__suite=entries, evaluate__max_rows=MAX_ROWS,
                                evaluate__max_new_tokens=16))
    ws.run("pipeline.prepare")
    _save_untrained_adapter(embedded_root / "tiny-qwen2_5_vl", ws.root / "outputs" / "suite" / "adapter")
    result = ws.run("pipeline.evaluate", timeout=900)
    return ws, entries, result


def _save_untrained_adapter(model_dir: Path, out: Path) -> None:
    """The adapter the train stage would save before its first step (lora_B = 0): evaluation's
    mechanics do not depend on what it learnt."""
    from peft import get_peft_model

    from pipeline import modeling
    from pipeline.train import build_lora_config

    params = parse_params(demo_params("suite"))
    model = get_peft_model(modeling.load_model(str(model_dir)), build_lora_config(params))
    model.save_pretrained(out)


def test_each_benchmark_is_prepared_evaluated_and_written_in_its_format(suite_run):
    ws, entries, result = suite_run
    report = json.loads((ws.root / "reports" / "data_report.json").read_text())
    metrics = json.loads((ws.root / "reports" / "eval_metrics.json").read_text())
    benchmarks = registry()
    assert set(metrics["suite"]) == {entry["name"] for entry in entries}
    for entry in entries:
        name = entry["name"]
        counts = report["suite"][name]
        assert counts["kept"] >= 1 and counts["source"] == entry["source"], counts
        assert counts["kept"] + counts["not_in_this_benchmark"] + counts["unusable_image"] == counts["rows_in"]
        scored = metrics["suite"][name]
        for model in ("base", "adapter"):
            summary = scored[model]
            assert summary["rows"] == min(MAX_ROWS, counts["kept"]), (name, summary)
            low, high = summary["accuracy_ci95"]
            assert 0.0 <= low <= summary["accuracy"] <= high <= 1.0, (name, summary)
            benchmark = benchmarks[name]
            if benchmark.official_output is not None:
                stem, _, suffix = (benchmark.output_file or f"{name}.json").rpartition(".")
                output = ws.root / "outputs" / "suite" / "eval" / "suite" / f"{stem}_{model}.{suffix}"
                assert output.is_file() and json.loads(output.read_text()), output
        # lora_B = 0: the adapter answers as the base does, the same verdicts
        assert scored["delta"]["accuracy"] == 0.0, (name, scored)
    assert "vLLM engine" in result.stderr and result.stderr.count("ready in") == 1  # one engine for every set


def test_the_suite_shows_in_make_compare():
    from pipeline import compare
    from pipeline.params import Reports

    def run(name: str, accuracy: float) -> dict:
        evaluation = {"adapter": {"accuracy": 0.2}, "base": {"accuracy": 0.1}, "delta": {"accuracy": 0.1},
                      "suite": {name: {"adapter": {"accuracy": accuracy}}}}
        return {"metrics": {str(Reports.evaluation): {"data": evaluation}}, "params": {}}

    shown = [{"rev": "workspace", "experiments": [{"revs": [{"name": "a", **{"data": run("mathverse-text-lite", 0.25)}},
                                                            {"name": "b", "data": run("dynamath", 0.5)}]}]}]
    table = compare.table(shown, workspace_is_one_run=False)
    header, _, first, second = table.splitlines()
    assert "dynamath acc" in header and "mathverse-text-lite acc" in header
    assert first.split()[0] == "a" and "0.250" in first and "—" in first
    assert second.split()[0] == "b" and "0.500" in second


@pytest.mark.parametrize(("suite", "reason"), [
    (["mathvista-testmin"], "unknown benchmark 'mathvista-testmin' (shipped: "),
    (["mathvista-testmini", {"name": "mathvista-testmini", "source": "data/x.parquet"}],
     "names mathvista-testmini more than once"),
    ([{"name": "mathvista-testmini", "sourse": "data/x.parquet"}], "sourse"),
])
def test_a_bad_suite_entry_is_named(suite, reason):
    with pytest.raises(ParamsError) as error:
        parse_params(demo_params("bad", evaluate__suite=suite))
    assert "evaluate.suite" in str(error.value) and reason in str(error.value), str(error.value)


def test_the_committed_params_run_no_suite_and_the_demo_preset_none():
    """The suite is opt-in: the shipped experiments' numbers stay comparable with earlier runs."""
    repo = Path(__file__).resolve().parents[1]
    assert yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["suite"] == []
