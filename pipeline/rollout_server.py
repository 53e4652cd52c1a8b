"""vLLM server for `train.vllm_mode: server`: TRL's own server command, on GPUs and on CPUs.

`make vllm-serve` runs this. The command is TRL's (`trl.scripts.vllm_serve.build_command`: the
flags its client relies on: weight-transfer engine, processed log-probs, multimodal endpoints),
with the project's workarounds applied (`compat.apply("server", …)`): on a CPU machine the vLLM CPU
build runs it in float32, like the trainer, and weights reach it through a file (see
`compat.WORKAROUNDS`).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import compat, logs, rollout_precision
from pipeline.modeling import cpu_vllm_environment, on_gpu


def server_command(model: str, *, host: str, port: int, gpu_memory_utilization: float,
                   max_model_len: int | None, gpu: bool, enforce_eager: bool = False,
                   precision: str = "bf16") -> list[str]:
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    command = build_command(ScriptArguments(model=model, host=host, port=port, max_model_len=max_model_len,
                                            gpu_memory_utilization=gpu_memory_utilization,
                                            enforce_eager=enforce_eager),
                            extra_args=rollout_precision.server_arguments(precision))
    compat.apply("server", on_gpu=gpu, command=command)
    return command


def wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: Path) -> float:
    """Seconds until the server at `url` answers /health; SystemExit naming its log if it exits first
    or does not answer within `timeout` (a first start compiles: minutes on big models)."""
    import requests

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"the vLLM server exited with {process.returncode}; see {log}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit(f"the vLLM server did not answer within {timeout:g} s; see {log}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rollout_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Hub id or local folder: the folder the run trains from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile nor CUDA graphs: starts faster, decodes slower")
    parser.add_argument("--precision", choices=sorted(rollout_precision.QUANTIZATION), default="bf16",
                        help="the weights it generates from: the run's train.rollout_precision (fp8: GPU only)")
    args = parser.parse_args(argv)
    logs.configure()
    gpu = on_gpu()
    if args.precision != "bf16" and not gpu:
        parser.error(f"--precision {args.precision} needs a GPU: vLLM's CPU build has no FP8 kernels")
    if not gpu:
        cpu_vllm_environment()
    command = server_command(args.model, host=args.host, port=args.port,
                             gpu_memory_utilization=args.gpu_memory_utilization,
                             max_model_len=args.max_model_len, gpu=gpu, enforce_eager=args.enforce_eager,
                             precision=args.precision)
    # the weight-transfer, cache-reset and collective-RPC endpoints live behind vLLM's dev mode
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    logging.getLogger("pipeline.rollout_server").info(
        "starting the vLLM server on http://%s:%s (its start-up lines show with LOG_LEVEL=info)", args.host, args.port)
    sys.stdout.flush()
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
