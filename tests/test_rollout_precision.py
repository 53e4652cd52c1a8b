"""FP8 rollouts (`train.rollout_precision: fp8`) on a machine without a GPU: what can be checked
without the FP8 kernels. The params' refusals are in test_params.py, the server's precision check
and command in test_rollouts.py; the merged sync that re-quantizes on GPUs (`ReloadingSync`) is the
one the CPU backend's colocated runs use (test_train.py's vLLM tests). The kernels themselves run in
`make bench-gpu CONFIGS=B-tuned,B-fp8,…` (docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import demo_params

from pipeline import rollout_precision

REPO = Path(__file__).resolve().parents[1]


def test_each_precision_maps_to_one_vllm_option_for_the_engine_and_the_server():
    assert rollout_precision.engine_options("bf16") == {"quantization": None}  # never TRL's bitsandbytes
    assert rollout_precision.server_arguments("bf16") == []
    assert rollout_precision.engine_options("fp8") == {"quantization": "fp8_per_tensor"}
    assert rollout_precision.server_arguments("fp8") == ["--quantization", "fp8_per_tensor"]
    # the server's own config names its method; the trainer maps it back to a precision
    assert rollout_precision.server_precision({"model_config": {"quantization": None}}) == "bf16"
    assert rollout_precision.server_precision({"model_config": {"quantization": "fp8_per_tensor"}}) == "fp8"
    assert rollout_precision.server_precision({"model_config": {"quantization": "awq"}}) == "awq"


def test_the_cpu_build_of_vllm_cannot_generate_in_fp8(embedded_root):
    """Why the train stage refuses fp8 here: vLLM's CPU build knows the method but has no kernel for it
    (and float32, the CPU runs' dtype, is not a dtype it quantizes from). Once this fails, the CPU build
    runs FP8 and the refusal can go."""
    from pipeline.compat import installed_version

    if installed_version("vllm") is None:
        pytest.skip("vLLM is not installed")
    probe = (
        "from pipeline import modeling, rollout_precision\n"
        "modeling.cpu_vllm_environment()\n"
        "from vllm import LLM\n"
        f"LLM(model={str(embedded_root / 'tiny-qwen2_5_vl')!r}, dtype='bfloat16', max_model_len=512,\n"
        "    limit_mm_per_prompt={'image': 1}, **rollout_precision.engine_options('fp8'))\n"
        "print('FP8 ENGINE STARTED')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode != 0 and "FP8 ENGINE STARTED" not in result.stdout
    assert "fp8_quant" in result.stderr, result.stderr[-3000:]  # the missing kernel, not another failure


def test_the_train_stage_refuses_fp8_on_a_cpu_before_touching_the_run(tmp_path, embedded_root):
    from conftest import Workspace

    ws = Workspace(tmp_path, embedded_root)
    ws.write_params(demo_params("fp8", train__rollout_precision="fp8"))
    result = ws.run("pipeline.train", timeout=300, check=False)
    assert result.returncode != 0
    assert "train.rollout_precision: fp8 needs a GPU" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()  # refused before any output was made


def test_the_rollout_server_refuses_fp8_on_a_cpu():
    result = subprocess.run([sys.executable, "-m", "pipeline.rollout_server", "--model", "m", "--precision", "fp8"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2 and "--precision fp8 needs a GPU" in result.stderr, result.stderr[-2000:]


def test_the_engine_options_win_over_trls_own_arguments(monkeypatch):
    """TRL 1.16 passes `quantization=None` to its colocated `vllm.LLM` explicitly: an option added
    as a `functools.partial` keyword lost to it, and an fp8 run generated in bf16 with no error."""
    from trl.generation import vllm_generation

    from pipeline import compat

    built = []
    monkeypatch.setattr(vllm_generation, "LLM", lambda *args, **kwargs: built.append(kwargs))  # records the call
    compat.add_vllm_engine_options(**rollout_precision.engine_options("fp8"))
    compat.add_vllm_engine_options(enable_lora=True)
    vllm_generation.LLM(model="m", quantization=None, seed=0)  # as TRL calls it
    assert built == [{"model": "m", "quantization": "fp8_per_tensor", "seed": 0, "enable_lora": True}]


def test_the_stage_refuses_an_engine_built_at_another_precision():
    class Engine:  # the attribute path the check reads on a `vllm.LLM`
        def __init__(self, quantization):
            self.llm_engine = type("E", (), {"model_config": type("C", (), {"quantization": quantization})})

    rollout_precision.check_engine(Engine("fp8_per_tensor"), "fp8")
    rollout_precision.check_engine(Engine(None), "bf16")
    with pytest.raises(rollout_precision.PrecisionMismatch, match="train.rollout_precision is fp8 but the colocated "
                                                                  "vLLM engine was built with quantization None"):
        rollout_precision.check_engine(Engine(None), "fp8")
