"""pipeline/on_policy.py on tensors: the `sampling/*` metrics are TRL's, over the whole generation
batch, whatever the number of micro-batches the loss sees it in."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest

from pipeline import on_policy

ROWS, TOKENS = 16, 12
MODES = [("sequence_mask", None, 3.0), ("sequence_truncate", 0.5, 3.0), ("token_mask", 0.5, 2.0),
         ("token_truncate", None, 2.0)]


def _batch(seed: int = 0) -> dict:
    """A generation batch whose rows disagree with the sampler by very different amounts (a few far
    off, as a stale or mismatched sampler gives): completions of unequal lengths, and some tokens
    vLLM did not score (NaN)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, TOKENS + 1, (ROWS,), generator=generator)
    mask = (torch.arange(TOKENS)[None, :] < lengths[:, None]).float()
    sampling = -torch.rand(ROWS, TOKENS, generator=generator) * 3
    scale, bias = torch.full((ROWS, 1), 0.02), torch.zeros(ROWS, 1)
    scale[[1, 6, 11]] = torch.tensor([[0.6], [0.9], [0.4]])  # spread over the micro-batches
    bias[[1, 6, 13]] = torch.tensor([[0.4], [-0.3], [0.3]])
    trainer_logps = sampling + bias + torch.randn(ROWS, TOKENS, generator=generator) * scale
    sampling[3, 1] = sampling[9, 0] = float("nan")
    return {"trainer_logps": trainer_logps, "sampling": sampling, "mask": mask}


def trl_metrics(old, sampling, completion_mask, mode, low, high) -> dict[str, float]:
    """TRL 1.16.0's own computation over one generation batch on one process, as written in
    `GRPOTrainer._generate_and_score_completions` (grpo_trainer.py, the importance-sampling ratio and
    the `sampling/*` metrics), kept apart from pipeline/on_policy.py on purpose."""
    import torch
    from trl.trainer.utils import nanmax, nanmin

    per_token_logps_diff = torch.nan_to_num((old - sampling) * completion_mask, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=low, max=high)
    else:
        ratio = ratio.masked_fill((ratio < (low if low is not None else -math.inf))
                                  | (ratio > (high if high is not None else math.inf)), value=0.0)
    delta = torch.abs(old - sampling)
    mask = completion_mask.bool()
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[mask]
    return {
        "sampling/sampling_logp_difference/mean": torch.mean(delta).item(),
        "sampling/sampling_logp_difference/max": torch.max(delta).item(),
        "sampling/importance_sampling_ratio/min": nanmin(torch.min(flat).reshape(1)).item(),
        "sampling/importance_sampling_ratio/mean": torch.mean(flat).reshape(1).nanmean().item(),
        "sampling/importance_sampling_ratio/max": nanmax(torch.max(flat).reshape(1)).item(),
    }, ratio


class FakeTrainer:
    """The GRPOTrainer attributes and methods reuse_loss_forward patches and calls, on tensors: the
    "model" gives each row's fixed log-probs (row index in input_ids' first column)."""

    def __init__(self, batch: dict, accumulation: int, mode: str, low, high):
        self.batch = batch
        self.args = SimpleNamespace(steps_per_generation=accumulation, gradient_accumulation_steps=accumulation)
        self.num_iterations, self.use_vllm, self.vllm_importance_sampling_correction = 1, True, True
        self.beta, self.loss_type = 0.0, "dapo"
        self.vllm_importance_sampling_mode = mode
        self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max = low, high
        self.accelerator = SimpleNamespace(gather=lambda tensor: tensor.reshape(1))
        self.model = SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.loss_ratios = []

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self.batch["trainer_logps"][input_ids[:, 0]].clone().requires_grad_(), None, None

    def _generate_and_score_completions(self, inputs):
        """As TRL: the old-log-prob forward (the patch skips it), metrics and ratio from its output."""
        import torch

        rows = torch.arange(ROWS)
        old = self._get_per_token_logps_and_entropies(None, rows[:, None], None, TOKENS)[0]
        metrics, ratio = trl_metrics(old, self.batch["sampling"], self.batch["mask"],
                                     self.vllm_importance_sampling_mode, self.vllm_importance_sampling_clip_min,
                                     self.vllm_importance_sampling_clip_max)
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
        return {"input_ids": rows[:, None], "completion_mask": self.batch["mask"],
                "sampling_per_token_logps": self.batch["sampling"], "old_per_token_logps": old,
                "importance_sampling_ratio": ratio}

    def _compute_loss(self, model, inputs):
        logps = self._get_per_token_logps_and_entropies(model, inputs["input_ids"], None, TOKENS)[0]
        self.loss_ratios.append((inputs["input_ids"][:, 0], inputs["importance_sampling_ratio"]))
        return (logps * inputs["importance_sampling_ratio"]).sum()


def _logged_over_one_step(trainer: FakeTrainer, accumulation: int) -> dict[str, float]:
    """One optimizer step as TRL runs it (generate, shuffle, split into micro-batches, one loss each),
    then the value `GRPOTrainer.log` reports for each metric (the mean of what was appended)."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    batch = shuffle_sequence_dict(trainer._generate_and_score_completions({}))
    for micro in split_tensor_dict(batch, accumulation):
        trainer._compute_loss(None, micro)
    return {key: sum(values) / len(values) for key, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("accumulation", [1, 2, 4])
@pytest.mark.parametrize(("mode", "low", "high"), MODES, ids=[m[0] for m in MODES])
def test_sampling_metrics_are_trls_over_the_whole_generation_batch(accumulation, mode, low, high):
    """The min and max of the ratio, the largest logp difference and the means, logged once per
    generation batch over all of its rows: with per-micro-batch values TRL's log() would average the
    micro-batches' extremes (for accumulation 2 here, ratio max 2.0 would show as ~1.5)."""
    import torch

    batch = _batch()
    expected, ratio = trl_metrics(batch["trainer_logps"], batch["sampling"], batch["mask"], mode, low, high)
    trainer = FakeTrainer(batch, accumulation, mode, low, high)
    assert on_policy.reuse_loss_forward(trainer)
    logged = _logged_over_one_step(trainer, accumulation)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, logged[key], value)
        assert len(trainer._metrics["train"][key]) == 1, key  # one value per generation batch, as TRL
    # the loss of each micro-batch is weighted by the whole batch's ratio, row by row
    for rows, used in trainer.loss_ratios:
        torch.testing.assert_close(used, ratio[rows])
    # the masked share: sequences (tokens) whose unclipped ratio lies outside [low, high]
    diff = torch.nan_to_num((batch["trainer_logps"] - batch["sampling"]) * batch["mask"], nan=0.0)
    raw = diff.sum(-1).exp() if mode.startswith("sequence") else diff.exp()[batch["mask"].bool()]
    outside = (raw > high) | (raw < (low if low is not None else -math.inf))
    assert 0 < outside.float().mean().item() < 0.5
    assert logged[on_policy.MASKED_SHARE] == pytest.approx(outside.float().mean().item())


def test_two_generation_batches_per_log_average_like_trl():
    """logging_steps 2: TRL averages the two batches' values, each of them over its whole batch."""
    mode, low, high = MODES[0]
    trainer = FakeTrainer(_batch(0), 2, mode, low, high)
    on_policy.reuse_loss_forward(trainer)
    first = _logged_over_one_step(trainer, 2)
    trainer.batch = _batch(1)
    both = _logged_over_one_step(trainer, 2)
    second, _ = trl_metrics(trainer.batch["trainer_logps"], trainer.batch["sampling"], trainer.batch["mask"], mode,
                            low, high)
    for key, value in second.items():
        assert both[key] == pytest.approx((first[key] + value) / 2, rel=1e-6), key


@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_lora_dropout_with_vllms_correction_is_named_in_the_log(caplog, dropout):
    """vLLM samples without dropout: a trainer with LoRA dropout says so once, at start."""
    mode, low, high = MODES[0]
    trainer = FakeTrainer(_batch(), 1, mode, low, high)
    trainer.model.peft_config = {"default": SimpleNamespace(lora_dropout=dropout)}
    with caplog.at_level("WARNING", logger="pipeline.on_policy"):
        on_policy.reuse_loss_forward(trainer)
    assert ("lora.dropout is 0.05" in caplog.text) == (dropout > 0)
