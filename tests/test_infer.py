"""The inference CLI (`pipeline.infer`) on the tiny model, and docs/inference_guide.md's examples.

Adapters are made in a second with peft (random LoRA weights, large enough to change the answers)
instead of training; runs are registered by the real publish stage code.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Workspace, demo_params

from pipeline import registry
from pipeline.infer import cli
from pipeline.infer import images as infer_images
from pipeline.infer import runs as infer_runs
from pipeline.params import parse_params

# one pytest-xdist worker runs this module's tests: they share its expensive module fixtures
pytestmark = pytest.mark.xdist_group("infer")

PROMPT = "How many squares are in the image?"
GUIDE = REPO / "docs" / "inference_guide.md"


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _make_adapter(base: Path, out: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)


def _fake_eval_parquet(path: Path, images: dict[str, bytes]) -> None:
    """The columns the guide's snippet reads, in the prepare stage's layout (datasets' Image struct)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(images), "image": [{"bytes": b, "path": None} for b in images.values()]})
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, embedded_root) -> Path:
    """Runs `demo` and `v2` registered with adapters; params_gone.yaml's registry adds `gone` (no adapter).

    Its params pick the transformers backend (`evaluate.backend`), so the CLI tests below start no
    vLLM engine; `test_vllm_backend_*` asks for vLLM with `--backend vllm`."""
    from pipeline import publish

    root = tmp_path_factory.mktemp("infer")
    Workspace(root, embedded_root)
    base = embedded_root / "tiny-qwen2_5_vl"
    with contextlib.chdir(root):
        for seed, run_id in enumerate(("demo", "v2"), start=1):
            raw = demo_params(run_id)
            _make_adapter(base, root / "outputs" / run_id / "adapter", seed)
            publish.publish(parse_params(raw))
        Workspace(root, embedded_root).write_params(demo_params("demo", evaluate__backend="transformers"))
        gone = demo_params("demo", publish__registry_file="registry_gone.json", evaluate__backend="transformers")
        (root / "params_gone.yaml").write_text(yaml.safe_dump(gone, sort_keys=False))
        shutil.copy(root / "outputs" / "registry.json", root / "registry_gone.json")
        registry.upsert("registry_gone.json", "gone", {**registry.get("outputs/registry.json", "v2"),
                                                       "adapter_path": "outputs/gone/adapter"})
    images = root / "images_in"
    images.mkdir()
    (images / "a.png").write_bytes(_png((64, 48), (200, 0, 0)))
    (images / "b.png").write_bytes(_png((40, 80), (0, 0, 200)))
    (images / "c.jpg").write_bytes(_png((96, 96), (0, 150, 0)))  # PNG bytes behind a .jpg name: still read
    (images / "notes.txt").write_text("not an image: skipped")
    _fake_eval_parquet(root / "outputs" / "demo" / "data" / "eval.parquet",
                       {str(i): _png((48 + 16 * i, 48), (40 * i, 0, 0)) for i in (1, 2, 3)})
    return root


@pytest.fixture
def in_ws(ws, monkeypatch):
    monkeypatch.chdir(ws)
    return ws


def _records(root: Path) -> list[dict]:
    latest = sorted((root / "outputs" / "inference").glob("*.jsonl"), key=lambda p: p.stat().st_mtime_ns)[-1]
    return [json.loads(line) for line in latest.read_text().splitlines()]


def test_all_runs_batched_with_failures_reported_per_item(in_ws, monkeypatch, capsys):
    from pipeline import generation, modeling

    calls, loads = [], []
    real_generate, real_load = generation.generate_batched, modeling.load_model
    monkeypatch.setattr(generation, "generate_batched", lambda model, processor, conversations, images, **kw: (
        calls.append((kw["desc"], len(images))) or real_generate(model, processor, conversations, images, **kw)))
    monkeypatch.setattr(modeling, "load_model", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))

    code = cli.main(["--run_id", "all,base,nope", "--image_path", "images_in,images_in/missing.png",
                       "--prompt", PROMPT, "--max_new_tokens", "12", "--persist_result_local",
                       "--params", "params_gone.yaml"])
    out, err = capsys.readouterr()
    assert code == 1
    assert len(loads) == 1  # one base model shared by every run
    assert sorted(calls) == [("infer base", 3), ("infer demo", 3), ("infer v2", 3)]  # one batched call per run

    records = _records(in_ws)
    answered = [r for r in records if not r["error"]]
    assert [(r["run_id"], Path(r["image"]).name) for r in answered] == [
        (run, name) for run in ("demo", "v2", "base") for name in ("a.png", "b.png", "c.jpg")]
    assert all(isinstance(r["format_ok"], bool) and "answer" in r and r["response"] is not None for r in answered)
    errors = {(r["run_id"], r["image"]): r["error"] for r in records if r["error"]}
    assert "unknown run id" in errors[("nope", None)]
    assert "no such file" in errors[(None, "images_in/missing.png")]
    assert "dvc exp apply gone" in errors[("gone", None)]
    by_run = {run: [r["response"] for r in answered if r["run_id"] == run] for run in ("demo", "v2", "base")}
    assert by_run["demo"] != by_run["base"] and by_run["v2"] != by_run["demo"]  # each adapter really applied

    assert "[demo] images_in/a.png" in out and "answer:" in out and "format:" in out
    assert "error: run 'nope'" in err and "error: image 'images_in/missing.png'" in err
    page = next((in_ws / "outputs" / "inference").glob(_records_stem(in_ws) + ".md")).read_text()
    assert "| v2 | images_in/b.png |" in page and "## Problems" in page

    # the adapter swap (load the next, delete the previous) gives what loading v2 alone gives
    assert cli.main(["--run_id", "v2", "--image_path", "images_in", "--prompt", PROMPT, "--max_new_tokens", "12",
                       "--persist_result_local"]) == 0
    assert [r["response"] for r in _records(in_ws)] == by_run["v2"]


def test_the_question_is_asked_as_the_run_was_trained(in_ws, monkeypatch):
    """The user turn gets training's answer hint (pipeline.prompts) and each run its own recorded
    system prompt; --system_prompt replaces it for every run."""
    from pipeline import generation
    from pipeline.answer_format import SYSTEM_PROMPT

    sent = []
    real_generate = generation.generate_batched
    monkeypatch.setattr(generation, "generate_batched", lambda model, processor, conversations, images, **kw: (
        sent.append((kw["desc"], conversations[0])) or real_generate(model, processor, conversations, images, **kw)))
    assert cli.main(["--run_id", "demo", "--image_path", "images_in/a.png", "--prompt", PROMPT,
                       "--answer_type", "integer", "--max_new_tokens", "4", "--persist_result_local"]) == 0
    (desc, conversation), = sent
    assert conversation[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert conversation[1]["content"] == f"{PROMPT}\nGive an integer."
    assert _records(in_ws)[0]["user_text"] == f"{PROMPT}\nGive an integer."
    assert cli.main(["--run_id", "demo", "--image_path", "images_in/a.png", "--prompt", "Which bar?",
                       "--choices", "red, blue", "--system_prompt", "Be brief.", "--max_new_tokens", "4"]) == 0
    assert sent[-1][1] == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Which bar?\nChoices:\n(A) red\n(B) blue\n"
                                                       "Answer with the option's letter."}]
    entry = {**registry.get("outputs/registry.json", "v2"), "system_prompt": "The run's own."}
    assert infer_runs.locate_adapter("v2", entry).system_prompt == "The run's own."


@pytest.fixture
def restore_environ():
    """An in-process vLLM engine sets its CPU environment (cpu_vllm_environment); later tests must not inherit it."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_vllm_backend_serves_base_and_adapters_from_one_engine(in_ws, caplog, restore_environ):
    """--backend vllm: one engine for the base model and both runs' adapters (LoRA requests of rank 4,
    saved by peft with a regex over the language model). Prompts, image sizes, stop tokens and
    decoding are the transformers path's, so on CPU (float32 in both) greedy answers agree but for
    numerical near-ties: at least 8 of the 9 run × image answers."""
    import logging

    caplog.set_level(logging.INFO)
    common = ["--run_id", "demo,v2,base", "--image_path", "images_in", "--prompt", PROMPT, "--max_new_tokens", "12",
              "--persist_result_local"]
    assert cli.main([*common, "--backend", "transformers"]) == 0
    reference = {(r["run_id"], r["image"]): r for r in _records(in_ws)}
    assert {r["backend"] for r in reference.values()} == {"transformers"}

    assert cli.main([*common, "--backend", "vllm"]) == 0
    records = _records(in_ws)
    assert caplog.text.count("vLLM engine for") == 1 and "LoRA rank up to 8" in caplog.text
    assert all(f"infer {run} [vllm]: 3 rows" in caplog.text for run in ("demo", "v2", "base"))  # one call per run
    assert {r["backend"] for r in records} == {"vllm"} and not any(r["error"] for r in records)
    responses = {(r["run_id"], r["image"]): r["response"] for r in records}
    assert responses.keys() == reference.keys()
    agree = sum(responses[key] == reference[key]["response"] for key in responses)
    assert agree >= 8, [(key, responses[key], reference[key]["response"]) for key in responses]
    by_run = {run: [responses[key] for key in sorted(responses) if key[0] == run] for run in ("demo", "v2", "base")}
    assert by_run["demo"] != by_run["base"] and by_run["v2"] != by_run["demo"]  # each LoRA request applied
    assert "backend vllm" in (in_ws / "outputs" / "inference" / f"{_records_stem(in_ws)}.md").read_text()


def _records_stem(root: Path) -> str:
    latest = sorted((root / "outputs" / "inference").glob("*.jsonl"), key=lambda p: p.stat().st_mtime_ns)[-1]
    return latest.stem


def test_entry_point_exit_codes_without_loading_a_model(ws):
    result = subprocess.run([sys.executable, "-m", "pipeline.infer", "--run_id", "nope", "--image_path",
                             "missing.png", "--prompt", PROMPT], cwd=ws, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1, result.stderr
    assert "unknown run id (known: demo, v2" in result.stderr and "'missing.png': no such file" in result.stderr
    assert "0 response(s)" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeline.infer", "--run_id", "demo", "--image_path", "x",
                          "--prompt", PROMPT, "--batch_size", "0"], cwd=ws, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "--batch_size must be positive" in bad.stderr
    engine = subprocess.run([sys.executable, "-m", "pipeline.infer", "--run_id", "demo", "--image_path", "x",
                             "--prompt", PROMPT, "--backend", "tensorrt"], cwd=ws, capture_output=True, text=True,
                            timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert engine.returncode == 2 and "--backend: invalid choice: 'tensorrt'" in engine.stderr


def test_missing_adapter_with_hub_revision_says_how_to_restore(in_ws):
    entry = {**registry.get("outputs/registry.json", "v2"), "adapter_path": "outputs/elsewhere/adapter",
             "hub_repo_id": "me/grpo", "hub_revision": "f" * 40}
    target = infer_runs.locate_adapter("old", entry)  # HF_HUB_OFFLINE=1 in tests: the Hub fetch fails
    assert target.adapter is None
    assert "me/grpo@" + "f" * 40 in target.error and "dvc exp apply old" in target.error
    retrained = {**registry.get("outputs/registry.json", "v2"), "adapter_digest": "sha256:0"}
    local = infer_runs.locate_adapter("v2", retrained)
    assert local.adapter == "outputs/v2/adapter" and "retrained" in local.warning


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _http_server(directory: Path):
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_urls_have_a_timeout_a_size_cap_and_per_item_errors(ws):
    silent = socket.socket()  # accepts connections (kernel backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    with _http_server(ws / "images_in") as url, contextlib.closing(silent):
        hang = f"http://127.0.0.1:{silent.getsockname()[1]}/x.png"
        items = infer_images.collect_images([f"{url}/a.png,{url}/absent.png,{url}/c.jpg,ftp://example.com/x.png,{hang}"],
                                     timeout=0.5, max_bytes=(ws / "images_in" / "a.png").stat().st_size)
    got = {item.source.rsplit("/", 1)[-1]: item for item in items}
    assert got["a.png"].data == (ws / "images_in" / "a.png").read_bytes()
    assert "HTTP 404" in got["absent.png"].error
    assert "over the" in got["c.jpg"].error  # bigger than the cap
    assert "unsupported URL scheme" in items[3].error
    assert "download failed" in got["x.png"].error and items[4].data is None


def test_wandb_table_is_run_by_image_by_response(in_ws, monkeypatch):
    """A stand-in wandb module: the real one's service takes minutes to shut down on a loaded 2-core box."""
    logged = {}

    class Table:
        def __init__(self, columns):
            self.columns, self.data = columns, []

        def add_data(self, *row):
            self.data.append(row)

    def init(**kwargs):
        logged["init"] = kwargs
        return types.SimpleNamespace(log=lambda payload: logged.update(payload), finish=lambda: None)

    fake = types.SimpleNamespace(init=init, Table=Table, Image=lambda image: ("image", image.size),
                                 Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    code = cli.main(["--run_id", "demo,base", "--image_path", "images_in/a.png,images_in/b.png", "--prompt", PROMPT,
                       "--max_new_tokens", "6", "--enable_wandb"])
    assert code == 0
    table = logged["inference"]
    assert table.columns[:5] == ["run_id", "image", "source", "response", "answer"]
    assert {(row[0], Path(row[2]).name) for row in table.data} == {
        (run, name) for run in ("demo", "base") for name in ("a.png", "b.png")}
    assert all(row[1][0] == "image" for row in table.data)
    assert logged["init"]["mode"] == "offline" and logged["init"]["project"] == "grpo"


def _guide_steps() -> list[tuple[str, str]]:
    """('python', code) and ('cli', command) in document order, from the guide's fenced blocks."""
    steps = []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", GUIDE.read_text(), flags=re.S):
        if lang == "python":
            steps.append(("python", body))
        elif lang == "bash":
            steps += [("cli", line) for line in body.replace("\\\n", " ").splitlines()
                      if line.startswith("python -m pipeline.infer")]
    return steps


def test_inference_guide_examples_run(ws, tmp_path, monkeypatch, capsys):
    """Every example of docs/inference_guide.md, as written, in a copy of the workspace; its
    example.com URL is served locally."""
    steps = _guide_steps()
    assert sum(kind == "cli" for kind, _ in steps) >= 4 and any(kind == "python" for kind, _ in steps)
    root = tmp_path / "guide"
    shutil.copytree(ws, root, symlinks=True, ignore=shutil.ignore_patterns("inference"))
    monkeypatch.chdir(root)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=lambda **kw: types.SimpleNamespace(log=lambda payload: None, finish=lambda: None),
        Table=lambda columns: types.SimpleNamespace(add_data=lambda *row: None), Image=lambda image: None,
        Settings=lambda **kw: kw))
    served = root / "served"
    served.mkdir()
    (served / "chart.png").write_bytes(_png((80, 60), (10, 10, 10)))
    with _http_server(served) as url:
        for kind, step in steps:
            if kind == "python":
                exec(compile(step, str(GUIDE), "exec"), {"__name__": "guide"})  # noqa: S102 - our own doc
                continue
            argv = shlex.split(step.replace("https://example.com", url))[3:]
            assert cli.main(argv) == 0, (step, capsys.readouterr().err[-2000:])
    out = capsys.readouterr().out
    assert "[demo] images/1.png" in out and "[base] images/3.png" in out
    assert len(list((root / "outputs" / "inference").glob("*.jsonl"))) == 2
