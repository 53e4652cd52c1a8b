"""One forward pass fewer per generation batch: on-policy, the loss's forward gives the old log-probs.

TRL 1.16's GRPOTrainer runs a no-grad forward over every generation batch to get the trainer's
log-probabilities for vLLM's importance-sampling correction, even when the step is on-policy (one
optimizer step per generation batch, `num_iterations` 1). The weights are then the ones the loss
forward uses a moment later, and TRL itself takes `per_token_logps.detach()` as the old
log-probabilities whenever it skips that forward. Here the forward is skipped and what it fed (the
importance-sampling ratio and TRL's `sampling/*` metrics, the logp-difference guard's signal) is
computed in the loss from the loss forward's own log-probabilities: the same loss and gradients
(tests/test_train.py compares the adapters of the two ways) for one forward pass less.

The loss sees one micro-batch at a time, while TRL reduces its `sampling/*` metrics over the whole
generation batch (one value per batch: the min, mean and max over every sequence or token of it).
Averaging per-micro-batch values instead would report the mean of the micro-batches' extremes and
hide the extreme ratios these metrics exist to show, so each micro-batch's values are kept until
the generation batch's last micro-batch and reduced then, as TRL reduces them.

With LoRA dropout the two ways differ a little: TRL's extra forward draws its own dropout mask,
the loss forward another; here the ratio is computed on the mask the loss uses. Either way the
ratio then compares a dropout-perturbed policy with vLLM's, which never applies dropout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
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


@dataclass
class SamplingValues:
    """The values TRL's `sampling/*` metrics reduce, for some rows of a generation batch (detached)."""

    delta: Any  # |trainer - vLLM| log-prob of every completion token vLLM scored
    ratio: Any  # the importance-sampling ratio per sequence (sequence modes) or per completion token
    clipped: Any  # 1.0 where that ratio fell outside the clip range, else 0.0


def importance_ratio(trainer: Any, old_logps, sampling_logps, mask) -> tuple[Any, SamplingValues]:
    """TRL 1.16's vLLM importance-sampling ratio (`_generate_and_score_completions`), and the values
    its metrics are computed from. Row by row: the same for a micro-batch as for its rows' share of
    the whole generation batch."""
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
    values = SamplingValues(
        delta=delta[~torch.isnan(delta)].detach(),
        ratio=(ratio.flatten() if sequence_level else ratio[keep]).detach(),
        clipped=(outside.flatten() if sequence_level else outside[keep]).float(),
    )
    return ratio, values


def sampling_metrics(trainer: Any, parts: list[SamplingValues]) -> dict[str, float]:
    """TRL 1.16's `sampling/*` metrics over the rows of `parts` taken together (one generation
    batch), reduced across processes as TRL reduces them; plus the masked share."""
    import torch
    from trl.trainer.utils import nanmax, nanmin

    delta = torch.cat([part.delta for part in parts])
    ratio = torch.cat([part.ratio for part in parts])
    clipped = torch.cat([part.clipped for part in parts])
    zero = torch.tensor(0.0, device=delta.device)

    def reduce(values, how):
        return getattr(values, how)() if values.numel() else zero

    gather = trainer.accelerator.gather
    return {
        SAMPLING_METRICS[0]: gather(reduce(delta, "mean")).mean().item(),
        SAMPLING_METRICS[1]: gather(reduce(delta, "max")).max().item(),
        SAMPLING_METRICS[2]: nanmin(gather(reduce(ratio, "min"))).item(),
        SAMPLING_METRICS[3]: gather(reduce(ratio, "mean")).nanmean().item(),
        SAMPLING_METRICS[4]: nanmax(gather(reduce(ratio, "max"))).item(),
        # share of sequences (tokens, in the token modes) whose ratio fell outside the clip range
        # and was masked out (or truncated): what staleness or a sampler mismatch costs the batch
        MASKED_SHARE: gather(reduce(clipped, "mean")).mean().item(),
    }


def importance_sampling(trainer: Any, old_logps, sampling_logps, mask):
    """The ratio and TRL's `sampling/*` metrics for one whole generation batch."""
    ratio, values = importance_ratio(trainer, old_logps, sampling_logps, mask)
    return ratio, sampling_metrics(trainer, [values])


def lora_dropout(trainer: Any) -> float:
    config = getattr(trainer.model, "peft_config", {}).get("default")
    return float(getattr(config, "lora_dropout", 0.0) or 0.0)


def reuse_loss_forward(trainer: Any) -> bool:
    """Patch a built GRPOTrainer so that, on-policy, the old log-probs come from the loss forward."""
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction and lora_dropout(trainer) > 0:
        logger.warning("lora.dropout is %g: the trainer's log-probs carry dropout noise that vLLM's never do; the "
                       "importance-sampling ratio and the logp-difference guard see it as a sampler mismatch "
                       "(docs/training.md, \"LoRA dropout\"): lora.dropout 0 keeps them exact",
                       lora_dropout(trainer))
    if not applies(trainer):
        return False
    import torch

    generate_and_score = trainer._generate_and_score_completions
    per_token_logps = trainer._get_per_token_logps_and_entropies
    compute_loss = trainer._compute_loss
    # `parts`: the values of the current generation batch's micro-batches so far; `left`: how many
    # of its micro-batches the loss has still to see (TRL splits it into steps_per_generation)
    state: dict[str, Any] = {"skip": False, "inputs": None, "parts": [], "left": 0}

    def report() -> None:
        """Every process reaches this at the same micro-batch: the gathers in it line up."""
        if state["parts"]:
            for key, value in sampling_metrics(trainer, state["parts"]).items():
                trainer._metrics["train"][key].append(value)
        state["parts"], state["left"] = [], 0

    def logps(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if state["skip"]:  # the old-log-prob forward of a generation batch: not run
            state["skip"] = False
            return torch.zeros(input_ids.size(0), logits_to_keep, device=input_ids.device), None, None
        result = per_token_logps(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        inputs = state["inputs"]
        if inputs is not None and torch.is_grad_enabled() and "importance_sampling_ratio" not in inputs:
            mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)
            ratio, values = importance_ratio(trainer, result[0].detach(), inputs["sampling_per_token_logps"], mask)
            inputs["importance_sampling_ratio"] = ratio
            state["parts"].append(values)
            state["left"] -= 1
            if state["left"] <= 0:  # the generation batch's last micro-batch
                report()
        return result

    def generate(inputs):
        if trainer.model.training:
            report()  # a generation batch not seen to its end (none in TRL's schedule): still logged
        state["skip"] = True
        try:
            output = generate_and_score(inputs)
        finally:
            state["skip"] = False
        mode = "train" if trainer.model.training else "eval"
        for key in SAMPLING_METRICS:  # TRL's values from the placeholder: replaced in the loss
            if trainer._metrics[mode].get(key):
                trainer._metrics[mode][key].pop()
        if mode == "train":
            state["left"] = trainer.args.steps_per_generation
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
