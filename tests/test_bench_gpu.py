"""The GPU benchmark's bookkeeping, checked on CPU: which GPUs a configuration gets, its floors, and
the start-up split read from the logs (lines as vLLM 0.24 and the train stage print them on an H200)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_gpu  # noqa: E402

MODEL = {"parameters": 8.29e9, "shape": "qwen2_5_vl-7b"}
FLOORS = {"copy_gb_s": 4270.0, "matmul_tflop_s": 750.0, "peer_gb_s": 396.0}


def test_a_config_names_its_gpu_count():
    assert bench_gpu.parse_config("B-tuned") == ("B-tuned", 1)
    assert bench_gpu.parse_config("B-tuned", default_gpus=2) == ("B-tuned", 2)
    assert bench_gpu.parse_config("B-fsdp2@2") == ("B-fsdp2", 2)
    with pytest.raises(SystemExit, match="unknown config 'B-nope'"):
        bench_gpu.parse_config("B-nope@2")
    with pytest.raises(SystemExit, match="positive integer"):
        bench_gpu.parse_config("B-tuned@0")


def test_gpus_are_counted_within_the_visible_ones(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert bench_gpu._devices([1]) == "5"
    assert bench_gpu._env([0, 1])["CUDA_VISIBLE_DEVICES"] == "3,5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    assert bench_gpu._devices([0, 1]) == "0,1"


def test_every_config_is_valid_params_and_the_accelerate_config_exists():
    for name, overrides in bench_gpu.CONFIGS.items():
        params = bench_gpu.params_for(f"x-{name}", overrides, Path("/m"), Path("/d"), 5)
        assert Path(params["train"]["accelerate_config"]).is_file(), name


def test_floors_split_the_work_over_the_gpus():
    strong = bench_gpu.params_for("s", bench_gpu.CONFIGS["B-strong"], Path("/m"), Path("/d"), 5)
    one = bench_gpu.params_for("o", bench_gpu.CONFIGS["B-tuned"], Path("/m"), Path("/d"), 5)
    result = {"tokens_per_step": 16_600}
    on_two = bench_gpu.phase_floors(result, FLOORS, MODEL, strong, gpus=2)
    on_one = bench_gpu.phase_floors(result, FLOORS, MODEL, one, gpus=1)
    # the same 16 completions: half the training per GPU, a decode still reads every weight per token
    assert on_two["train_floor_s"] == pytest.approx(on_one["train_floor_s"] / 2, rel=0.05)
    assert 0.9 < on_two["rollout_floor_s"] / on_one["rollout_floor_s"] <= 1.0
    server = bench_gpu.params_for("v", bench_gpu.CONFIGS["B-server"], Path("/m"), Path("/d"), 5)
    # the server's weights cross the GPU-to-GPU link once: 16.6 GB at 396 GB/s
    assert bench_gpu.phase_floors(result, FLOORS, MODEL, server)["sync_floor_s"] == pytest.approx(0.042, abs=0.001)


def test_the_start_up_split_reads_the_stage_log():
    log = "\n".join([
        "2026-11-30 17:20:01,000 pipeline.train: model loaded in 21.4 s",
        "(EngineCore pid=7672) INFO Model loading took 15.6 GiB memory and 9.812345 seconds",
        "(EngineCore pid=7672) INFO Graph capturing finished in 22 secs, took 0.94 GiB",
        "(EngineCore pid=7672) INFO init engine (profile, create kv cache, warmup model) took 68.50 s "
        "(compilation: 30.30 s)",
        "2026-11-30 17:21:40,000 pipeline.train: trainer ready in 95.2 s (the colocated vLLM engine's start "
        "included)",
    ])
    split = bench_gpu.startup_split(log)
    assert split == {"model_load_s": 21.4, "trainer_ready_s": 95.2, "vllm_weights_s": 9.812345,
                     "vllm_engine_s": 68.5, "vllm_compile_s": 30.3, "cuda_graphs_s": 22.0,
                     "compile_cache_hit": False}
    cached = log + "\nINFO Directly load the compiled graph(s) for compile range (1, 2048) from the cache, took 2.1 s"
    assert bench_gpu.startup_split(cached)["compile_cache_hit"] is True
    assert bench_gpu.startup_split("")["vllm_engine_s"] is None


def test_a_separate_eval_set_prepares_beside_the_training_set(tmp_path, tiny_model_dir):
    """`--eval-rows N`: prepare accepts the eval set as held out (no pid of the training set) and keeps
    every row of it, as the evaluate stage's throughput figure needs."""
    import subprocess

    import pandas as pd
    import yaml

    data = bench_gpu.build_dataset(tmp_path / "train", rows=12)
    held_out = bench_gpu.build_eval_dataset(tmp_path, rows=6)
    params = bench_gpu.params_for("t", bench_gpu.CONFIGS["B-tuned"], tiny_model_dir, data, 3, held_out)
    run = tmp_path / "run"
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "pipeline.prepare"], cwd=run, capture_output=True, text=True,
                            env={**bench_gpu._env([0]), "HF_HOME": str(tmp_path / "hf")}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(pd.read_parquet(next(run.rglob("eval.parquet")))) == 6
