"""The parameter schema: the shipped file validates, malformed files fail fast with the key named."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import shipped_params_text

from pipeline.params import EXIT_BAD_PARAMS, ParamsError, apply_overrides, load_params, parse_params, read_overrides

REPO = Path(__file__).resolve().parents[1]


SHIPPED_TEXT = shipped_params_text()
SHIPPED = yaml.safe_load(SHIPPED_TEXT)


def test_shipped_params_are_the_real_experiment(tmp_path):
    (tmp_path / "params.yaml").write_text(SHIPPED_TEXT)
    params = load_params(tmp_path / "params.yaml")
    assert params.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (params.data.source, params.data.split) == ("AI4Math/MathVista", "testmini")
    assert params.train.learning_rate == 5.0e-6 and params.train.max_steps == 100
    assert params.train.per_device_train_batch_size == 8 and params.train.gradient_accumulation_steps == 2
    assert params.train.num_generations == 8 and params.train.max_completion_length == 512
    assert params.train.use_vllm and params.train.vllm_mode == "colocate"
    assert params.train.vllm_gpu_memory_utilization == 0.7 and params.train.vllm_enable_sleep_mode
    assert params.tracking.wandb_project == "grpo"
    assert params.evaluate.backend == "auto"  # vLLM when installed (the GPU image has it), else transformers
    assert str(params.output_dir) == f"outputs/{params.run_id}"


def test_demo_preset_validates_over_shipped_params():
    overrides = read_overrides(REPO / "presets" / "demo.yaml", ["run_id=demo"])
    params = parse_params(apply_overrides(SHIPPED, overrides))
    assert params.run_id == "demo" and params.model.name_or_path.startswith("assets/embedded/")


@pytest.mark.parametrize(("preset", "config"), [("gpu-fast", "B-tuned"), ("gpu-fast-qwen3-vl-8b", "B-micro2"),
                                                  ("gpu-h200-qwen3-vl-8b", "B-fast")])
def test_gpu_presets_are_what_the_gpu_benchmark_measured(preset, config):
    """A GPU preset's train settings over params.yaml = the benchmark's B over its A (the seed's
    setup): what docs/performance.md reports is what `make train PRESET=…` runs."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu

    overrides = read_overrides(REPO / "presets" / f"{preset}.yaml", [])
    shipped = parse_params(apply_overrides(SHIPPED, overrides))
    seed = parse_params(SHIPPED)
    for key, value in bench_gpu.SEED_SETUP.items():
        section, name = key.split(".")
        assert getattr(getattr(seed, section), name) == value, f"params.yaml {key} is not the benchmark's A"
    measured = bench_gpu.CONFIGS[config]
    for key, value in measured.items():
        section, name = key.split(".")
        assert getattr(getattr(shipped, section), name) == value, f"{preset} {key} is not the benchmark's {config}"
    changed = {key for key, value in measured.items() if bench_gpu.SEED_SETUP.get(key, object()) != value}
    model_keys = {key for key in overrides if key.startswith("model.") and key != "model.max_model_len"}
    assert set(overrides) - model_keys == changed, "a train setting the benchmark never ran"


def test_the_mi300x_preset_is_the_h200_one_with_the_same_vllm_pool_in_gib():
    """Not measured on an MI300X: the H200 preset with vLLM's memory fraction rescaled so the pool
    keeps the GiB measured on the 140.4 GiB H200 on the 178.8 GiB MI300X (192 GB)."""
    h200 = read_overrides(REPO / "presets" / "gpu-h200-qwen3-vl-8b.yaml", [])
    mi300x = read_overrides(REPO / "presets" / "gpu-mi300x-qwen3-vl-8b.yaml", [])
    key = "train.vllm_gpu_memory_utilization"
    assert {k: v for k, v in mi300x.items() if k != key} == {k: v for k, v in h200.items() if k != key}
    assert abs(mi300x[key] * 178.8 - h200[key] * 140.4) < 0.01 * 178.8


def _set(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


_DELETE = object()

MALFORMED = [
    # (key to change, new value, key the message must name, a word of the reason)
    ("train.num_generations", 1, "train.num_generations", "greater than or equal to 2"),
    ("train.per_device_train_batch_size", 3, "train", "divisible"),
    ("train.learning_rate", -1, "train.learning_rate", "greater than 0"),
    ("train.vllm_gpu_memory_utilization", 1.5, "train.vllm_gpu_memory_utilization", "less than or equal to 1"),
    ("train", _DELETE, "train", "missing"),
    ("train.max_steps", "100", "train.max_steps", "integer"),
    ("train.use_vllm", "yes", "train.use_vllm", "boolean"),
    ("train.vllm_mode", "remote", "train.vllm_mode", "colocate"),
    ("train.learning_rte", 1e-5, "train.learning_rte", "unknown key"),
    ("evaluate.backend", "tensorrt", "evaluate.backend", "'auto', 'vllm' or 'transformers'"),
    ("lora.r", 0, "lora.r", "greater than 0"),
    ("rewards.not_a_reward", 1.0, "rewards", "unknown reward"),
    ("run_id", "../escape", "run_id", "letters, digits"),
    ("data.eval_fraction", 1.0, "data.eval_fraction", "less than 1"),
    ("model.min_pixels", 10**9, "model", "exceeds max_pixels"),
    ("publish.push_to_hub", True, "publish", "hub_repo_id"),
    ("train.vllm_max_model_length", 2048, "train.vllm_max_model_length", "model.max_model_len"),
    ("train.vllm_weight_sync", "lora", "train.vllm_weight_sync", "'merged' or 'adapter'"),
    ("train.vllm_weight_sync", "adapter", "train", "train.vllm_enable_sleep_mode: false"),  # sleep drops weights
    ("train.rollout_overlap", 1, "train", "train.vllm_mode: server"),  # overlap needs a server
    ("train.rollout_overlap", 2, "train.rollout_overlap", "0 or 1"),
    ("train.rollout_timeout", 0, "train.rollout_timeout", "greater than 0"),
    ("train.rollout_precision", "fp4", "train.rollout_precision", "'bf16' or 'fp8'"),
    ("model.quantization", "8bit", "model.quantization", "'none' or '4bit'"),
    # `train:` takes any field of TRL's GRPOConfig, checked by name and simple type without importing TRL
    ("train.top_kk", 5, "train.top_kk", "unknown key"),
    ("train.top_k", "5", "train.top_k", "GRPOConfig declares it int"),
    ("train.max_grad_norm", True, "train.max_grad_norm", "GRPOConfig declares it float"),
    ("train.seed", 3, "train.seed", "the top-level seed"),
]


@pytest.mark.parametrize(("key", "value", "named", "reason"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_params_name_the_key(key, value, named, reason):
    with pytest.raises(ParamsError) as error:
        parse_params(_set(SHIPPED, key, value))
    message = str(error.value)
    assert f": {named}" in message and reason in message, message


OVERLAP_REFUSED = [
    # (train key, value, what the message says): each makes the batch the overlap fetched ahead of a
    # step not the one that step trains on, or runs the overlap where it cannot
    ("use_vllm", False, "train.use_vllm: true"),
    ("vllm_mode", "colocate", "train.vllm_mode: server"),
    ("per_device_train_batch_size", 3, "whole groups"),  # 3 x 2 per process: no whole group of 8
    ("num_iterations", 2, "num_iterations at 1"),
    ("steps_per_generation", 4, "steps_per_generation unset"),  # one generation batch per two steps
    ("steps_per_generation", 1, "steps_per_generation unset"),  # two generation batches per step
    ("generation_batch_size", 32, "generation_batch_size unset"),  # twice the step's 8 x 2
    ("generation_batch_size", 8, "generation_batch_size unset"),  # half of it
]


@pytest.mark.parametrize(("key", "value", "reason"), OVERLAP_REFUSED,
                         ids=[f"{key}={value}" for key, value, _ in OVERLAP_REFUSED])
def test_overlapped_rollouts_refuse_what_they_cannot_schedule(key, value, reason):
    raw = _set(_set(SHIPPED, "train.vllm_mode", "server"), "train.rollout_overlap", 1)
    parse_params(raw)  # the server and one generation batch per step: accepted
    with pytest.raises(ParamsError) as error:
        parse_params(_set(raw, f"train.{key}", value))
    message = str(error.value)
    assert f": train.{key}: train.rollout_overlap: 1 " in message and reason in message, message


def test_overlapped_rollouts_run_with_several_processes_sending_whole_groups():
    raw = _set(_set(_set(SHIPPED, "train.vllm_mode", "server"), "train.rollout_overlap", 1), "train.num_processes", 2)
    assert parse_params(raw).train.num_processes == 2
    assert parse_params(_set(raw, "train.generation_batch_size", 32)).train.generation_batch_size == 32  # 16 x 2
    for key, value, named in [("generation_batch_size", 16, "generation_batch_size"),
                              ("per_device_train_batch_size", 2, "per_device_train_batch_size")]:  # 2 x 2 < 8
        with pytest.raises(ParamsError) as error:
            parse_params(_set(raw, f"train.{key}", value))
        assert f": train.{named}: train.rollout_overlap: 1 " in str(error.value), str(error.value)


@pytest.mark.parametrize(("key", "value"), [("generation_batch_size", 16), ("steps_per_generation", 2),
                                            ("num_iterations", 1), ("num_processes", 1)])
def test_overlapped_rollouts_accept_the_default_schedule_spelled_out(key, value):
    """The values the overlap needs, written out (8 x 2 completions per step): not refused."""
    raw = _set(_set(SHIPPED, "train.vllm_mode", "server"), "train.rollout_overlap", 1)
    assert getattr(parse_params(_set(raw, f"train.{key}", value)).train, key) == value


def test_a_quantized_base_needs_the_adapter_only_sync():
    raw = _set(SHIPPED, "model.quantization", "4bit")
    with pytest.raises(ParamsError) as error:
        parse_params(raw)  # the shipped merged sync
    message = str(error.value)
    assert ": train.vllm_weight_sync: model.quantization: 4bit " in message and "trl#3466" in message, message
    adapter = _set(_set(raw, "train.vllm_weight_sync", "adapter"), "train.vllm_enable_sleep_mode", False)
    assert parse_params(adapter).model.quantization == "4bit"
    assert parse_params(_set(raw, "train.use_vllm", False)).model.quantization == "4bit"  # transformers rollouts


FP8_REFUSED = [  # (train key, value, what the message says): fp8 samples from another policy than the trained one
    ("vllm_importance_sampling_correction", False, "importance-sampling correction"),
    ("use_vllm", False, "set train.use_vllm: true"),
]


@pytest.mark.parametrize(("key", "value", "reason"), FP8_REFUSED, ids=[key for key, _, _ in FP8_REFUSED])
def test_fp8_rollouts_need_vllm_and_the_importance_sampling_correction(key, value, reason):
    raw = _set(SHIPPED, "train.rollout_precision", "fp8")
    assert parse_params(raw).train.rollout_precision == "fp8"
    parse_params(_set(SHIPPED, f"train.{key}", value))  # accepted with bf16 rollouts
    with pytest.raises(ParamsError) as error:
        parse_params(_set(raw, f"train.{key}", value))
    message = str(error.value)
    assert f": train.{key}: train.rollout_precision: fp8 " in message and reason in message, message


@pytest.mark.parametrize(("key", "value", "named", "reason"), MALFORMED[:11], ids=[m[0] for m in MALFORMED[:11]])
def test_cli_exits_2_with_one_line_per_problem_and_no_heavy_import(tmp_path, key, value, named, reason):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_set(SHIPPED, key, value)))
    probe = ("import sys\nfrom pipeline.params import main\n"
             f"try: main([{str(bad)!r}])\n"
             "finally: print('HEAVY' if {'torch','transformers','vllm'} & set(sys.modules) else 'LIGHT')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == EXIT_BAD_PARAMS, result.stderr
    assert f": {named}" in result.stderr and reason in result.stderr
    assert result.stdout.strip() == "LIGHT"
    assert list(tmp_path.iterdir()) == [bad]  # touched nothing


def test_stage_entry_points_validate_before_anything_else(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_set(SHIPPED, "train.num_generations", 1)))
    for stage in ("prepare", "train", "evaluate", "publish"):
        result = subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], capture_output=True, text=True,
                                cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
        assert result.returncode == EXIT_BAD_PARAMS, (stage, result.stderr)
        assert "train.num_generations" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_invalid_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "params.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match="file not found"):
        load_params(tmp_path / "missing.yaml")


def test_override_of_unknown_key_is_rejected():
    with pytest.raises(ParamsError, match="unknown key"):
        apply_overrides(SHIPPED, {"train.lr": 1e-3})


def test_every_preset_goes_through_dvcs_override_grammar(tmp_path):
    """A run applies a preset with `dvc exp run -S key=value`: every value (lists, mappings such as
    data.eval_source) must come out in params.yaml as the preset says."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    from pipeline.params import apply_overrides, dvc_set_args, read_overrides

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}

    def run(*cmd: str) -> None:
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: 'true'\n    params: [data, train, lora, model]\n")
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "init")
    for preset in sorted((REPO / "presets").glob("*.yaml")):
        overrides = read_overrides(preset, [])
        run("dvc", "exp", "run", "-q", *(arg for item in dvc_set_args(overrides) for arg in ("-S", item)))
        expected = apply_overrides(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)
        assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == expected, preset.name
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")


def test_the_recipe_that_keeps_a_one_gpu_runs_learning_on_n_gpus():
    """docs/runs.md: gradient accumulation ÷ N on N processes learns from as many completions per step."""
    committed = yaml.safe_load(shipped_params_text())
    one = parse_params(apply_overrides(committed, read_overrides(REPO / "presets" / "gpu-fast.yaml", []))).train
    four = parse_params(apply_overrides(committed, read_overrides(
        REPO / "presets" / "gpu-fast.yaml", ["train.num_processes=4", "train.gradient_accumulation_steps=1"]))).train
    assert one.completions_per_step(one.processes(1)) == 16 == four.completions_per_step(four.processes(4))
    assert four.completions_per_step(four.processes(4)) != one.completions_per_step(4)  # N GPUs alone: 4 × more


def test_command_line_values_read_exponents_as_numbers():
    from pipeline.params import parse_value

    assert parse_value("1e-3") == 0.001 and parse_value("5E-6") == 5e-6 and parse_value("3") == 3
    assert parse_value("abc") == "abc" and parse_value("[1, 2]") == [1, 2] and parse_value("null") is None


def test_a_misspelt_train_key_is_named_where_trl_is_not_installed(monkeypatch):
    """Without TRL any `train:` key may be a GRPOConfig field, so a misspelt one cannot be called
    unknown: the required key it was meant to be is reported missing with the misspelt one named."""
    import pipeline.params

    monkeypatch.setattr(pipeline.params, "grpo_config_fields", lambda: None)
    raw = copy.deepcopy(SHIPPED)
    raw["train"]["learnin_rate"] = raw["train"].pop("learning_rate")
    with pytest.raises(ParamsError) as error:
        parse_params(raw)
    assert "params.yaml: train.learning_rate: missing (required; train.learnin_rate is there: misspelt?)" in str(
        error.value)
    with pytest.raises(ParamsError) as error:  # demo sets train.learning_rate: params.yaml is blamed, not the preset
        apply_overrides(raw, read_overrides(REPO / "presets" / "demo.yaml", []))
    assert str(error.value) == "params.yaml: train.learning_rate: missing; train.learnin_rate is there: misspelt?"
