"""The train stage: config mapping, LoRA targets, every rollout mode on CPU, resume, 2 processes, errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, demo_params

from pipeline.params import parse_params

TINY_KINDS = ("tiny-qwen2_5_vl", "tiny-qwen3_vl")


def _metric_series(ws, name: str) -> list[float]:
    """A metric's values per step, read from the training curves (DVC plots) of the last run."""
    files = list((ws.root / "reports" / "train" / "plots" / "metrics").rglob(f"{name}.tsv"))
    assert files, f"no dvclive series {name!r}"
    with files[0].open() as f:
        return [float(row[name.split("/")[-1]]) for row in csv.DictReader(f, delimiter="\t")]


def _adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_grpo_config_states_our_values_explicitly(monkeypatch):
    from pipeline.train import build_grpo_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` with our configs sets
    params = parse_params(demo_params("cfg"))
    config = build_grpo_config(params, gpu=False, use_vllm=True, report_to=[], reward_weights=[0.5, 0.5, 0.5, 2.0],
                               vision_token_ids=[7, 8])
    train = params.train
    assert (config.learning_rate, config.max_steps, config.num_generations) == (
        train.learning_rate, train.max_steps, train.num_generations)
    assert config.per_device_train_batch_size == train.per_device_train_batch_size
    assert config.max_completion_length == train.max_completion_length
    assert (config.beta, config.epsilon, config.loss_type, config.scale_rewards) == (0.0, 0.2, "dapo", "group")
    assert (config.temperature, config.top_p, config.seed) == (1.0, 1.0, params.seed)
    assert config.reward_weights == [0.5, 0.5, 0.5, 2.0]
    assert config.save_steps == train.save_steps and config.save_total_limit == train.save_total_limit
    assert config.output_dir == "outputs/cfg/checkpoints" and config.run_name == "cfg"
    assert not config.bf16 and config.mixed_precision == "no"  # fp32 on CPU, however it was launched
    assert config.vllm_mode == "colocate" and not config.vllm_enable_sleep_mode  # no sleep mode on CPU
    assert config.generation_kwargs["logit_bias"] == {7: -100.0, 8: -100.0}
    assert config.vllm_gpu_memory_utilization == train.vllm_gpu_memory_utilization


def test_a_grpo_config_knob_is_one_line_in_params_yaml(tmp_path):
    """`train.top_k` is in no schema of this project: one line under `train:` in params.yaml puts it
    in the GRPOConfig the stage builds."""
    from pipeline.params import load_params
    from pipeline.train import build_grpo_config

    lines = (REPO / "params.yaml").read_text().splitlines()
    at = lines.index("train:") + 1
    (tmp_path / "params.yaml").write_text("\n".join([*lines[:at], "  top_k: 7", *lines[at:]]) + "\n")
    params = load_params(tmp_path / "params.yaml")
    config = build_grpo_config(params, gpu=False, use_vllm=True, report_to=[], reward_weights=[1.0] * 4,
                               vision_token_ids=[])
    assert config.top_k == 7
    assert build_grpo_config(load_params(REPO / "params.yaml"), gpu=False, use_vllm=True, report_to=[],
                             reward_weights=[1.0] * 4, vision_token_ids=[]).top_k != 7


def test_lora_targets_only_the_language_model(tiny_model_dir):
    from peft import get_peft_model

    from pipeline import modeling
    from pipeline.train import build_lora_config

    params = parse_params(demo_params("lora", lora__target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                    "down_proj"]))
    model = modeling.load_model(str(tiny_model_dir))
    vision_mlp = [n for n, _ in model.named_modules() if "visual" in n and n.endswith("gate_proj")]
    assert vision_mlp, "the vision tower has gate_proj modules: a plain name list would hit them"
    peft_model = get_peft_model(model, build_lora_config(params))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    layers = model.config.text_config.num_hidden_layers
    assert len(adapted) == layers * 5
    assert all("language_model" in n and "visual" not in n for n in adapted)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)


def _adapter_grads(model_dir: Path, fix: bool) -> tuple[bool, dict]:
    """One forward + backward of a LoRA model prepared as TRL does for gradient checkpointing."""
    import torch
    from peft import get_peft_model
    from PIL import Image

    from pipeline import compat, modeling
    from pipeline.train import build_lora_config

    torch.manual_seed(0)
    peft_model = get_peft_model(modeling.load_model(str(model_dir)), build_lora_config(parse_params(demo_params("g"))))
    peft_model.enable_input_require_grads()
    if fix:
        assert compat.keep_frozen_vision_out_of_backward(peft_model)
        # Trainer.train() and each TRL rollout enable checkpointing again, which re-adds the hooks
        peft_model.gradient_checkpointing_enable()
        peft_model.gradient_checkpointing_enable()
    processor = modeling.load_processor(str(model_dir))
    seen = {}
    peft_model.base_model.model.model.visual.register_forward_hook(
        lambda module, args, output: seen.update(vision=output.pooler_output.requires_grad))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 48), "red")], return_tensors="pt")
    peft_model(**inputs).logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return seen["vision"], grads


def test_frozen_vision_tower_stays_out_of_the_backward_pass(tiny_model_dir):
    """compat.keep_frozen_vision_out_of_backward: same adapter gradients, no backward through the
    vision tower. The first assert fails once transformers stops hooking Qwen2.5-VL's patch_embed:
    then drop the workaround."""
    import torch

    vision_in_graph, expected = _adapter_grads(tiny_model_dir, fix=False)
    assert vision_in_graph, "transformers no longer makes the frozen vision tower require grad"
    vision_in_graph, grads = _adapter_grads(tiny_model_dir, fix=True)
    assert not vision_in_graph
    assert grads.keys() == expected.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], msg=name)


@pytest.mark.parametrize("model", TINY_KINDS)
def test_transformers_rollouts_train_and_log(workspace, model):
    ws = workspace("hf", model__name_or_path=f"assets/embedded/{model}", train__use_vllm=False,
                   train__max_steps=2, train__save_steps=1, train__gradient_checkpointing=True)
    result = ws.run("pipeline.train")
    assert ("frozen vision tower" in result.stderr) == (model == "tiny-qwen2_5_vl")
    run = ws.root / "outputs" / "hf"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert len(_metric_series(ws, "reward")) == 2
    assert (run / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.parametrize("model", TINY_KINDS)
def test_vllm_colocate_rollouts_agree_with_the_trainer(workspace, model):
    """TRL's sampling_logp_difference is the signal that vLLM and the trainer see the same prompt and
    weights: ~5e-5 before any update with the fixes; ~0.4 with doubly expanded image placeholders."""
    ws = workspace("vl", model__name_or_path=f"assets/embedded/{model}", train__max_steps=2)
    result = ws.run("pipeline.train")
    assert "collapse image placeholders" in result.stderr
    differences = _metric_series(ws, "sampling/sampling_logp_difference/mean")
    assert differences[0] < 0.01, differences
    # float32 on both sides (compat: "vLLM on CPU computes in float32"); ~3e-3 with vLLM in bfloat16
    assert differences[0] < 5e-4, differences
    assert (ws.root / "outputs" / "vl" / "adapter" / "adapter_model.safetensors").is_file()
    _assert_phase_split(ws, "vl")


ADAPTER_SYNC = dict(train__vllm_weight_sync="adapter", train__vllm_enable_sleep_mode=False, train__max_steps=4,
                    train__learning_rate=2e-2, train__warmup_steps=0, train__log_completions=False,
                    lora__dropout=0.0)  # dropout, active in the trainer only, would differ from vLLM by itself


def test_adapter_only_sync_keeps_vllm_on_the_policy(workspace):
    """vLLM serves the base weights plus the policy's LoRA adapter, sent alone each step: its
    log-probs stay the trainer's while the adapter moves (a high learning rate moves it fast)."""
    ws = workspace("lora", **ADAPTER_SYNC)
    result = ws.run("pipeline.train")
    assert "weight sync: the LoRA adapter only" in result.stderr
    assert "adapter-only sync probe: vLLM serves the adapter" in result.stderr  # checked at engine start
    assert "full weight reload" not in result.stderr
    differences = _metric_series(ws, "sampling/sampling_logp_difference/mean")
    assert len(differences) == 4 and max(differences) < 0.01, differences
    _assert_phase_split(ws, "lora")


@pytest.mark.parametrize("kind", ["tiny-qwen2_5_vl", "tiny-qwen3_vl"])
def test_a_4bit_base_quantizes_the_language_model_only(embedded_root, kind):
    """NF4 for the language model's layers; the frozen vision tower and the LM head stay in the
    model's dtype (the tower's features stay the checkpoint's, the log-probs come from full weights)."""
    import bitsandbytes as bnb

    from pipeline import modeling

    model = modeling.load_model(str(embedded_root / kind), quantization="4bit")
    quantized = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert quantized and all(name.startswith("model.language_model.layers.") for name in quantized), quantized
    assert model.is_loaded_in_4bit and model.lm_head.weight.dtype == modeling.resolve_dtype("auto")


def test_a_4bit_base_trains_on_the_samplers_policy(workspace):
    """QLoRA (model.quantization: 4bit) with the adapter-only sync: bitsandbytes' NF4 base in the
    trainer, vLLM loaded once with that base dequantized, the adapter sent each step. The per-step
    log-prob gap stays below 0.01, the unquantized adapter-sync run's bound (measured 6e-4 to 2.5e-3
    here; a bf16 trainer against vLLM's float32 is 3e-3 to 8e-3)."""
    ws = workspace("qlora", **ADAPTER_SYNC, model__quantization="4bit")
    result = ws.run("pipeline.train")
    assert "vLLM's base weights: the trainer's 4-bit base, dequantized" in result.stderr
    assert "adapter-only sync probe: vLLM serves the adapter" in result.stderr
    differences = _metric_series(ws, "sampling/sampling_logp_difference/mean")
    assert len(differences) == 4 and max(differences) < 0.01, differences
    from safetensors.torch import load_file

    weights = load_file(ws.root / "outputs" / "qlora" / "adapter" / "adapter_model.safetensors")
    assert weights and all(t.is_floating_point() for t in weights.values())  # an ordinary LoRA adapter


def test_a_4bit_base_against_the_checkpoints_weights_is_refused_at_start(workspace):
    """The control: vLLM left on the checkpoint's unquantized weights samples from another policy than
    the 4-bit trainer's (0.31 per token under the probe adapter, against 0.003 with the dequantized
    base); the start-up probe refuses it before the first step."""
    ws = workspace("qlora-raw", **ADAPTER_SYNC, model__quantization="4bit")
    result = _run_with(ws, "from pipeline import rollout_precision; rollout_precision.reload_weights = "
                           "lambda llm, weights: None")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "train: error: train.vllm_weight_sync: adapter: vLLM serves neither the base model nor the adapter" \
        in result.stderr, result.stderr[-3000:]


def _shipped_lora_logp_differences(workspace, run_id: str, **overrides) -> list[float]:
    ws = workspace(run_id, train__max_steps=3, train__per_device_train_batch_size=32, train__learning_rate=2e-2,
                   train__warmup_steps=0, train__log_completions=False, **overrides)
    ws.run("pipeline.train")
    return _metric_series(ws, "sampling/sampling_logp_difference/mean")


def test_the_shipped_lora_settings_keep_the_trainer_on_the_samplers_policy(workspace):
    """The shipped LoRA settings (lora.dropout as params.yaml has it), with a learning rate that moves
    the adapter fast: the trainer's log-probs, which the importance-sampling correction and the guard
    compare with vLLM's, stay at the no-dropout level at every step. vLLM never applies dropout; with
    dropout 0.05 they part from the second step (0.03-0.07 on this model; below 2e-4 without)."""
    differences = _shipped_lora_logp_differences(workspace, "shipped")
    assert len(differences) == 3 and max(differences) < 0.01, differences


def test_without_the_adapter_sync_vllm_drifts_from_the_policy(workspace):
    """The control for the test above: the same run with the sync switched off drifts (log-prob
    differences of 0.6 to 6 from the second step on CPU)."""
    ws = workspace("stale", **{**ADAPTER_SYNC, "train__max_steps": 6})  # the guard needs 3 bad steps in a row
    # the start-up probe would refuse this engine at once (see the test below); switched off, the guard is left
    result = _run_with(ws, "from pipeline import adapter_sync; adapter_sync.AdapterSync.sync = lambda self: None; "
                           "adapter_sync.check = lambda result, targets: None")
    # the run's own guard (train.max_logp_difference) stops it once vLLM lags the policy
    assert result.returncode == 1, result.stderr[-3000:]
    assert "vLLM's and the trainer's log-probabilities differ by" in result.stderr


def test_adapter_only_sync_refuses_an_engine_that_serves_the_base_model(workspace):
    """vLLM's LoRA target filter set to a module the adapter does not have (`o_proj` for a q/v
    adapter): vLLM loads the adapter without error and serves the base model. The start-up probe
    sees it and the stage stops with the cause named, before the first step."""
    ws = workspace("nolora", **{**ADAPTER_SYNC, "lora__target_modules": ["q_proj", "v_proj"]})
    result = _run_with(ws, "from pipeline import adapter_sync as a; options = a.engine_lora_options; "
                           "a.engine_lora_options = lambda rank, targets: options(rank, ['o_proj'])")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "train: error: train.vllm_weight_sync: adapter: vLLM serves the base model" in result.stderr, \
        result.stderr[-3000:]
    assert "lora_target_modules=['o_proj']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (ws.root / "outputs" / "nolora" / "checkpoints" / "checkpoint-1").exists()


def test_the_adapter_probe_benchmark_runs_on_cpu(embedded_root, tmp_path):
    """bench/bench_adapter_probe.py, which the GPU runs on real shapes, on the tiny Qwen3-VL: vLLM with
    the synced probe adapter gives the trainer's log-probs (float32: within 0.01) and not the base's."""
    import json

    out = tmp_path / "probe.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench_adapter_probe.py"), "--model",
                             str(embedded_root / "tiny-qwen3_vl"), "--filters", "own", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [case] = json.loads(out.read_text())
    assert case["verdict"] == "starts" and case["applied"], case
    assert case["to_trainer"] < 0.01 and case["to_base"] > 0.1 and case["shift"] > 0.1, case
    assert "qkv_proj" in case["engine_filter"] and "| tiny-qwen3_vl | float32 | own:" in result.stdout


def _run_with(ws, patch: str):
    """The train stage with one line of Python run first (a patch for a comparison run)."""
    (ws.root / "run_patched.py").write_text(f"import sys\n{patch}\nimport pipeline.train as t; sys.argv = ['train']; "
                                            "t.main()\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "run_patched.py"], cwd=ws.root, env=env, capture_output=True, text=True,
                          timeout=600)


def test_on_policy_steps_reuse_the_loss_forward_with_the_same_loss_and_gradients(workspace):
    """TRL's separate old-log-prob forward, skipped on-policy: the same losses and the same adapter
    after two steps (four micro-batches each, the second step's rollouts from updated weights)."""
    common = dict(train__max_steps=2, train__per_device_train_batch_size=16, train__gradient_accumulation_steps=4,
                  train__learning_rate=2e-2, train__warmup_steps=0, train__log_completions=False, lora__dropout=0.0)
    reused = workspace("reuse", **common)
    result = reused.run("pipeline.train")
    assert "the loss forward gives the old log-probs" in result.stderr
    separate = workspace("separate", **common)
    result = _run_with(separate, "from pipeline import on_policy; on_policy.applies = lambda trainer: False")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the loss forward gives the old log-probs" not in result.stderr
    from pipeline.on_policy import SAMPLING_METRICS

    for key in ("loss", *SAMPLING_METRICS):  # the extremes too: over the whole generation batch, as TRL's
        a, b = _metric_series(reused, key), _metric_series(separate, key)
        assert len(a) == len(b) == 2, (key, a, b)
        assert all(abs(x - y) <= 1e-4 + 1e-3 * abs(y) for x, y in zip(a, b, strict=True)), (key, a, b)
    a = _adapter_tensors(reused.root / "outputs" / "reuse" / "adapter")
    b = _adapter_tensors(separate.root / "outputs" / "separate" / "adapter")
    assert a.keys() == b.keys()
    assert max(b[name].abs().max().item() for name in b if "lora_B" in name) > 1e-3  # LoRA's B left zero: trained
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


def _assert_phase_split(ws, run_id: str) -> None:
    """Each step's time is split into phases (rollout, weight sync, the rest) in log_history.json."""
    import json

    history = json.loads((ws.root / "outputs" / run_id / "train_logs" / "log_history.json").read_text())
    steps = [entry for entry in history if "step_time" in entry]
    assert steps and steps[0]["time/startup"] > 0
    assert all("time/startup" not in entry for entry in steps[1:])
    for entry in steps:
        generate, prepare = entry["time/vLLM.generate"], entry["time/_prepare_inputs"]
        assert 0 < generate <= prepare <= entry["step_time"] * 1.01, entry
        assert entry["time/sync_weights"] > 0 or entry is steps[0], entry


def test_double_image_expansion_workaround_is_still_needed(workspace):
    """Fails once TRL stops expanding image placeholders twice: then drop compat.collapse_image_pads."""
    ws = workspace("nofix", train__max_steps=1)
    result = _run_with(ws, _without("_collapse_image_pads_before_vllm"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _metric_series(ws, "sampling/sampling_logp_difference/mean")[0] > 0.1


def test_resume_after_kill_gives_the_same_adapter(workspace):
    # 16 completions a step (2 prompts): the resumed steps' data order and RNG are what is checked, not the volume
    common = dict(train__use_vllm=False, train__max_steps=4, train__save_steps=2, train__per_device_train_batch_size=16,
                  train__log_completions=False)
    straight = workspace("straight", **common)
    straight.run("pipeline.train")

    crashed = workspace("crashed", **common)
    crashed.kill_train_at(crashed.root / "outputs" / "crashed" / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    assert not (crashed.root / "outputs" / "crashed" / "adapter").exists()
    result = crashed.run("pipeline.train")
    assert "resuming from" in result.stderr
    a = _adapter_tensors(straight.root / "outputs" / "straight" / "adapter")
    b = _adapter_tensors(crashed.root / "outputs" / "crashed" / "adapter")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


def test_two_processes_through_accelerate(workspace):
    ws = workspace("ddp", train__use_vllm=False, train__max_steps=2, train__num_processes=2,
                   train__per_device_train_batch_size=8, train__log_completions=False)
    result = ws.run("pipeline.train", timeout=900)
    assert "launching 2 processes" in result.stderr
    adapter = ws.root / "outputs" / "ddp" / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {f.name for f in adapter.iterdir()}
    assert not (adapter / "training_args.bin").exists()  # the adapter holds no pickle of the run's paths
    assert result.stderr.count("trained 2 steps") == 1  # one process reports
    assert "find_unused_parameters=True" not in result.stderr  # DDP does not search the graph every step
    assert "destroy_process_group() was not called" not in result.stderr
    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu  # `make bench-gpu` splits the start-up from these lines

    split = bench_gpu.startup_split(result.stderr)
    assert split["model_load_s"] > 0 and split["trainer_ready_s"] >= split["model_load_s"]

    import torch

    # docs/training.md's multi-node recipe, launched for real: two machine ranks of one process each on
    # this host (MAIN_ADDR=127.0.0.1, gloo): the adapter is the one node's 2-process run's, bit for bit
    nodes = workspace("nodes", train__use_vllm=False, train__max_steps=2, train__num_processes=2,
                      train__per_device_train_batch_size=8, train__log_completions=False)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ranks = [subprocess.Popen(["bash", "-c", command], cwd=nodes.root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for command in _multinode_commands(machines=2, processes_per_machine=1)]
    outputs = [rank.communicate(timeout=900)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    a, b = _adapter_tensors(adapter), _adapter_tensors(nodes.root / "outputs" / "nodes" / "adapter")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_reward_that_raises_is_named_and_nothing_is_saved(workspace):
    ws = workspace("boom", train__use_vllm=False, train__max_steps=2,
                   rewards={"strict_format": 1.0, "my_rewards:broken": 1.0})
    (ws.root / "my_rewards.py").write_text("def broken(completions, **kwargs):\n    raise ValueError('no luck')\n")
    result = ws.run("pipeline.train", check=False)
    assert result.returncode != 0
    assert "reward function 'broken' raised ValueError: no luck" in result.stderr
    assert not (ws.root / "outputs" / "boom" / "adapter").exists()


def test_model_not_available_offline_fails_fast(workspace):
    ws = workspace("nomodel", model__name_or_path="Qwen/Qwen2.5-VL-7B-Instruct")
    result = ws.run("pipeline.train", check=False, extra_env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "model 'Qwen/Qwen2.5-VL-7B-Instruct' is not available on this machine" in result.stderr


def test_checkpoints_of_other_parameters_are_not_resumed(tmp_path):
    from pipeline.train import prepare_checkpoint_dir

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-6").mkdir()  # half written: no trainer_state.json
    (checkpoints / "FINGERPRINT").write_text("same\n")
    assert prepare_checkpoint_dir(checkpoints, "same").endswith("checkpoint-4")
    assert prepare_checkpoint_dir(checkpoints, "other") is None
    assert not (checkpoints / "checkpoint-4").exists()
    # a finished run's checkpoints are never resumed: a rerun (code or model changed) trains afresh
    (checkpoints / "checkpoint-8").mkdir()
    (checkpoints / "checkpoint-8" / "trainer_state.json").write_text("{}")
    (checkpoints / "COMPLETE").write_text("8\n")
    assert prepare_checkpoint_dir(checkpoints, "other") is None and not (checkpoints / "checkpoint-8").exists()


def test_fingerprint_follows_code_model_and_data(tmp_path, tiny_model_dir):
    import os

    from pipeline.train import run_fingerprint

    data = tmp_path / "train.parquet"
    data.write_bytes(b"rows")
    params = parse_params(demo_params("fp", model__name_or_path=str(tiny_model_dir)))
    first = run_fingerprint(params, data)
    assert run_fingerprint(params, data) == first
    data.write_bytes(b"other rows")
    assert run_fingerprint(params, data) != first
    data.write_bytes(b"rows")
    config = tiny_model_dir / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        assert run_fingerprint(params, data) != first
    finally:
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize(("setting", "gpus", "expected"), [("auto", 0, 1), ("auto", 1, 1), ("auto", 8, 8),
                                                            (2, 0, 2), (2, 2, 2)])
def test_training_processes_default_to_every_visible_gpu(setting, gpus, expected):
    from pipeline.train import training_processes

    assert training_processes(parse_params(demo_params("np", train__num_processes=setting)), gpus) == expected


@pytest.mark.parametrize(("setting", "gpus", "message"), [
    (1, 2, "train.num_processes is 1 but 2 GPUs are visible"),
    (4, 2, "train.num_processes is 4 but only 2 GPUs are visible"),
])
def test_training_processes_refuse_what_trl_cannot_run(setting, gpus, message):
    from pipeline.train import training_processes

    with pytest.raises(SystemExit, match=message):
        training_processes(parse_params(demo_params("np", train__num_processes=setting)), gpus)


def _multinode_commands(machines: int, processes_per_machine: int) -> list[str]:
    """docs/training.md's recipe, one shell command per machine rank, for this host: node 0 at
    127.0.0.1 on a free port, the process count for `machines` × `processes_per_machine`, the repo's
    accelerate config, and on a machine without GPUs accelerate's CPU mode (gloo)."""
    import re
    import socket

    import torch

    doc = (REPO / "docs" / "training.md").read_text()
    block = re.search(r"<!-- multinode-recipe -->\n```bash\n(.*?)```\n<!-- /multinode-recipe -->", doc, re.S).group(1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    block = (block.replace("--num_processes 16", f"--num_processes {machines * processes_per_machine}")
             .replace("--main_process_port 29500", f"--main_process_port {port}")
             .replace("configs/accelerate/", f"{REPO}/configs/accelerate/")
             .replace("accelerate launch", f"{sys.executable} -m accelerate.commands.launch"))
    cpu = "" if torch.cuda.is_available() else "export ACCELERATE_USE_CPU=true\n"
    return [f"{cpu}NODE_RANK={rank} MAIN_ADDR=127.0.0.1\n{block}" for rank in range(machines)]


def test_the_documented_multinode_recipe_parses_and_agrees_with_the_stage():
    """docs/training.md's 2 × 8 GPU recipe, read by accelerate's own launch parser."""
    import re
    import shlex

    from accelerate.commands.launch import launch_command_parser

    from pipeline.train import LAUNCHED_ENV

    doc = (REPO / "docs" / "training.md").read_text()
    block = re.search(r"<!-- multinode-recipe -->\n```bash\n(.*?)```\n<!-- /multinode-recipe -->", doc, re.S).group(1)
    assert f"export {LAUNCHED_ENV}=1" in block
    command = block[block.index("accelerate launch"):].replace("\\\n", " ")
    for rank in (0, 1):
        words = shlex.split(command.replace("$NODE_RANK", str(rank)).replace("$MAIN_ADDR", "node0.example.invalid"))
        args = launch_command_parser().parse_args(words[2:])
        assert (REPO / args.config_file).is_file() and args.module and args.training_script == "pipeline.train"
        assert args.num_machines == 2 and args.machine_rank == rank < args.num_machines
        assert args.num_processes == 8 * args.num_machines and args.main_process_port == 29500


def _without(fix_name: str) -> str:
    """A line for `_run_with`: the train stage without one workaround of compat.WORKAROUNDS."""
    return (f"from pipeline import compat; compat.WORKAROUNDS = [w for w in compat.WORKAROUNDS "
            f"if getattr(w.fix, '__name__', '') != {fix_name!r}]")


def test_vllm_on_cpu_without_a_dtype_samples_from_another_policy(workspace):
    """Fails once TRL gives its colocated engine the model's dtype (or vLLM's CPU backend keeps
    float32): then drop the entry "vLLM on CPU computes in float32". Before any update the two
    policies are the same weights: ~5e-5 apart in float32 on both sides, ~3e-3 with vLLM in bfloat16."""
    unfixed = workspace("bf16", train__max_steps=1, train__log_completions=False)
    result = _run_with(unfixed, _without("use_fp32_vllm_on_cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    # with the workaround: below 5e-4 (test_vllm_colocate_rollouts_agree_with_the_trainer)
    assert _metric_series(unfixed, "sampling/sampling_logp_difference/mean")[0] > 5e-4


def test_trls_per_tensor_weight_load_fails_on_vllm_cpu(workspace):
    """Fails once TRL's own weight sync works on vLLM's CPU backend: then drop the entry "full
    weight reload on vLLM's CPU backend"."""
    ws = workspace("tensorwise", train__max_steps=2, train__log_completions=False)
    result = _run_with(ws, _without("_full_weight_reload_on_cpu"))
    assert result.returncode != 0
    assert "weight_loader" in result.stderr, result.stderr[-3000:]


def test_weights_reach_lora_wrapped_layers_of_vllm_0_24(monkeypatch):
    """vLLM 0.24 (the GPU pin) loads a LoRA-enabled engine's weights only under the wrapped layers'
    names; the renaming follows the engine's own parameter names (these are a LoRA-enabled
    Qwen2.5-VL engine's) and its packing of shards. vLLM 0.31 takes the names as they are."""
    from types import SimpleNamespace

    import vllm

    from pipeline.rollout_precision import under_lora_wrappers

    names = ["language_model.model.layers.0.self_attn.qkv_proj.base_layer.weight",
             "language_model.model.layers.0.self_attn.qkv_proj.base_layer.bias",
             "language_model.model.layers.0.mlp.gate_up_proj.base_layer.weight",
             "language_model.model.layers.0.input_layernorm.weight", "visual.blocks.0.attn.qkv.weight"]
    model = SimpleNamespace(named_parameters=lambda: [(name, None) for name in names],
                            packed_modules_mapping={"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                    "gate_up_proj": ["gate_proj", "up_proj"]})
    runner = SimpleNamespace(get_model=lambda: model)
    llm = SimpleNamespace(llm_engine=SimpleNamespace(model_executor=SimpleNamespace(
        driver_worker=SimpleNamespace(model_runner=runner))))
    trainer = ["model.language_model.layers.0.self_attn.k_proj.weight",
               "model.language_model.layers.0.self_attn.q_proj.bias",
               "model.language_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.down_proj.weight",
               "model.language_model.layers.0.input_layernorm.weight", "model.visual.blocks.0.attn.qkv.weight"]
    monkeypatch.setattr(vllm, "__version__", "0.24.0")
    assert [name for name, _ in under_lora_wrappers(llm, [(n, None) for n in trainer])] == [
        "model.language_model.layers.0.self_attn.k_proj.base_layer.weight",
        "model.language_model.layers.0.self_attn.q_proj.base_layer.bias",
        "model.language_model.layers.0.mlp.up_proj.base_layer.weight",
        "model.language_model.layers.0.mlp.down_proj.weight",  # not wrapped in this engine
        "model.language_model.layers.0.input_layernorm.weight", "model.visual.blocks.0.attn.qkv.weight"]
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    assert [name for name, _ in under_lora_wrappers(llm, [(n, None) for n in trainer])] == trainer
