"""train stage: GRPO with a LoRA adapter through TRL's GRPOTrainer.

`build_grpo_config` and `build_lora_config` are the one place where params become library
configuration. Rollouts come from vLLM (colocate or server) when it is installed, else from
transformers `generate`; library workarounds live in pipeline/compat.py. The stage resumes from
the last complete checkpoint under outputs/<run_id>/checkpoints after a crash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import logs
from pipeline.modeling import cpu_vllm_environment, on_gpu, vllm_installed
from pipeline.params import Params, Reports, load_params_or_exit

logger = logging.getLogger("pipeline.train")

# LoRA on the language model only: `gate_proj`/`up_proj`/`down_proj` also name the vision tower's
# MLP, so a plain module list would train the vision tower too.
LANGUAGE_MODEL_PATTERN = r".*language_model\.layers\.\d+\.(?:self_attn|mlp)\.({modules})"


# Logged values that measure time: kept out of every DVC-tracked output (see `_dvclive`).
WALL_CLOCK = re.compile(r"runtime|per_second|^time/|step_time")


def lora_target_regex(modules: list[str]) -> str:
    return LANGUAGE_MODEL_PATTERN.format(modules="|".join(re.escape(m) for m in modules))


def run_dirs(params: Params) -> dict[str, Path]:
    root = params.output_dir
    return {
        "data": root / "data",
        "checkpoints": root / "checkpoints",
        "adapter": root / "adapter",
        "live": root / "train_logs",
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

    train = params.train
    generation_kwargs = {}
    if use_vllm and vision_token_ids:
        # a sampled vision token breaks the next forward pass; TRL suppresses them for transformers only
        generation_kwargs["logit_bias"] = {token: -100.0 for token in vision_token_ids}
    # the project's choices where params.yaml is silent (a `train:` key of the same name wins) …
    chosen = {
        "save_strategy": "steps", "num_completions_to_print": 2, "dataloader_num_workers": 0, "disable_tqdm": False,
        # every LoRA weight takes part in every forward (the frozen vision tower has none): DDP's
        # search for unused parameters, on by default without gradient checkpointing, only costs time
        "ddp_find_unused_parameters": False,
    }
    # … and what the machine decides: vLLM where it is installed, sleep mode on GPUs only
    machine = {"use_vllm": use_vllm, "vllm_enable_sleep_mode": train.vllm_enable_sleep_mode and gpu, "bf16": gpu}
    return GRPOConfig(
        **(chosen | train.grpo_kwargs() | machine),
        output_dir=str(run_dirs(params)["checkpoints"]),
        run_name=params.run_id,
        seed=params.seed,
        data_seed=params.seed,
        reward_weights=reward_weights,
        report_to=report_to,
        generation_kwargs=generation_kwargs or None,
    )


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


def is_main_process() -> bool:
    """Rank 0 of a launched job (or the only process): it alone writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


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


class TrainingDiverged(RuntimeError):
    pass


class RolloutMismatch(RuntimeError):
    """vLLM sampled from one context and the trainer scores another (docs/training.md, "Rollouts that match
    the policy")."""


_IMPORTED_AT = time.perf_counter()  # ≈ process start: the trainer's start-up time is measured from here


def _callbacks(train=None):
    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        """Step time and rollout throughput in the log; stop on a NaN/inf loss before it is saved, and
        when vLLM's and the trainer's log-probs disagree for train.max_logp_difference_steps logs running."""

        def __init__(self):
            self._last = (time.perf_counter(), 0.0)
            self._max_logp = (getattr(train, "max_logp_difference", None),
                              getattr(train, "max_logp_difference_steps", 1))
            self._logp_high: list[tuple[int, float]] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at step {state.global_step}: lower train.learning_rate or "
                                       "check the rewards; the last good checkpoint is kept")
            difference, (limit, steps) = logs.get("sampling/sampling_logp_difference/mean"), self._max_logp
            if difference is not None and limit is not None:
                high = float(difference) > limit or not math.isfinite(float(difference))
                self._logp_high = [*self._logp_high, (state.global_step, float(difference))] if high else []
                if len(self._logp_high) >= steps:
                    seen = ", ".join(f"{d:.3f} (step {s})" for s, d in self._logp_high[-steps:])
                    raise RolloutMismatch(
                        f"vLLM's and the trainer's log-probabilities differ by {seen}, above "
                        f"train.max_logp_difference {limit} for {steps} logged steps in a row: the trainer scores "
                        "completions on inputs vLLM did not sample them from (docs/training.md, 'Rollouts that "
                        "match the policy'); the last good checkpoint is kept")
            if not is_main_process():  # every rank checks the guards above; one prints the line
                return
            now, tokens = time.perf_counter(), float(logs.get("num_tokens", 0.0))
            elapsed = now - self._last[0]
            rate = (tokens - self._last[1]) / elapsed if elapsed > 0 else 0.0
            self._last = (now, tokens)
            logger.info("step %d/%d  loss %.4f  reward %.3f  step time %.2f s  %.0f tokens/s",
                        state.global_step, state.max_steps, loss, float(logs.get("reward", float("nan"))),
                        float(logs.get("step_time", elapsed)), rate)

    return [ProgressLog()]


def _phase_times(trainer):
    """Each optimizer step's time per phase (`time/vLLM.generate`, `time/sync_weights`,
    `time/_prepare_inputs` = rollout + rewards, …) and `time/startup`, logged like TRL's own metrics
    (averaged per logging interval), so W&B, DVC plots and log_history.json show where a step goes."""
    from transformers import TrainerCallback

    from pipeline import compat

    seconds = compat.capture_trl_phase_times()
    metrics = trainer._metrics["train"]  # TRL's per-interval metrics: GRPOTrainer.log averages them

    class PhaseTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seconds.clear()
            metrics["time/startup"].append(time.perf_counter() - _IMPORTED_AT)
            logger.info("trainer ready %.1f s after start (model load, vLLM engine)", metrics["time/startup"][-1])

        def on_step_end(self, args, state, control, **kwargs):
            for phase, total in seconds.items():
                metrics[f"time/{phase}"].append(total)
            seconds.clear()

    return PhaseTimes()


def _dvclive(live_dir: Path, resume: bool):
    """DVC plots through dvclive, configured so it never rewrites dvc.yaml (STACK.md). The training
    curves and their last values go to `reports/train/` (Reports.train_curves), the stage's plots and
    metrics, hashed in dvc.lock and committed with each experiment, so they hold no wall-clock value
    (two identical runs must hash alike) nor the run's arguments; step and phase times go to the
    run's log folder (`live_dir`)."""
    if not is_main_process():
        return [], []
    live_dir.mkdir(parents=True, exist_ok=True)
    try:
        from dvclive import Live
        from dvclive.huggingface import DVCLiveCallback
    except ImportError:  # minimal environments (e.g. the GPU benchmark's); the container has it
        logger.warning("dvclive is not installed: no DVC plots for this run")
        return [], []

    class Selected(DVCLiveCallback):
        def __init__(self, live, timings: bool):
            super().__init__(live=live, log_model=None)
            self._timings = timings

        def on_train_begin(self, args, state, control, **kwargs):
            if self._timings:  # the arguments (paths, a dated logging_dir) stay out of the reports
                super().on_train_begin(args, state, control, **kwargs)

        def on_log(self, args, state, control, **kwargs):
            logs = {key: value for key, value in (kwargs.pop("logs", None) or {}).items()
                    if bool(WALL_CLOCK.search(key)) == self._timings}
            if logs:
                super().on_log(args, state, control, logs=logs, **kwargs)

    lives = [Live(dir=str(folder), dvcyaml=False, save_dvc_exp=False, report=None, resume=resume)
             for folder in (Reports.train_curves, live_dir)]
    return lives, [Selected(lives[0], timings=False), Selected(lives[1], timings=True)]


def train(params: Params) -> Path:
    from datasets import load_dataset
    from trl import GRPOTrainer

    from pipeline import adapter_sync, compat, modeling, on_policy
    from pipeline.rewards import resolve_rewards

    dirs = run_dirs(params)
    train_file = dirs["data"] / "train.parquet"
    if not train_file.is_file():
        raise SystemExit(f"train: error: {train_file} not found; run the prepare stage first (dvc repro prepare)")

    gpu = on_gpu()
    use_vllm = params.train.use_vllm and vllm_installed()
    if params.train.use_vllm and not use_vllm:
        logger.warning("vLLM is not installed: rollouts use transformers generate (slower)")
    if use_vllm and not gpu:
        cpu_vllm_environment()
        compat.use_fp32_vllm_on_cpu()
        if params.train.vllm_enable_sleep_mode:
            logger.info("vLLM sleep mode is a GPU feature: running without it on this CPU machine")
    adapter_only = use_vllm and params.train.vllm_weight_sync == "adapter"
    if adapter_only:
        adapter_sync.enable_lora_in_engine(params.lora.r, params.lora.target_modules)

    reward_funcs, reward_weights = resolve_rewards(params.rewards)
    reward_funcs = [guarded(func) for func in reward_funcs]
    resume = prepare_checkpoint_dir(dirs["checkpoints"], run_fingerprint(params, train_file))
    processor = modeling.load_processor(params.model.name_or_path, params.model.revision)
    compat.left_pad_for_grpo(processor)  # TRL aligns image markers with left-padded prompts only (trl#5785)
    started = time.perf_counter()
    model = modeling.load_model(params.model.name_or_path, params.model.revision, params.model.dtype,
                                params.model.attn_implementation)
    logger.info("model loaded in %.1f s", time.perf_counter() - started)
    dataset = load_dataset("parquet", data_files=str(train_file), split="train")

    report_to = configure_tracking(params)
    config = build_grpo_config(params, gpu=gpu, use_vllm=use_vllm, report_to=report_to,
                               reward_weights=reward_weights,
                               vision_token_ids=modeling.vision_token_ids(processor.tokenizer))
    lives, plot_callbacks = _dvclive(dirs["live"], resume is not None)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=build_lora_config(params),
        callbacks=[*plot_callbacks, *_callbacks(params.train)],
    )
    logger.info("trainer ready in %.1f s (the colocated vLLM engine's start included)", time.perf_counter() - started)
    compat.patch_vllm_colocate(trainer, on_gpu=gpu, reload_merged_weights=not adapter_only)
    policy_adapter = adapter_sync.attach(trainer) if adapter_only else None
    on_policy.reuse_loss_forward(trainer)
    compat.keep_frozen_vision_out_of_backward(trainer.model)
    trainer.add_callback(_phase_times(trainer))
    if params.train.log_completions and "wandb" in report_to:
        compat.patch_completions_table()

    if resume:
        logger.info("resuming from %s", resume)
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
        _save_adapter(trainer, dirs["adapter"])
        if is_main_process():
            (dirs["checkpoints"] / COMPLETE).write_text(f"{trainer.state.global_step}\n")
    finally:
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


def main() -> None:
    params = load_params_or_exit()
    logs.configure()
    import torch

    if LAUNCHED_ENV not in os.environ:
        processes = training_processes(params, torch.cuda.device_count())  # no CUDA context yet; ROCm too
        if processes > 1:
            raise SystemExit(relaunch_distributed(params, processes))

    from pipeline.modeling import ModelNotAvailableError

    try:
        train(params)
        if torch.distributed.is_initialized():  # a launched worker: leave the process group cleanly
            torch.distributed.destroy_process_group()
    except ModelNotAvailableError as error:
        raise SystemExit(f"train: error: {error}") from None
    except (RewardFunctionError, TrainingDiverged, RolloutMismatch) as error:
        raise SystemExit(f"train: error: {error}") from None
    except torch.OutOfMemoryError as error:
        raise SystemExit(
            f"train: error: out of GPU memory ({str(error).splitlines()[0]}). Lower "
            "train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), "
            "train.max_completion_length or train.vllm_gpu_memory_utilization; checkpoints so far are kept."
        ) from None


if __name__ == "__main__":
    main()
