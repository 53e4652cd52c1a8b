"""Server mode on CPU against a real vLLM server process: weights through a file, overlapped rollouts
(one step stale, corrected), resume after kill -9, a dead server as a named error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.rollout_server import wait_until_up

# one pytest-xdist worker runs this module's tests: they share its expensive module fixtures
pytestmark = pytest.mark.xdist_group("rollouts")

MODEL = "assets/embedded/tiny-qwen2_5_vl"
# a high learning rate moves the policy fast, so a server that lags it shows at once; no dropout
# (active in the trainer only, it would differ from vLLM by itself)
FAST = dict(train__vllm_mode="server", train__max_steps=4, train__per_device_train_batch_size=16,
            train__learning_rate=2e-2, train__warmup_steps=0, train__log_completions=False, lora__dropout=0.0,
            train__save_steps=2)


class Server:
    """`python -m pipeline.rollout_server` (what `make vllm-serve` runs) on a free port."""

    def __init__(self, root: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # one thread: the trainer runs next to it on the same two cores
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, "-m", "pipeline.rollout_server", "--model", MODEL,
                                         "--port", str(self.port), "--max-model-len", "1024"], cwd=root, env=env,
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.log = log
        wait_until_up(f"http://127.0.0.1:{self.port}", self.process, 300, log)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_root):
    root = tmp_path_factory.mktemp("server")
    (root / "assets").mkdir()
    (root / "assets" / "embedded").symlink_to(embedded_root)
    started = Server(root, root / "server.log")
    yield started
    started.kill()


def _history(ws, run_id: str) -> list[dict]:
    history = json.loads((ws.root / "outputs" / run_id / "train_logs" / "log_history.json").read_text())
    return [entry for entry in history if "reward" in entry]


def _train(ws, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=ws.root, env=env, **kwargs)


def test_the_cpu_server_follows_the_policy_through_a_file(workspace, server):
    """Synchronous server mode: the server reloads the merged weights the trainer writes each step,
    so its log-probs stay the trainer's while the policy moves fast (~2e-3 here; a server that
    kept the first weights would lag by ~0.1 after a step at this learning rate)."""
    ws = workspace("sync", train__vllm_server_port=server.port, **FAST)
    result = ws.run("pipeline.train")
    assert "server-mode weights through a file on CPU" in result.stderr
    steps = _history(ws, "sync")
    assert [entry["rollout/staleness"] for entry in steps] == [0, 0, 0, 0]
    differences = [entry["sampling/sampling_logp_difference/mean"] for entry in steps]
    assert max(differences) < 0.01, differences
    assert (ws.root / "outputs" / "sync" / "rollout_weights" / "model.safetensors").is_file()


def test_overlapped_rollouts_are_one_step_stale_corrected_and_resume_after_kill(workspace, server):
    """The server generates step t+1's rollout with step t's weights while step t trains; a run
    killed mid-way resumes from its checkpoint and generates the lost in-flight rollout again."""
    # the demo's learning rate: at FAST's, one step of staleness alone moves the log-probs past the
    # run's mismatch guard (train.max_logp_difference), which then stops it, as it should
    ws = workspace("over", train__vllm_server_port=server.port, train__rollout_overlap=1,
                   **{**FAST, "train__max_steps": 6, "train__learning_rate": 3e-3})
    ws.kill_train_at(ws.root / "outputs" / "over" / "checkpoints" / "checkpoint-4" / "trainer_state.json")
    assert not (ws.root / "outputs" / "over" / "adapter").exists()

    result = ws.run("pipeline.train")
    assert "resuming from" in result.stderr
    steps = _history(ws, "over")
    assert len(steps) == 6
    # steps 1-4 before the kill (the first synchronous), 5-6 after it: 5 regenerates what was in flight
    assert [entry["rollout/staleness"] for entry in steps] == [0, 1, 1, 1, 0, 1]
    assert not any("rollout/regenerated" in entry for entry in steps), "a rollout answered other prompts"
    for entry in steps:
        assert 0.0 <= entry["sampling/importance_sampling_masked_share"] <= 1.0
        assert entry["sampling/importance_sampling_ratio/mean"] > 0.0
        assert entry["rollout/seconds"] > 0.0
    assert (ws.root / "outputs" / "over" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_training_processes_overlap_each_with_its_own_requests(workspace, server):
    """DDP (2 gloo processes) with overlap: each process sends its own prompts to the one server from
    its own thread (no gather), every step after the first trains on a rollout one step stale, and
    all rollouts finish before the weights move and none starts until they have."""
    ws = workspace("over2", train__vllm_server_port=server.port, train__rollout_overlap=1, train__num_processes=2,
                   **{**FAST, "train__per_device_train_batch_size": 8, "train__learning_rate": 3e-3})
    result = ws.run("pipeline.train", timeout=900)
    assert "launching 2 processes" in result.stderr
    assert result.stderr.count("sends its own rollout requests") == 2  # one line per process
    steps = _history(ws, "over2")
    # TRL's gather on the rollout thread would hang or fail here: a collective beside the training thread's
    assert [entry["rollout/staleness"] for entry in steps] == [0, 1, 1, 1]
    assert not any("rollout/regenerated" in entry for entry in steps), "a rollout answered other prompts"
    for entry in steps:
        assert entry["sampling/importance_sampling_ratio/mean"] > 0.0 and entry["rollout/seconds"] > 0.0
    # the first step is synchronous: the server's weights are the trainer's (~5e-5); later ones one step stale
    assert steps[0]["sampling/sampling_logp_difference/mean"] < 1e-3
    assert (ws.root / "outputs" / "over2" / "adapter" / "adapter_model.safetensors").is_file()


def test_trls_server_client_cannot_push_weights_from_a_cpu(server):
    """compat's "server-mode weights through a file on CPU" is needed while this holds."""
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=f"http://127.0.0.1:{server.port}", connection_timeout=30)
    with pytest.raises(NotImplementedError, match="CUDA device"):
        client.init_communicator(device="cpu")


def test_vllm_cli_cannot_start_from_the_cpu_build():
    """compat's "vLLM's server module run directly by the CPU build" is needed while this holds."""
    from pipeline.compat import installed_version

    if installed_version("vllm") is None:
        pytest.skip("vLLM is not installed")
    result = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "No package metadata was found for vllm" in result.stderr


def test_the_server_command_is_trls_with_the_cpu_fixes():
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    from pipeline.rollout_server import server_command

    cpu = server_command("m", host="127.0.0.1", port=8123, gpu_memory_utilization=0.5, max_model_len=1024, gpu=False)
    assert cpu[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "m"]
    assert cpu[cpu.index("--dtype") + 1] == "float32"
    trls = build_command(ScriptArguments(model="m", host="127.0.0.1", port=8123, gpu_memory_utilization=0.5,
                                         max_model_len=1024))
    # everything else, the weight-transfer engine and the log-prob mode TRL's client relies on included
    expected = trls[5:]
    expected[expected.index("--dtype") + 1] = "float32"
    assert cpu[5:] == expected
    gpu = server_command("m", host="127.0.0.1", port=8123, gpu_memory_utilization=0.5, max_model_len=1024, gpu=True)
    assert gpu == trls
    fp8 = server_command("m", host="127.0.0.1", port=8123, gpu_memory_utilization=0.5, max_model_len=1024, gpu=True,
                         precision="fp8")
    assert fp8 == [*trls, "--quantization", "fp8_per_tensor"]  # vLLM quantizes the bf16 checkpoint at load


def test_the_trainer_refuses_a_server_at_another_precision(server):
    """The run reads the precision the server generates at from the server itself."""
    from pipeline.rollout_precision import PrecisionMismatch, check_server

    url = f"http://127.0.0.1:{server.port}"
    check_server(url, "bf16")  # the CPU server: the checkpoint's own weights
    with pytest.raises(PrecisionMismatch, match=r"runs at precision bf16 but train.rollout_precision is fp8: "
                                                r"restart it with `make vllm-serve PRECISION=fp8`"):
        check_server(url, "fp8")


@pytest.mark.parametrize(("mode", "masked_share"), [("sequence_mask", 1 / 3), ("token_mask", 2 / 6),
                                                    ("sequence_truncate", 1 / 3)])
def test_the_masked_share_counts_what_the_correction_cuts(mode, masked_share):
    """Three sequences of two tokens; one sequence's ratio (e^2) and two tokens' (e^1.2, e^-2.5) fall
    outside [0.1, 3]: the share logged next to TRL's importance-sampling ratios."""
    from types import SimpleNamespace

    import torch

    from pipeline.on_policy import MASKED_SHARE, importance_sampling

    trainer = SimpleNamespace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.1,
                              vllm_importance_sampling_clip_max=3.0,
                              accelerator=SimpleNamespace(gather=lambda tensor: tensor.reshape(1)))
    old = torch.tensor([[1.2, -1.2], [1.0, 1.0], [-2.5, 0.4]])
    sampled = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    ratio, metrics = importance_sampling(trainer, old, sampled, torch.ones(3, 2))
    assert metrics[MASKED_SHARE] == pytest.approx(masked_share)
    if mode == "sequence_mask":
        assert ratio.flatten().tolist() == pytest.approx([1.0, 0.0, float(torch.exp(torch.tensor(-2.1)))])


def test_a_server_that_dies_mid_run_is_a_named_error(workspace, server):
    """Killed while it generates the next step's rollout: the run stops with the server named,
    within seconds, and writes no adapter. Last in this file: it kills the module's server."""
    doomed = server
    ws = workspace("dies", train__vllm_server_port=doomed.port, train__rollout_overlap=1,
                   **{**FAST, "train__max_steps": 40, "train__learning_rate": 3e-3})
    log = ws.root / "train.log"
    process = _train(ws, stdout=subprocess.DEVNULL, stderr=log.open("w"))  # a file: a full pipe would block it
    try:
        first_checkpoint = ws.root / "outputs" / "dies" / "checkpoints" / "checkpoint-2"
        deadline = time.time() + 300
        while not first_checkpoint.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, log.read_text()[-3000:]
        doomed.kill()
        process.wait(timeout=120)  # not a hang
    finally:
        doomed.kill()
        if process.poll() is None:
            process.kill()
    stderr = log.read_text()
    assert process.returncode == 1, stderr[-3000:]
    assert f"train: error: the vLLM server at http://127.0.0.1:{doomed.port}" in stderr, stderr[-3000:]
    assert not (ws.root / "outputs" / "dies" / "adapter").exists()

