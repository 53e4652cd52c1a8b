"""Evaluation metrics on canned generations (every number checked), and the generated report."""

from __future__ import annotations

import json

import pytest

from pipeline import report
from pipeline.evaluate import breakdown, build_metrics, score_rows, summarise, wilson_interval
from pipeline.generation import Generation

# one pytest-xdist worker runs this module's tests: they share its expensive module fixtures
pytestmark = pytest.mark.xdist_group("evaluate")

ROWS = [
    {"id": "1", "answer": "5", "choices": None, "question_type": "free_form", "answer_type": "integer",
     "precision": None, "unit": None, "category": "math-targeted-vqa", "skills": "arithmetic reasoning, counting"},
    {"id": "2", "answer": "blue", "choices": ["red", "blue"], "question_type": "multi_choice", "answer_type": "text",
     "precision": None, "unit": None, "category": "general-vqa", "skills": "counting"},
    {"id": "3", "answer": "2.5", "choices": None, "question_type": "free_form", "answer_type": "float",
     "precision": 1.0, "unit": None, "category": "math-targeted-vqa", "skills": None},
    {"id": "4", "answer": "7", "choices": None, "question_type": "free_form", "answer_type": "integer",
     "precision": None, "unit": None, "category": "general-vqa", "skills": "counting"},
]
BASE = [Generation("The answer is 5.", 4), Generation("<answer>B</answer>", 5),
        Generation("<reasoning>r</reasoning><answer>2.50</answer>", 9, truncated=True), Generation(None, error="boom")]
ADAPTER = [Generation("<reasoning>r</reasoning>\n<answer>5</answer>", 10),
           Generation("<reasoning>r</reasoning><answer>(B)</answer>", 10),
           Generation("<reasoning>r</reasoning><answer>2.5</answer>", 10),
           Generation("<reasoning>r</reasoning><answer>6</answer>", 10)]


@pytest.fixture
def metrics():
    scored = {"base": score_rows(ROWS, [g.text for g in BASE]), "adapter": score_rows(ROWS, [g.text for g in ADAPTER])}
    generations = {"base": BASE, "adapter": ADAPTER}
    return build_metrics({name: {**summarise(scored[name], generations[name]), "by": breakdown(ROWS, scored[name])}
                          for name in ("base", "adapter")})


def test_every_number_on_canned_generations(metrics):
    base, adapter = metrics["base"], metrics["adapter"]
    assert base["rows"] == adapter["rows"] == 4
    # base: no answer block in row 1 (wrong), B = blue (right), 2.50 rounds to 2.5 (right), failed row (wrong)
    assert base["accuracy"] == 0.5 and adapter["accuracy"] == 0.75
    assert base["strict_format"] == 0.25 and adapter["strict_format"] == 1.0
    assert base["soft_format"] == 0.25
    assert base["extraction_rate"] == 0.5 and adapter["extraction_rate"] == 1.0
    assert base["truncation_rate"] == 0.25 and base["failed_generations"] == 1
    assert base["mean_completion_tokens"] == 4.5
    assert metrics["delta"]["accuracy"] == 0.25 and metrics["delta"]["strict_format"] == 0.75
    assert base["accuracy_ci95"] == list(wilson_interval(2, 4))
    # MathVista's breakdown: correct, total and accuracy per value, plus our 95% interval
    assert adapter["by"]["question_type"] == {
        "free_form": {"rows": 3, "correct": 2, "accuracy": 0.6667, "accuracy_ci95": list(wilson_interval(2, 3))},
        "multi_choice": {"rows": 1, "correct": 1, "accuracy": 1.0, "accuracy_ci95": list(wilson_interval(1, 1))}}
    assert adapter["by"]["skills"]["counting"] == {"rows": 3, "correct": 2, "accuracy": 0.6667,
                                                   "accuracy_ci95": list(wilson_interval(2, 3))}
    assert adapter["by"]["category"]["general-vqa"] == {"rows": 2, "correct": 1, "accuracy": 0.5,
                                                        "accuracy_ci95": list(wilson_interval(1, 2))}


def test_wilson_interval_is_bounded_and_sensible():
    assert wilson_interval(0, 0) == (0.0, 0.0)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35
    low, high = wilson_interval(50, 100)
    assert 0.39 < low < 0.41 and 0.59 < high < 0.61


def test_report_matches_the_metrics(tmp_path, metrics, monkeypatch):
    monkeypatch.chdir(tmp_path)
    predictions = tmp_path / "predictions.jsonl"
    with predictions.open("w") as f:
        for row, base, adapter in zip(ROWS, BASE, ADAPTER, strict=True):
            f.write(json.dumps({"id": row["id"], "question": "q", "gold": row["answer"],
                                "base": {"prediction": base.text, "error": base.error, "correct": False,
                                         "strict_format": False},
                                "adapter": {"prediction": adapter.text, "error": None, "correct": True,
                                            "strict_format": True}}) + "\n")
    report.write_all("r1", metrics, predictions)
    text = (tmp_path / "reports" / "results.md").read_text()
    assert "| accuracy | 0.500 (" in text and "| 0.750 (" in text and "+0.250 |" in text
    assert "| strict format | 0.250 | 1.000 | +0.750 |" in text
    assert "| counting | 3 | 0.333 | 0.667 | +0.333 |" in text
    assert (tmp_path / "reports" / "results.png").stat().st_size > 1000
    assert "(no output: boom)" in (tmp_path / "reports" / "sample_outputs.md").read_text()
    assert not (tmp_path / "docs").exists()  # a run never writes into the hand-written docs
    csv_rows = (tmp_path / "reports" / "eval_comparison.csv").read_text().splitlines()
    assert csv_rows[0] == "group,model,value" and "overall: accuracy,adapter,0.75" in csv_rows


# ---------------------------------------------------------------------------------------------
# the stage on the tiny model: vLLM (one engine, the adapter as a LoRARequest) vs transformers
# ---------------------------------------------------------------------------------------------
BAD_ROW = "bad-image"
TRAINED = dict(train__use_vllm=False, train__max_steps=12)  # the `trained` run's params


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_root, prepared_data):
    """The demo preset's run, trained for real but shorter (12 steps, as README's `short` run: its
    strict format is already near 1.0 against the base model's near 0; transformers rollouts, no vLLM
    engine to start), plus one eval row whose image no Qwen processor takes (aspect ratio 333 > 200)."""
    import shutil

    from conftest import Workspace, demo_params

    ws = Workspace(tmp_path_factory.mktemp("evaluate"), embedded_root)
    ws.write_params(demo_params("ev", **TRAINED))
    shutil.copytree(prepared_data, ws.root / "outputs" / "ev" / "data")
    ws.run("pipeline.train")
    _add_unusable_row(ws.root / "outputs" / "ev" / "data" / "eval.parquet")
    return ws


def _add_unusable_row(path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path)
    row = table.slice(0, 1).to_pylist()[0]
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 3), (255, 255, 255)).save(buffer, format="PNG")
    row.update(id=BAD_ROW, image={"bytes": buffer.getvalue(), "path": None})
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([row], schema=table.schema)]), path)


def _evaluate(ws, backend: str) -> tuple[str, dict, list[dict]]:
    from conftest import demo_params

    ws.write_params(demo_params("ev", **TRAINED, evaluate__backend=backend))
    result = ws.run("pipeline.evaluate")  # exit 0: the vLLM engine is shut down before the interpreter exits
    eval_dir = ws.root / "outputs" / "ev" / "eval"
    predictions = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    return result.stderr, json.loads((ws.root / "reports" / "eval_metrics.json").read_text()), predictions


def test_vllm_and_transformers_backends_agree_on_a_trained_adapter(trained):
    """Same prompts, image sizes, stop tokens and decoding in both backends, so on CPU (float32 in
    both) greedy answers agree but for numerical near-ties: at least 90% of rows per model, strict
    format rates within 0.05. The bad row fails alone in both."""
    log, vllm_metrics, vllm_rows = _evaluate(trained, "auto")
    assert "generation backend: vllm (evaluate.backend: auto)" in log
    assert "vLLM engine for assets/embedded/tiny-qwen2_5_vl ready" in log and "LoRA rank up to 16" in log
    assert "eval adapter [vllm]" in log and "rows/s" in log
    log, hf_metrics, hf_rows = _evaluate(trained, "transformers")
    assert "generation backend: transformers (evaluate.backend: transformers)" in log and "[vllm]" not in log

    assert {row["backend"] for row in vllm_rows} == {"vllm"} and {row["backend"] for row in hf_rows} == {"transformers"}
    assert [row["id"] for row in vllm_rows] == [row["id"] for row in hf_rows]
    good = [i for i, row in enumerate(vllm_rows) if row["id"] != BAD_ROW]
    for name in ("base", "adapter"):
        for rows, metrics in ((vllm_rows, vllm_metrics), (hf_rows, hf_metrics)):
            bad = next(row[name] for row in rows if row["id"] == BAD_ROW)
            assert bad["prediction"] is None and "aspect ratio" in bad["error"], bad
            assert metrics[name]["failed_generations"] == 1 and metrics[name]["rows"] == len(vllm_rows)
            assert all(rows[i][name]["prediction"] for i in good)
        # same image size in both: identical prompt lengths, image tokens included
        assert all(vllm_rows[i][name]["prompt_tokens"] == hf_rows[i][name]["prompt_tokens"] > 0 for i in good)
        agree = sum(vllm_rows[i][name]["prediction"] == hf_rows[i][name]["prediction"] for i in good)
        assert agree >= 0.9 * len(good), (name, agree, len(good))
        assert abs(vllm_metrics[name]["strict_format"] - hf_metrics[name]["strict_format"]) <= 0.05
    # the LoRA request is applied: the adapter's answers differ from the base's and follow the format
    changed = sum(vllm_rows[i]["adapter"]["prediction"] != vllm_rows[i]["base"]["prediction"] for i in good)
    assert changed >= 0.8 * len(good), changed
    assert vllm_metrics["adapter"]["strict_format"] >= vllm_metrics["base"]["strict_format"] + 0.3


def test_vllm_context_is_capped_at_the_checkpoints_own(tiny_model_dir):
    """A registered run's base may allow less context than params.yaml's max_model_len; vLLM would refuse it."""
    from transformers import AutoConfig

    from pipeline.vllm_generator import _fit_context

    limit = AutoConfig.from_pretrained(str(tiny_model_dir)).get_text_config().max_position_embeddings
    assert _fit_context(str(tiny_model_dir), "main", limit * 8) == limit
    assert _fit_context(str(tiny_model_dir), "main", limit // 4) == limit // 4


def test_vllm_wraps_only_the_layers_the_adapters_change(tmp_path):
    """`lora_target_modules` is the union of the adapters' own lists; a pattern (or an unreadable
    adapter) leaves vLLM's default of every supported layer."""
    from pipeline.vllm_generator import lora_target_modules

    def adapter(name: str, targets):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": targets}))
        return folder

    a, b = adapter("a", ["q_proj", "v_proj"]), adapter("b", ["v_proj", "o_proj"])
    assert lora_target_modules([a, b]) == ["o_proj", "q_proj", "v_proj"]
    assert lora_target_modules([a, adapter("c", ".*proj")]) is None
    assert lora_target_modules([a, tmp_path / "missing"]) is None


def test_the_engine_filter_names_peft_and_vllms_packed_modules():
    """Evaluation's engine and the train stage's share one filter: each PEFT name and the packed
    module vLLM fuses it into, so the adapter applies whichever naming a vLLM release matches."""
    from pipeline import adapter_sync
    from pipeline.vllm_generator import engine_lora_options

    assert adapter_sync.engine_lora_options is engine_lora_options
    options = engine_lora_options(16, ["q_proj", "v_proj", "o_proj", "up_proj"])
    assert options["lora_target_modules"] == ["q_proj", "v_proj", "o_proj", "up_proj", "qkv_proj", "gate_up_proj"]
    assert (options["max_lora_rank"], options["max_loras"]) == (16, 1)
    assert "lora_target_modules" not in engine_lora_options(8, None)  # a pattern: no filter
