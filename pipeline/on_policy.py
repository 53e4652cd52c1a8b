"""One forward pass fewer per generation batch: on-policy, the loss's forward gives the old log-probs.

TRL 1.16's GRPOTrainer runs a no-grad forward over every generation batch to get the trainer's
log-probabilities for vLLM's importance-sampling correction, even when the step is on-policy (one
optimizer step per generation batch, `num_iterations` 1). The weights are then the ones the loss
forward uses a moment later, and TRL itself takes `per_token_logps.detach()` as the old
log-probabilities whenever it skips that forward. Here the forward is skipped and what it fed (the
importance-sampling ratio and TRL's `sampling/*` metrics, the logp-difference guard's signal) is
computed in the loss from the loss forward's own log-probabilities: the same loss and gradients
(tests/test_train.py compares the adapters of the two ways) for one forward pass less.

With LoRA dropout the two ways differ a little: TRL's extra forward draws its own dropout mask,
the loss forward another; here the ratio is computed on the mask the loss uses.
"""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger("pipeline.on_policy")

# what TRL's skipped forward would have logged, per generation batch
SAMPLING_METRICS = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                    "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                    "sampling/importance_sampling_ratio/max")
MASKED_SHARE = "sampling/importance_sampling_masked_share"


def applies(trainer: Any) -> bool:
    """TRL's own on-policy test (`gradient_accumulation_steps % generate_every == 0`), with vLLM's
    correction on and nothing else that needs the separate forward (a KL term, VESPO's loss)."""
    args = trainer.args
    generate_every = args.steps_per_generation * trainer.num_iterations
    return (trainer.use_vllm and trainer.vllm_importance_sampling_correction and trainer.num_iterations == 1
            and args.gradient_accumulation_steps % generate_every == 0 and trainer.beta == 0.0
            and trainer.loss_type != "vespo")


def importance_sampling(trainer: Any, old_logps, sampling_logps, mask):
    """TRL 1.16's vLLM importance-sampling ratio (`_generate_and_score_completions`) and its metrics."""
    import torch

    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    mode = trainer.vllm_importance_sampling_mode
    sequence_level = mode in ("sequence_mask", "sequence_truncate")
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if sequence_level else diff)
    low, high = trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max
    outside = (ratio < (-math.inf if low is None else low)) | (ratio > (math.inf if high is None else high))
    if mode in ("sequence_truncate", "token_truncate"):
        ratio = torch.clamp(ratio, min=low, max=high)
    elif mode in ("sequence_mask", "token_mask"):
        ratio = ratio.masked_fill(outside, value=0.0)
    else:
        raise ValueError(f"unknown vllm_importance_sampling_mode {mode!r}")

    keep = mask.bool()
    delta = torch.abs(old_logps - sampling_logps)[keep]
    delta = delta[~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level else ratio[keep]
    clipped = (outside.flatten() if sequence_level else outside[keep]).float()
    zero = torch.tensor(0.0, device=old_logps.device)

    def reduce(values, how):
        return getattr(values, how)() if values.numel() else zero

    gather = trainer.accelerator.gather
    metrics = {
        SAMPLING_METRICS[0]: gather(reduce(delta, "mean")).mean().item(),
        SAMPLING_METRICS[1]: gather(reduce(delta, "max")).max().item(),
        SAMPLING_METRICS[2]: gather(reduce(flat, "min")).min().item(),
        SAMPLING_METRICS[3]: gather(reduce(flat, "mean")).nanmean().item(),
        SAMPLING_METRICS[4]: gather(reduce(flat, "max")).max().item(),
        # share of sequences (tokens, in the token modes) whose ratio fell outside the clip range
        # and was masked out (or truncated): what staleness or a sampler mismatch costs the batch
        MASKED_SHARE: gather(reduce(clipped, "mean")).mean().item(),
    }
    return ratio, metrics


def reuse_loss_forward(trainer: Any) -> bool:
    """Patch a built GRPOTrainer so that, on-policy, the old log-probs come from the loss forward."""
    if not applies(trainer):
        return False
    import torch

    generate_and_score = trainer._generate_and_score_completions
    per_token_logps = trainer._get_per_token_logps_and_entropies
    compute_loss = trainer._compute_loss
    state = {"skip": False, "inputs": None}

    def logps(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if state["skip"]:  # the old-log-prob forward of a generation batch: not run
            state["skip"] = False
            return torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device), None, None
        result = per_token_logps(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        inputs = state["inputs"]
        if inputs is not None and torch.is_grad_enabled() and "importance_sampling_ratio" not in inputs:
            mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
            ratio, metrics = importance_sampling(trainer, result[0].detach(), inputs["sampling_per_token_logps"],
                                                 mask)
            inputs["importance_sampling_ratio"] = ratio
            for key, value in metrics.items():
                trainer._metrics["train"][key].append(value)
        return result

    def generate(inputs):
        state["skip"] = True
        try:
            output = generate_and_score(inputs)
        finally:
            state["skip"] = False
        mode = "train" if trainer.model.training else "eval"
        for key in SAMPLING_METRICS:  # TRL's values from the placeholder: replaced in the loss
            if trainer._metrics[mode].get(key):
                trainer._metrics[mode][key].pop()
        output.pop("old_per_token_logps", None)  # the loss then takes its own, detached (TRL's on-policy path)
        output.pop("importance_sampling_ratio", None)
        return output

    def loss(model, inputs):
        state["inputs"] = inputs
        try:
            return compute_loss(model, inputs)
        finally:
            state["inputs"] = None

    trainer._get_per_token_logps_and_entropies = logps
    trainer._generate_and_score_completions = generate
    trainer._compute_loss = loss
    logger.info("on-policy: the loss forward gives the old log-probs (one forward pass less per generation batch)")
    return True
