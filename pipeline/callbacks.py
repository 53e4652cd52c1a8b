"""The train stage's callbacks: progress and guards (a NaN loss, rollouts off the policy), the
per-step phase times, and DVC plots through dvclive."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path

from pipeline.params import Reports

logger = logging.getLogger("pipeline.train")

# Logged values that measure time: kept out of every DVC-tracked output (see `_dvclive`).
WALL_CLOCK = re.compile(r"runtime|per_second|^time/|step_time")


def is_main_process() -> bool:
    """Rank 0 of a launched job (or the only process): it alone writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


class TrainingDiverged(RuntimeError):
    pass


class RolloutMismatch(RuntimeError):
    """vLLM sampled from one context and the trainer scores another (docs/training.md, "Rollouts that match
    the policy")."""


# TRL times its phases (vLLM.generate, sync_weights, _prepare_inputs, compute_loss, each reward)
# but sends the timings only to W&B, MLflow or Trackio, one call at a time. We add them up here so
# the trainer can log a per-step split to every logger, log_history.json and DVC plots included.
_PHASE_SECONDS: dict[str, float] = {}


def capture_trl_phase_times() -> dict[str, float]:
    """Hook TRL's profiling contexts (once); returns the dict they add seconds to, by phase name."""
    from trl.extras import profiling

    cls = profiling.ProfilingContext
    if not getattr(cls, "_grpo_captures_phases", False):
        original = cls._log_metrics

        def _log_metrics(self, duration: float) -> None:
            phase = self.name.split(".", 1)[-1]  # "GRPOTrainer.vLLM.generate" -> "vLLM.generate"
            _PHASE_SECONDS[phase] = _PHASE_SECONDS.get(phase, 0.0) + duration
            original(self, duration)

        cls._log_metrics = _log_metrics
        cls._grpo_captures_phases = True
    return _PHASE_SECONDS


_IMPORTED_AT = time.perf_counter()  # ≈ process start: the trainer's start-up time is measured from here


def progress_and_guards(train=None):
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


def phase_times(trainer):
    """Each optimizer step's time per phase (`time/vLLM.generate`, `time/sync_weights`,
    `time/_prepare_inputs` = rollout + rewards, …) and `time/startup`, logged like TRL's own metrics
    (averaged per logging interval), so W&B, DVC plots and log_history.json show where a step goes."""
    from transformers import TrainerCallback

    seconds = capture_trl_phase_times()
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


def dvclive(live_dir: Path, resume: bool):
    """DVC plots through dvclive, configured so it never rewrites dvc.yaml (docs/training.md). The training
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
