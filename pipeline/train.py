"""train stage: GRPO with a LoRA adapter through TRL's GRPOTrainer.

`build_grpo_config` and `build_lora_config` are the one place where params become library
configuration. Rollouts come from vLLM (colocate or server) when it is installed, else from
transformers `generate`; library workarounds are entries of `compat.WORKAROUNDS`, applied at
four points by `compat.apply`. The stage resumes from
the last complete checkpoint under outputs/<run_id>/checkpoints after a crash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import callbacks, logs
from pipeline.callbacks import RolloutMismatch, TrainingDiverged, is_main_process
from pipeline.modeling import cpu_vllm_environment, on_gpu, vllm_installed
from pipeline.params import Params, load_params_or_exit

logger = logging.getLogger("pipeline.train")

# LoRA on the language model only: `gate_proj`/`up_proj`/`down_proj` also name the vision tower's
# MLP, so a plain module list would train the vision tower too.
LANGUAGE_MODEL_PATTERN = r".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.({modules})"


def lora_target_regex(modules: list[str]) -> str:
    return LANGUAGE_MODEL_PATTERN.format(modules="|".join(re.escape(m) for m in modules))


def run_dirs(params: Params) -> dict[str, Path]:
    root = params.output_dir
    return {
        "data": root / "data",
        "checkpoints": root / "checkpoints",
        "adapter": root / "adapter",
        "live": root / "train_logs",
        "rollout_weights": root / "rollout_weights",  # server mode on CPU: the weights the server reloads
    }


def configure_tracking(params: Params) -> list[str]:
    """W&B offline without an API key (sync later with `wandb sync`), never a login prompt."""
    mode = params.tracking.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode == "disabled":
        return []
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_PROJECT"] = params.tracking.wandb_project
    os.environ["WANDB_DIR"] = str(params.output_dir.resolve())  # the run's files stay with the run
    os.environ.setdefault("WANDB_SILENT", "true")
    return ["wandb"]


def build_lora_config(params: Params):
    from peft import LoraConfig

    return LoraConfig(
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=lora_target_regex(params.lora.target_modules),
        task_type="CAUSAL_LM",
    )


def build_grpo_config(params: Params, *, gpu: bool, use_vllm: bool, report_to: list[str],
                      reward_weights: list[float], vision_token_ids: list[int]):
    """`train:` goes to GRPOConfig as it is (params.yaml states every TRL default that changed between
    releases); what is added here comes from elsewhere: the run, the machine, the rewards."""
    from trl import GRPOConfig

    from pipeline import compat

    train = params.train
    generation_kwargs: dict = {}
    compat.apply("config", on_gpu=gpu, use_vllm=use_vllm, vision_token_ids=vision_token_ids,
                 generation_kwargs=generation_kwargs)
    # the project's choices where params.yaml is silent (a `train:` key of the same name wins) …
    chosen = {
        "save_strategy": "steps", "num_completions_to_print": 2, "dataloader_num_workers": 0, "disable_tqdm": False,
        # every LoRA weight takes part in every forward (the frozen vision tower has none): DDP's
        # search for unused parameters, on by default without gradient checkpointing, only costs time
        "ddp_find_unused_parameters": False,
    }
    # … and what the machine decides: vLLM where it is installed, sleep mode on GPUs only
    machine = {"use_vllm": use_vllm, "vllm_enable_sleep_mode": train.vllm_enable_sleep_mode and gpu, "bf16": gpu}
    config = GRPOConfig(
        **(chosen | train.grpo_kwargs() | machine),
        output_dir=str(run_dirs(params)["checkpoints"]),
        run_name=params.run_id,
        seed=params.seed,
        data_seed=params.seed,
        reward_weights=reward_weights,
        report_to=report_to,
        generation_kwargs=generation_kwargs or None,
    )
    # With bf16 off, transformers takes the precision from ACCELERATE_MIXED_PRECISION, which `accelerate
    # launch` sets from its config file (bf16 in configs/accelerate/): a CPU run launched that way would
    # train under bf16 autocast while the same run relaunched by the stage trains in fp32
    config.mixed_precision = "bf16" if gpu else "no"
    return config


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    """The newest checkpoint that finished writing: a crash mid-save leaves no trainer_state.json."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = []
    for path in checkpoint_dir.glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and (path / "trainer_state.json").is_file():
            candidates.append((int(step), path))
    return str(max(candidates)[1]) if candidates else None


def _model_identity(name_or_path: str, revision: str) -> list:
    """A local checkpoint by its files' names, sizes and mtimes (hashing 16 GB would take minutes)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return [name_or_path, revision]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]


def run_fingerprint(params: Params, train_file: Path) -> str:
    """What a checkpoint must match to be resumed: every training input, code and data included."""
    digest = hashlib.sha256()
    relevant = params.model_dump(include={"seed", "model", "train", "lora", "rewards"})
    relevant["train"].pop("log_completions", None)
    relevant["model_files"] = _model_identity(params.model.name_or_path, params.model.revision)
    digest.update(json.dumps(relevant, sort_keys=True).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    with train_file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


COMPLETE = "COMPLETE"  # written after a successful run: its checkpoints are not to be resumed


def prepare_checkpoint_dir(checkpoint_dir: Path, fingerprint: str) -> str | None:
    """Resume only an interrupted run of this exact configuration; anything else starts afresh."""
    stamp = checkpoint_dir / "FINGERPRINT"
    stale = checkpoint_dir.exists() and (
        not stamp.exists() or stamp.read_text().strip() != fingerprint or (checkpoint_dir / COMPLETE).exists())
    if not is_main_process():
        return None if stale else last_complete_checkpoint(checkpoint_dir)
    if stale:
        logger.info("checkpoints in %s belong to a finished run or other inputs: starting afresh", checkpoint_dir)
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    return last_complete_checkpoint(checkpoint_dir)


class RewardFunctionError(RuntimeError):
    pass


def guarded(func):
    """Name the reward that raised (TRL's traceback would not say which one nor on what input)."""
    name = getattr(func, "__name__", repr(func))

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as error:
            raise RewardFunctionError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error

    return wrapper


def train(params: Params) -> Path:
    from datasets import load_dataset
    from trl import GRPOTrainer

    from pipeline import adapter_sync, compat, modeling, on_policy, rollout_precision, rollouts
    from pipeline.rewards import resolve_rewards

    gpu = on_gpu()
    use_vllm = params.train.use_vllm and vllm_installed()
    precision = params.train.rollout_precision
    rollout_precision.refuse_without_a_gpu(precision, gpu=gpu, use_vllm=use_vllm)
    dirs = run_dirs(params)
    train_file = dirs["data"] / "train.parquet"
    if not train_file.is_file():
        raise SystemExit(f"train: error: {train_file} not found; run the prepare stage first (dvc repro prepare)")

    if params.train.use_vllm and not use_vllm:
        logger.warning("vLLM is not installed: rollouts use transformers generate (slower)")
    if use_vllm and not gpu:
        cpu_vllm_environment()
        if params.train.vllm_enable_sleep_mode:
            logger.info("vLLM sleep mode is a GPU feature: running without it on this CPU machine")
    colocated = use_vllm and params.train.vllm_mode == "colocate"
    adapter_only = use_vllm and params.train.vllm_weight_sync == "adapter"
    if adapter_only:
        adapter_sync.enable_lora_in_engine(params.lora.r, params.lora.target_modules)
    if colocated:
        compat.add_vllm_engine_options(**rollout_precision.engine_options(precision))
    compat.apply("engine", on_gpu=gpu, use_vllm=use_vllm, vllm_mode=params.train.vllm_mode,
                 weights_dir=dirs["rollout_weights"])

    reward_funcs, reward_weights = resolve_rewards(params.rewards)
    reward_funcs = [guarded(func) for func in reward_funcs]
    resume = prepare_checkpoint_dir(dirs["checkpoints"], run_fingerprint(params, train_file))
    processor = modeling.load_processor(params.model.name_or_path, params.model.revision)
    compat.apply("processor", on_gpu=gpu, processor=processor)
    started = time.perf_counter()
    model = modeling.load_model(params.model.name_or_path, params.model.revision, params.model.dtype,
                                params.model.attn_implementation, params.model.quantization)
    if params.model.quantization != "none":
        model = modeling.prepare_for_kbit_training(model, params.train.gradient_checkpointing)
    logger.info("model loaded in %.1f s", time.perf_counter() - started)
    dataset = load_dataset("parquet", data_files=str(train_file), split="train")

    report_to = configure_tracking(params)
    config = build_grpo_config(params, gpu=gpu, use_vllm=use_vllm, report_to=report_to,
                               reward_weights=reward_weights,
                               vision_token_ids=modeling.vision_token_ids(processor.tokenizer))
    lives, plot_callbacks = callbacks.dvclive(dirs["live"], resume is not None)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=build_lora_config(params),
        callbacks=[*plot_callbacks, *callbacks.progress_and_guards(params.train)],
    )
    logger.info("trainer ready in %.1f s (the colocated vLLM engine's start included)", time.perf_counter() - started)
    compat.apply("trainer", on_gpu=gpu, trainer=trainer, adapter_only=adapter_only,
                 wandb_completions=params.train.log_completions and "wandb" in report_to)
    if colocated:
        rollout_precision.check_engine(trainer.vllm_generation.llm, precision)
        if precision != "bf16" and not adapter_only:
            rollout_precision.ReloadingSync(trainer.vllm_generation)
    if use_vllm and params.train.vllm_mode == "server" and is_main_process():
        rollout_precision.check_server(trainer.vllm_generation.vllm_client.base_url, precision)
    policy_adapter = adapter_sync.attach(trainer) if adapter_only else None
    on_policy.reuse_loss_forward(trainer)
    server_rollouts = rollouts.attach(trainer, overlap=params.train.rollout_overlap,
                                      timeout=params.train.rollout_timeout)
    trainer.add_callback(callbacks.phase_times(trainer))

    if resume:
        logger.info("resuming from %s", resume)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
        _save_adapter(trainer, dirs["adapter"])
        if is_main_process():
            (dirs["checkpoints"] / COMPLETE).write_text(f"{trainer.state.global_step}\n")
    finally:
        if server_rollouts is not None:
            server_rollouts.close()
        compat.shutdown_vllm(trainer)
        if policy_adapter is not None:
            policy_adapter.close()
        if is_main_process():
            dirs["live"].mkdir(parents=True, exist_ok=True)
            (dirs["live"] / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        for live in lives:
            live.end()
    if is_main_process():
        logger.info("trained %d steps in %.1f s; adapter in %s", trainer.state.global_step,
                    time.perf_counter() - started, dirs["adapter"])
    return dirs["adapter"]


def _save_adapter(trainer, adapter_dir: Path) -> None:
    """Every process calls this: under FSDP the adapter's weights are sharded and gathering them is
    a collective, which `Trainer.save_model` does before the main process writes. The adapter
    (safetensors, adapter config, processor files) goes to a temporary folder that is renamed, so
    a crash never leaves a half adapter behind."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    if is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle of the run's paths: not the adapter's
        shutil.rmtree(adapter_dir, ignore_errors=True)
        os.replace(tmp, adapter_dir)


LAUNCHED_ENV = "GRPO_LAUNCHED_BY_ACCELERATE"  # set for the workers: they must train, not launch again


def training_processes(params: Params, visible_gpus: int) -> int:
    """How many training processes to start, checked before anything is loaded: TRL refuses one
    process that sees several GPUs (it would wrap the model in nn.DataParallel)."""
    train = params.train
    processes = train.processes(visible_gpus)
    if processes == 1 and visible_gpus > 1:
        raise SystemExit(f"train: error: train.num_processes is 1 but {visible_gpus} GPUs are visible, and TRL's "
                         "GRPOTrainer cannot use several GPUs from one process. Set train.num_processes: auto (one "
                         "process per GPU) or pick one GPU (make train GPUS=0, or CUDA_VISIBLE_DEVICES / "
                         "HIP_VISIBLE_DEVICES)")
    if 0 < visible_gpus < processes:
        raise SystemExit(f"train: error: train.num_processes is {processes} but only {visible_gpus} GPUs are visible")
    return processes  # whole GRPO groups per batch: checked with the params (one process's batch holds them)


def relaunch_distributed(params: Params, processes: int) -> int:
    """Run this module in N processes on an existing launcher.

    GPUs: `accelerate launch` with train.accelerate_config (DDP or FSDP2). CPU machines:
    torchrun with accelerate's CPU mode (gloo), so the distributed path is exercised without a GPU
    (accelerate's own --cpu launcher starts a single process)."""
    n = str(processes)
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if on_gpu():
        if not Path(params.train.accelerate_config).is_file():
            raise SystemExit(f"train: error: train.accelerate_config {params.train.accelerate_config!r} not found "
                             "(see configs/accelerate/)")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", params.train.accelerate_config,
               "--num_processes", n, "-m", "pipeline.train"]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--module", "pipeline.train"]
    logger.info("launching %s processes: %s", n, " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode


def ephemeral_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def main() -> None:
    params = load_params_or_exit()
    logs.configure()
    import torch

    if LAUNCHED_ENV not in os.environ:
        processes = training_processes(params, torch.cuda.device_count())  # no CUDA context yet; ROCm too
        if processes > 1:
            raise SystemExit(relaunch_distributed(params, processes))
        # One process: its colocated vLLM still opens a torch.distributed store on MASTER_PORT. Unset,
        # accelerate 1.15 (state.py, CPU) fills it with 29500 and TRL 1.16 (ensure_master_addr_port)
        # tries 29500, 23456, … in order, so two runs starting together on one machine (DVC's queue
        # with JOBS=2, parallel tests) took the same port and one died with EADDRINUSE. A port the OS
        # hands out is chosen first; a MASTER_PORT the user set is kept.
        if not os.environ.get("MASTER_PORT"):
            os.environ.setdefault("MASTER_ADDR", "localhost")
            os.environ["MASTER_PORT"] = str(ephemeral_port())

    from pipeline.modeling import ModelNotAvailableError
    from pipeline.rollouts import RolloutServerError

    try:
        train(params)
        if torch.distributed.is_initialized():  # a launched worker: leave the process group cleanly
            torch.distributed.destroy_process_group()
    except ModelNotAvailableError as error:
        raise SystemExit(f"train: error: {error}") from None
    except (RewardFunctionError, TrainingDiverged, RolloutMismatch) as error:
        raise SystemExit(f"train: error: {error}") from None
    except RolloutServerError as error:
        # the stage has cleaned up (its `finally`); what is left is TRL's client retrying the gone server
        # for ~60 s in its worker threads, which a normal exit would wait for: leave them
        print(f"train: error: {error}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)
    except torch.OutOfMemoryError as error:
        raise SystemExit(
            f"train: error: out of GPU memory ({str(error).splitlines()[0]}). Lower "
            "train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), "
            "train.max_completion_length or train.vllm_gpu_memory_utilization; checkpoints so far are kept."
        ) from None


if __name__ == "__main__":
    main()
