"""Issue 16: the trainer scores a generation batch of several prompts as if each were alone.

TRL's GRPOTrainer left-pads the prompt ids but takes the image-token markers (`mm_token_type_ids`)
from the processor, padded on the processor's side; Qwen's processors pad on the right, so the
shorter prompts' image positions (M-RoPE) were wrong. These tests run TRL's own scoring
(`_generate_and_score_completions`, through bench/logp_agreement.py) on tiny random models with a
peaked LM head, prompts of different lengths and images of different sizes in one batch.
"""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO, demo_params

# one pytest-xdist worker runs this module's tests: they share its expensive module fixtures
pytestmark = pytest.mark.xdist_group("logp")

sys.path.insert(0, str(REPO / "bench"))

AGREE = 1e-4  # float32 on CPU: padded and unpadded agree to rounding (seen: 0.0 exactly)


@pytest.fixture(scope="module")
def diag():
    import logp_agreement

    return logp_agreement


def _trainer(diag, kind: str, tmp_path_factory):
    from pipeline import modeling

    model_dir = modeling.build_tiny_model(kind, tmp_path_factory.mktemp(kind) / "model", seed=0)
    args = diag.parse_args(["--tiny", kind, "--prompts", "2", "--generations", "2", "--max-tokens", "4"])
    trainer, processor, _ = diag.build_trainer(model_dir, args, gpu=False)
    diag.use_unpadded_sampler(trainer, processor, seed=0)
    return trainer, processor


@pytest.fixture(scope="module")
def trainers(diag, tmp_path_factory):
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))  # the trainer's output_dir is relative
    try:
        yield {kind: _trainer(diag, kind, tmp_path_factory) for kind in ("qwen2_5_vl", "qwen3_vl")}
    finally:
        os.chdir(cwd)


def _batches(diag):
    rows = diag.make_rows(4, diag.TINY_SIZES, seed=0)
    # batch 0: a short length difference (a silent shift before the fix); batch 1: a long one (a crash)
    return [rows[0:2], rows[2:4]]


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_padded_and_unpadded_logps_agree(diag, trainers, kind):
    """With the train stage's processor setting, every completion's log-probs in the padded batch equal
    its own sequence's, per token, and TRL's logged sampling_logp_difference is 0."""
    from pipeline import compat

    trainer, processor = trainers[kind]
    processor.tokenizer.padding_side = "right"  # what Qwen's processors (ours too) load with
    compat.left_pad_for_grpo(processor)
    for rows in _batches(diag):
        sizes = {row["image"].size for row in rows}
        result = diag.run_batch(trainer, processor, rows, generations=2)
        lengths = {seq["prompt_tokens"] for seq in result["sequences"]}
        assert len(lengths) == 2 and len(sizes) == 2, "the batch must mix prompt lengths and image sizes"
        worst = max(seq["padded_vs_unpadded_max"] for seq in result["sequences"])
        assert worst < AGREE, f"{kind}: padded vs unpadded log-probs differ by up to {worst}: {result}"
        assert result["trl_sampling_logp_difference_mean"] < AGREE


def test_trl_still_needs_a_left_padding_processor(diag, trainers):
    """The setting is needed while TRL builds ids and image markers apart (huggingface/trl#5785). When
    this fails, TRL aligns them itself: compat.left_pad_for_grpo can go (docs/training.md)."""
    trainer, processor = trainers["qwen2_5_vl"]
    processor.tokenizer.padding_side = "right"
    outcomes = []
    for rows in _batches(diag):
        try:
            result = diag.run_batch(trainer, processor, rows, generations=2)
            outcomes.append(result["padded_vs_unpadded_mean"])
        except RuntimeError as error:  # get_rope_index: the shifted image overruns the prompt
            outcomes.append(str(error).splitlines()[0])
    assert isinstance(outcomes[0], float) and outcomes[0] > 1e-3, outcomes  # silently wrong positions
    assert isinstance(outcomes[1], str) and "shape mismatch" in outcomes[1], outcomes


def test_train_stage_pads_the_processor_on_the_left():
    from pipeline import compat, modeling, train

    assert 'compat.apply("processor", on_gpu=gpu, processor=processor)' in inspect.getsource(train.train)
    processor = modeling.build_processor("qwen2_5_vl", modeling.build_tokenizer())
    assert compat.apply("processor", on_gpu=False, processor=modeling.build_processor(
        "qwen2_5_vl", modeling.build_tokenizer())) == ["pad prompts on the left for GRPO scoring"]
    assert processor.tokenizer.padding_side == "right"
    assert compat.left_pad_for_grpo(processor) and processor.tokenizer.padding_side == "left"
    assert not compat.left_pad_for_grpo(processor)  # idempotent


def _progress_log(**train_overrides):
    from pipeline.callbacks import progress_and_guards
    from pipeline.params import parse_params

    overrides = {f"train__{key}": value for key, value in train_overrides.items()}
    return progress_and_guards(parse_params(demo_params("guard", **overrides)).train)[0]


def _log(callback, step: int, difference: float | None):
    from types import SimpleNamespace

    logs = {"loss": 0.1, "reward": 0.0}
    if difference is not None:
        logs["sampling/sampling_logp_difference/mean"] = difference
    callback.on_log(None, SimpleNamespace(global_step=step, max_steps=10), None, logs=logs)


def test_guard_stops_a_run_whose_logp_difference_stays_high():
    from pipeline.callbacks import RolloutMismatch

    callback = _progress_log(max_logp_difference=0.3, max_logp_difference_steps=3)
    for step, value in enumerate([0.7, 0.06, 0.65, 0.7, 0.05, None, 0.9, 0.8], start=1):
        _log(callback, step, value)  # never three in a row: a low value resets the count, no metric keeps it
    with pytest.raises(RolloutMismatch, match=r"train.max_logp_difference 0.3 for 3 logged steps"):
        _log(callback, 9, math.nan)


def test_guard_can_be_switched_off():
    callback = _progress_log(max_logp_difference=None)
    for step in range(1, 6):
        _log(callback, step, 5.0)


@pytest.mark.parametrize("key,value", [("max_logp_difference", 0.0), ("max_logp_difference", -1.0),
                                       ("max_logp_difference_steps", 0), ("max_logp_difference", "0.3")])
def test_guard_params_are_validated(key, value):
    from pipeline.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=key):
        parse_params(demo_params("guard", **{f"train__{key}": value}), Path("params.yaml"))
