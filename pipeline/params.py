"""The one typed, validated view of `params.yaml`.

Every stage calls `load_params()` first and receives a frozen `Params` object; no other module
reads YAML. Validation imports nothing heavy (no torch, transformers or vLLM), so a typo in
`params.yaml` fails in well under a second with exit code 2, before any model is loaded and
before any output is touched.

Run `python -m pipeline.params` (or `make check`) to validate the current file.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import functools
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, ClassVar, Literal, NamedTuple, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

PARAMS_FILE = Path("params.yaml")
OUTPUT_ROOT = Path("outputs")
PRESETS = Path("presets")


class Reports:
    """Metrics and plots: the same paths for every run, not ignored by git, so each DVC experiment's
    commit holds its own and `dvc metrics diff`, `dvc exp show` and `dvc plots diff` compare runs
    (DVC's example-get-started layout). dvc.yaml names the same paths (tests/test_dvc_stages.py)."""

    root = Path("reports")
    data = root / "data_report.json"
    train_curves = root / "train"  # dvclive: plots/metrics/<name>.tsv per logged value …
    train = train_curves / "metrics.json"  # … and each one's last value
    evaluation = root / "eval_metrics.json"
    comparison = root / "eval_comparison.csv"
    results = root / "results.md"  # the evaluation report (pipeline/report.py), results.png beside it
    sample_outputs = root / "sample_outputs.md"
EXIT_BAD_PARAMS = 2

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RUN_ID_RULE = ("1-64 characters of letters, digits, '.', '_' or '-', the first a letter or digit (it names the "
               "run's folder outputs/<id>/, its DVC experiment and its W&B run)")


def run_id_problem(run_id: str) -> str | None:
    """The one run-id rule, for the schema and for the runner's `--run-id`: the runner checks it
    before anything else, because an id with a space or a shell character otherwise surfaces as
    some later, unrelated failure (a file not found, an argument not recognised)."""
    return None if _RUN_ID.fullmatch(run_id) else f"run id {run_id!r}: must be {RUN_ID_RULE}"

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class _Section(BaseModel):
    # strict: "8" is not 8 and 1.0 is not True; extra keys are typos, not silently ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelParams(_Section):
    name_or_path: str = Field(min_length=1)
    revision: str = "main"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    image_factor: PositiveInt = 28
    min_pixels: PositiveInt = 3136
    max_pixels: PositiveInt = 262144
    max_model_len: PositiveInt = 32768  # context the prompt (image tokens included) and completion share
    # the trainer's frozen base: none, or 4bit (bitsandbytes NF4, double quantization, the model
    # dtype as compute dtype; QLoRA). vLLM always loads the checkpoint unquantized (modeling.py)
    quantization: Literal["none", "4bit"] = "none"

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelParams:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        return self


ColumnName = Annotated[str, Field(min_length=1)]
SourceFormat = Literal["auto", "hub", "parquet", "json", "csv", "imagefolder"]


class ColumnMap(_Section):
    """Our column name → the dataset's column; `a.b` reads field b of struct column a; null = absent.

    The defaults are MathVista's (its picture is `decoded_image`; `image` is only a path string), so
    another dataset needs only the names that differ. A class, not a dict: a typo'd name is an error.
    """

    id: ColumnName | None = "pid"  # null: ids are hashed from question, answer and image bytes
    question: ColumnName = "question"
    image: ColumnName = "decoded_image"
    answer: ColumnName = "answer"
    choices: ColumnName | None = "choices"
    question_type: ColumnName | None = "question_type"
    answer_type: ColumnName | None = "answer_type"
    precision: ColumnName | None = "precision"
    unit: ColumnName | None = "unit"
    category: ColumnName | None = "metadata.category"
    context: ColumnName | None = "metadata.context"
    grade: ColumnName | None = "metadata.grade"
    language: ColumnName | None = "metadata.language"
    skills: ColumnName | None = "metadata.skills"
    source: ColumnName | None = "metadata.source"
    task: ColumnName | None = "metadata.task"


class SourceParams(_Section):
    """Where a dataset comes from: `data` itself, and `data.eval_source` for a separate eval set."""

    source: str = Field(min_length=1)
    config: str | None = None
    split: str = Field(min_length=1)
    # a Hub dataset's branch, tag or commit: a commit pins its rows (a local source is hashed by DVC)
    revision: str = Field(default="main", min_length=1)
    format: SourceFormat = "auto"
    columns: ColumnMap = Field(default_factory=ColumnMap)


class DataParams(SourceParams):
    # null: eval rows are carved out of `source` by hash of id and seed; else eval is this source, whole
    eval_source: SourceParams | None = None
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    max_rows: PositiveInt | None = None
    num_proc: PositiveInt
    # [width, height]: every image letterboxed to this size (same token count per image); null: keep aspect
    uniform_size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | None = None
    max_aspect_ratio: Annotated[float, Field(ge=1.0, le=200.0)] = 50.0  # qwen-vl-utils refuses beyond 200


# GRPOConfig annotations (as written in TRL's source) → the YAML values that fit them
_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _fits(value: object, annotation: str) -> bool:
    """A YAML value against a simple annotation (`int`, `float | None`, …); others are not checked."""
    optional = annotation.endswith(" | None")
    expected = _SIMPLE_TYPES.get(annotation.removesuffix(" | None"))
    if expected is None or (value is None and optional):
        return True
    return isinstance(value, expected) and (bool in expected or not isinstance(value, bool))


@functools.cache
def grpo_config_fields() -> dict[str, str] | None:
    """TRL's GRPOConfig fields (its own and those it inherits from transformers' TrainingArguments)
    → annotation, read from the installed sources with `ast`: importing TRL would load torch, and
    `make check` must stay well under a second. None where TRL or transformers is not installed."""
    fields: dict[str, str] = {}
    for module, class_name in (("transformers.training_args", "TrainingArguments"),
                               ("trl.trainer.base_config", "_BaseConfig"), ("trl.trainer.grpo_config", "GRPOConfig")):
        package, _, rest = module.partition(".")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        source = Path(spec.submodule_search_locations[0], *rest.split(".")).with_suffix(".py")
        if not source.is_file():
            return None
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                fields.update({item.target.id: ast.unparse(item.annotation) for item in node.body
                               if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)})
    return fields or None


class TrainParams(_Section):
    """`train:` is TRL's `GRPOConfig` vocabulary, handed to it in one hop (`grpo_kwargs`), plus the
    project's own keys (`PROJECT_KEYS`). Values live in params.yaml; this class holds types only
    (no defaults). The keys typed here are the ones this project reads itself or checks before any
    heavy import; any other `GRPOConfig` field (`top_k`, `max_grad_norm`, …) is one more line in
    params.yaml, checked by name and simple type against TRL's source without importing TRL."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    # the project's own keys: they steer this project's code and never reach GRPOConfig
    PROJECT_KEYS: ClassVar[frozenset[str]] = frozenset({
        "vllm_weight_sync", "max_logp_difference", "max_logp_difference_steps", "num_processes",
        "accelerate_config", "rollout_overlap", "rollout_timeout", "rollout_precision"})
    # GRPOConfig fields the train stage sets from elsewhere (run id, seed, rewards, the machine)
    DERIVED_KEYS: ClassVar[dict[str, str]] = {
        "output_dir": "outputs/<run_id>/checkpoints", "run_name": "run_id", "seed": "the top-level seed",
        "data_seed": "the top-level seed", "reward_weights": "the rewards section", "bf16": "on with a GPU",
        "report_to": "tracking", "generation_kwargs": "the stage (vision tokens barred from sampling)"}

    learning_rate: Annotated[float, Field(gt=0.0, lt=1.0)]
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    warmup_steps: Annotated[float, Field(ge=0.0)]  # as transformers: steps, or a share of max_steps if < 1
    max_steps: PositiveInt
    per_device_train_batch_size: PositiveInt
    gradient_accumulation_steps: PositiveInt
    num_generations: Annotated[int, Field(ge=2)]
    max_completion_length: PositiveInt
    temperature: Annotated[float, Field(gt=0.0)]
    top_p: Fraction
    beta: Annotated[float, Field(ge=0.0)]
    epsilon: Annotated[float, Field(gt=0.0, lt=1.0)]
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"]
    scale_rewards: Literal["group", "batch", "none"]
    gradient_checkpointing: bool
    logging_steps: PositiveInt
    save_steps: PositiveInt
    save_total_limit: PositiveInt
    use_vllm: bool
    vllm_mode: Literal["colocate", "server"]
    vllm_gpu_memory_utilization: Fraction
    vllm_enable_sleep_mode: bool
    vllm_server_host: str
    vllm_server_port: Annotated[int, Field(gt=0, lt=65536)]
    vllm_max_model_length: PositiveInt | None
    use_liger_kernel: bool
    log_completions: bool
    # merged: TRL merges the LoRA adapter and reloads every weight into vLLM each step; adapter: vLLM
    # serves the policy as a LoRA adapter and receives only its weights (pipeline/adapter_sync.py)
    vllm_weight_sync: Literal["merged", "adapter"]
    # stop when vLLM's and the trainer's log-probs (TRL's sampling_logp_difference/mean) stay above
    # this for max_logp_difference_steps logged steps in a row; null = never (docs/training.md)
    max_logp_difference: Annotated[float, Field(gt=0.0)] | None
    max_logp_difference_steps: PositiveInt
    num_processes: PositiveInt | Literal["auto"]
    accelerate_config: str
    # server mode: 1 = the server generates the next step's rollouts while this one trains (one
    # step stale, corrected by TRL's importance sampling; pipeline/rollouts.py); 0 = in turn
    rollout_overlap: Literal[0, 1]
    rollout_timeout: Annotated[float, Field(gt=0.0)]  # server mode: seconds one step's rollout may take
    # the weights vLLM generates from: bf16, or fp8 quantized by vLLM at load (the trainer stays
    # bf16; TRL's importance sampling corrects the gap; pipeline/rollout_precision.py)
    rollout_precision: Literal["bf16", "fp8"]
    vllm_importance_sampling_correction: bool

    def grpo_kwargs(self) -> dict:
        """Every key of `train:` that is TRL's, as GRPOConfig takes it."""
        return {key: value for key, value in self.model_dump().items() if key not in self.PROJECT_KEYS}

    @model_validator(mode="after")
    def _extra_keys_are_grpo_config_fields(self) -> TrainParams:
        fields = grpo_config_fields()
        for key, value in (self.model_extra or {}).items():
            if key in self.DERIVED_KEYS:
                raise PydanticCustomError("train_key", "set by the project from {source}, not in train:",
                                          {"key": key, "source": self.DERIVED_KEYS[key]})
            if fields is None:  # TRL is not installed here: GRPOConfig itself checks the key where it runs
                continue
            if key not in fields:
                reason = (unknown_key(("train", key)) or Problem(key, "unknown key (typo?)")).reason
                raise PydanticCustomError("train_key", "{reason}: neither this project's nor a field of TRL's "
                                          "GRPOConfig", {"key": key, "reason": reason})
            if not _fits(value, fields[key]):
                raise PydanticCustomError("train_key", "GRPOConfig declares it {type} (got {value!r})",
                                          {"key": key, "type": fields[key], "value": value})
        return self

    def processes(self, visible_gpus: int) -> int:
        """`auto`: one training process per visible GPU, one on a machine without GPUs."""
        return max(visible_gpus, 1) if self.num_processes == "auto" else self.num_processes

    def completions_per_step(self, processes: int) -> int:
        """Completions one optimizer step learns from: every process adds its own batches, so a run
        keeps its learning on N GPUs by dividing gradient_accumulation_steps (or the per-device batch) by N."""
        return self.per_device_train_batch_size * processes * self.gradient_accumulation_steps

    @model_validator(mode="after")
    def _adapter_sync_keeps_the_base_weights(self) -> TrainParams:
        if self.vllm_weight_sync != "adapter":
            return self
        if self.vllm_mode != "colocate":
            raise ValueError("train.vllm_weight_sync: adapter is implemented for train.vllm_mode: colocate only; "
                             "use merged with the server")
        if self.vllm_enable_sleep_mode:
            raise ValueError("train.vllm_weight_sync: adapter needs vLLM to keep the base weights between rollouts, "
                             "which sleep mode discards: set train.vllm_enable_sleep_mode: false")
        return self

    @model_validator(mode="after")
    def _fp8_rollouts_are_corrected(self) -> TrainParams:
        """FP8 weights sample from a slightly different policy than the bf16 one trained: without the
        importance-sampling correction the gradient would be biased, with no error anywhere."""
        if self.rollout_precision == "bf16":
            return self
        if not self.use_vllm:
            raise PydanticCustomError("train_key", "train.rollout_precision: {precision} quantizes vLLM's weights: "
                                      "set train.use_vllm: true",
                                      {"key": "use_vllm", "precision": self.rollout_precision})
        if not self.vllm_importance_sampling_correction:
            raise PydanticCustomError(
                "train_key", "train.rollout_precision: {precision} samples from quantized weights, which only TRL's "
                "importance-sampling correction reconciles with the bf16 policy trained: set "
                "train.vllm_importance_sampling_correction: true",
                {"key": "vllm_importance_sampling_correction", "precision": self.rollout_precision})
        return self

    @model_validator(mode="after")
    def _overlap_needs_the_server(self) -> TrainParams:
        """The overlapped rollout is started for the batch the Trainer will hand over next, which
        holds only with one generation batch per optimizer step: anything else sends the peeked batch
        to waste (it is generated again) or trains on another schedule. Each training process sends
        its own batch, which must hold whole groups of a prompt's num_generations completions."""
        if not self.rollout_overlap:
            return self

        def refuse(key: str, reason: str) -> PydanticCustomError:
            return PydanticCustomError("train_key", "train.rollout_overlap: 1 {reason}", {"key": key, "reason": reason})

        if not self.use_vllm:
            raise refuse("use_vllm", "overlaps the rollouts of a vLLM server with training: set train.use_vllm: "
                                     "true and train.vllm_mode: server (make vllm-serve)")
        if self.vllm_mode != "server":
            raise refuse("vllm_mode", "overlaps the rollouts of a vLLM server with training: set "
                                      "train.vllm_mode: server (make vllm-serve)")
        extra = self.model_extra or {}
        step_batch = self.per_device_train_batch_size * self.gradient_accumulation_steps  # one process
        if step_batch % self.num_generations:
            raise refuse("per_device_train_batch_size", f"sends each training process's own batch to the server: "
                         f"per_device_train_batch_size x gradient_accumulation_steps = {step_batch} must hold whole "
                         f"groups of num_generations = {self.num_generations}")
        # auto: one process per GPU, known only at launch, where rollouts.attach checks TRL's schedule again
        processes = self.num_processes if isinstance(self.num_processes, int) else 1
        one_batch_per_step = {
            "num_iterations": (1, "leave num_iterations at 1"),
            "steps_per_generation": (self.gradient_accumulation_steps,
                                     "leave steps_per_generation unset (it is gradient_accumulation_steps)"),
            "generation_batch_size": (step_batch * processes, "leave generation_batch_size unset (it is "
                                      "per_device_train_batch_size x gradient_accumulation_steps x num_processes)"),
        }
        for key, (expected, fix) in one_batch_per_step.items():
            if extra.get(key) is not None and extra[key] != expected:
                raise refuse(key, f"needs one generation batch per optimizer step: {fix}")
        return self

    @model_validator(mode="after")
    def _grpo_batch_divisible(self) -> TrainParams:
        # TRL groups the completions of one generation batch by prompt; the batch must hold whole groups.
        # Under `auto` the GPU count is known only where training runs: one process's batch must hold them.
        batch = self.completions_per_step(self.processes(1))
        if batch % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size × num_processes ({self.num_processes}) × gradient_accumulation_steps "
                f"= {batch} is not divisible by num_generations = {self.num_generations} (GRPO needs whole groups "
                "per batch)")
        return self


class LoraParams(_Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class SuiteEntry(_Section):
    """One benchmark of `evaluate.suite` with a local copy (in the dataset's own schema, under data/)
    or another Hub revision than the one the project pins."""

    name: str
    source: str | None = None
    revision: str | None = None


def _known_benchmark(entry: str | SuiteEntry) -> str | SuiteEntry:
    from pipeline.benchmarks import registry  # pure Python: no torch, safe before validation ends

    name = entry if isinstance(entry, str) else entry.name
    known = registry()
    if name not in known:
        raise ValueError(f"unknown benchmark {name!r} (shipped: {', '.join(sorted(known))})")
    return entry


class EvaluateParams(_Section):
    max_new_tokens: PositiveInt = 512
    temperature: Annotated[float, Field(ge=0.0)] = 0.0
    batch_size: PositiveInt = 8  # transformers backend only: vLLM schedules its own batches
    max_rows: PositiveInt | None = None
    # auto: vLLM (one engine, the adapter as a LoRARequest) when installed, else transformers generate
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    # benchmarks scored by their own rules besides the run's eval split (pipeline/benchmarks/);
    # each a name, or {name, source (a local copy), revision}
    suite: list[Annotated[str | SuiteEntry, AfterValidator(_known_benchmark)]] = Field(default_factory=list)

    @field_validator("suite")
    @classmethod
    def _each_benchmark_once(cls, suite: list) -> list:
        names = [entry if isinstance(entry, str) else entry.name for entry in suite]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(repeated)} more than once")
        return suite


class TrackingParams(_Section):
    wandb_project: str = Field(default="grpo", min_length=1)
    # auto: online when WANDB_API_KEY is set, offline otherwise (sync later with `wandb sync`).
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"


class PublishParams(_Section):
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    hub_private: bool = True  # a new Hub repo is created private: publishing is a deliberate second step
    registry_file: str = "outputs/registry.json"

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> PublishParams:
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub is true but hub_repo_id is not set")
        return self


class Params(_Section):
    run_id: str
    seed: Annotated[int, Field(ge=0)]
    model: ModelParams
    data: DataParams
    train: TrainParams
    lora: LoraParams
    # reward name (from pipeline.rewards.REWARD_FUNCS, or `package.module:function`) → weight
    rewards: dict[str, float] = Field(min_length=1)
    evaluate: EvaluateParams
    tracking: TrackingParams
    publish: PublishParams

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, run_id: str) -> str:
        problem = run_id_problem(run_id)
        if problem:
            raise ValueError(problem)
        return run_id

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, weights: dict[str, float]) -> dict[str, float]:
        from pipeline.rewards import check_weights  # pure Python: no torch, safe before validation ends

        check_weights(weights)
        return weights

    @model_validator(mode="after")
    def _vllm_context_holds_the_prompts(self) -> Params:
        # prepare keeps prompts up to model.max_model_len - max_completion_length; a smaller vLLM
        # context would let such a prompt through and stop the run at its first rollout
        vllm_context = self.train.vllm_max_model_length
        if vllm_context is not None and vllm_context < self.model.max_model_len:
            raise ValueError(f"train.vllm_max_model_length ({vllm_context}) is below model.max_model_len "
                             f"({self.model.max_model_len}): set model.max_model_len to {vllm_context} too, so "
                             "prepare drops the prompts that would not fit vLLM's context")
        return self

    @model_validator(mode="after")
    def _quantized_base_syncs_the_adapter_only(self) -> Params:
        if self.model.quantization == "none" or not self.train.use_vllm:
            return self
        if self.train.vllm_weight_sync != "adapter":
            raise PydanticCustomError(
                "train_key", "model.quantization: {quantization} keeps a quantized base in the trainer only: "
                "the merged sync would merge the adapter into it (rounding the update away, huggingface/trl#3466) and "
                "need vLLM to load it quantized; set train.vllm_weight_sync: adapter (vLLM keeps the bf16 base and "
                "receives the adapter)", {"key": "train.vllm_weight_sync", "quantization": self.model.quantization})
        return self

    @property
    def output_dir(self) -> Path:
        return OUTPUT_ROOT / self.run_id


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file, the key and the reason."""


class Problem(NamedTuple):
    key: str  # dotted
    reason: str
    suggests: str | None = None  # the valid key a misspelt one is closest to


def _model_of(annotation: object) -> type[BaseModel] | None:
    """The section class inside a field's annotation (`SourceParams | None` → SourceParams)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _model_of(arg)) is not None), None)


def _section_keys(model: type[BaseModel]) -> tuple[set[str], set[str]] | None:
    """(keys a section accepts, keys worth suggesting). None where any key may be right: `train:`
    without TRL installed here, since every GRPOConfig field is welcome there and GRPOConfig itself
    checks them where the run happens. Keys the project derives are accepted (their own check says
    where they come from) but never suggested."""
    keys = set(model.model_fields)
    if model is not TrainParams:
        return keys, keys
    fields = grpo_config_fields()
    if fields is None:
        return None
    return keys | set(fields), (keys | set(fields)) - set(TrainParams.DERIVED_KEYS)


def unknown_key(loc: Sequence[str]) -> Problem | None:
    """The first part of a key path that the schema does not know, with the closest valid key:
    without it a misspelt key shows up only as the real key being missing, or as a key the next
    file does not have, and the user looks in the wrong place."""
    model: type[BaseModel] | None = Params
    for depth, part in enumerate(loc):
        keys = _section_keys(model)
        if keys is None:
            return None
        prefix = "".join(f"{parent}." for parent in loc[:depth])
        if part not in keys[0]:
            close = difflib.get_close_matches(part, sorted(keys[1]), n=1)
            suggests = f"{prefix}{close[0]}" if close else None
            reason = f"unknown key (did you mean {suggests}?)" if suggests else "unknown key (typo?)"
            return Problem(f"{prefix}{part}", reason, suggests)
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
        if model is None:  # a value, or a free mapping such as `rewards`: nothing more to check by name
            return None
    return None


def unknown_keys(raw: Mapping, prefix: tuple[str, ...] = ()) -> list[Problem]:
    """Every key of a (nested) params mapping that the schema does not know."""
    found = []
    for key, value in raw.items():
        loc = (*prefix, str(key))
        problem = unknown_key(loc)
        if problem is not None:
            found.append(problem)
        elif isinstance(value, Mapping):
            found += unknown_keys(value, loc)
    return found


def _near_miss(raw: Mapping, loc: tuple[str, ...]) -> str:
    """For a missing key: a key beside it that the section does not declare and that is spelt
    almost the same. This is how a misspelling shows where the schema cannot call a key unknown
    (`train:` without TRL installed)."""
    section: object = raw
    for part in loc[:-1]:
        section = section.get(part) if isinstance(section, Mapping) else None
    model = _section_at(loc[:-1])
    if not isinstance(section, Mapping) or model is None:
        return ""
    strangers = [str(key) for key in section if key not in model.model_fields]
    close = difflib.get_close_matches(loc[-1], strangers, n=1)
    return f"; {'.'.join([*loc[:-1], close[0]])} is there: misspelt?" if close else ""


def _section_at(loc: Sequence[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Params
    for part in loc:
        field = model.model_fields.get(part) if model is not None else None
        model = _model_of(field.annotation) if field is not None else None
    return model


def _validation_problems(error: ValidationError, raw: Mapping) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        key = ".".join(loc) or "(top level)"
        if item["type"] == "train_key":  # raised for a whole section (or all params): name the key itself
            key = ".".join((*loc, item["ctx"]["key"]))
        if item["type"] == "missing":
            reason = f"missing (required{_near_miss(raw, loc)})"
        elif item["type"] == "extra_forbidden":
            reason = (unknown_key(loc) or Problem(key, "unknown key (typo?)")).reason
        else:
            reason = item["msg"].removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], dict) and item["type"] != "train_key":
                reason += f" (got {item['input']!r})"
        problems.append(Problem(key, reason))
    return problems


def _origin(key: str, origins: Mapping[str, str], default: str) -> str:
    """The file (or `--set`) that set `key` or the mapping holding it; else the params file."""
    parts = key.split(".")
    return next((origins[prefix] for n in range(len(parts), 0, -1) if (prefix := ".".join(parts[:n])) in origins),
                default)


def _report(problems: list[Problem], default: str, origins: Mapping[str, str]) -> str:
    """One line per problem, each naming the file to fix. A key reported as unknown is reported
    once, and the valid key it was meant to be is not reported missing as well."""
    meant = {problem.suggests for problem in problems if problem.suggests}
    lines, seen = [], set()
    for problem in problems:
        if problem.key in seen or (problem.key in meant and problem.reason.startswith("missing")):
            continue
        seen.add(problem.key)
        lines.append(f"{_origin(problem.key, origins, default)}: {problem.key}: {problem.reason}")
    return "\n".join(lines)


def parse_params(raw: object, path: Path | str = PARAMS_FILE, origins: Mapping[str, str] | None = None) -> Params:
    """`origins` (dotted key → the preset file or `--set` that set it) decides which file an error
    names; a key not in it is the params file's."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    problems = unknown_keys(raw)
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        problems += _validation_problems(error, raw)
    else:
        if not problems:
            return params
    raise ParamsError(_report(problems, str(path), origins or {}))


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    return parse_params(raw, path)


def load_params_or_exit(path: Path | str = PARAMS_FILE) -> Params:
    """Entry points call this first: a bad file ends the process with code 2 before any heavy work."""
    try:
        return load_params(path)
    except ParamsError as error:
        print(f"error: invalid parameters\n{error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS) from None


class Overrides(dict):
    """Flat `section.key: value` overrides that remember where each key was set (`origins`: a preset
    file or `--set`) and which preset files were read (`files`, base first): an error must name the
    file to fix, not the last one read."""

    def __init__(self) -> None:
        super().__init__()
        self.origins: dict[str, str] = {}
        self.files: list[str] = []

    def put(self, key: str, value: object, origin: str) -> None:
        self[key] = value
        self.origins[key] = origin


def preset_path(preset: str | Path) -> Path:
    """A preset by name (`demo` or `demo.yaml` → presets/demo.yaml) or by path (presets/demo.yaml,
    ./elsewhere/x.yaml; relative paths from the repository root, where make runs). A path is never
    silently swapped for a same-named file in presets/, and an unknown preset lists the real ones."""
    as_path = Path(preset)
    if as_path.is_file():
        return as_path
    is_name = len(as_path.parts) == 1
    named = PRESETS / (f"{as_path.stem}.yaml" if as_path.suffix in (".yaml", ".yml") else f"{as_path.name}.yaml")
    if is_name and named.is_file():
        return named
    known = ", ".join(sorted(path.stem for path in PRESETS.glob("*.yaml"))) or "none"
    looked = f"no file {preset}" + (f" and no {named}" if is_name else "")
    raise ParamsError(f"preset {str(preset)!r}: {looked} (presets: {known})")


def _read_preset(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: preset file not found") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(loaded, dict) or not all(isinstance(key, str) for key in loaded):
        raise ParamsError(f"{path}: expected a mapping of dotted keys to values")
    return loaded


def preset_chain(preset: str | Path) -> list[tuple[Path, dict]]:
    """A preset and the presets it `extends` (a name or path, resolved as PRESET= is), base first:
    a preset for your own data says `extends: demo` and only its data keys, instead of repeating
    the base's model keys. A chain that comes back to a preset it already read is refused, named."""
    chain: list[tuple[Path, dict]] = []
    path: Path | None = preset_path(preset)
    while path is not None:
        if path.resolve() in {seen.resolve() for seen, _ in chain}:
            names = " → ".join(str(seen) for seen, _ in chain)
            raise ParamsError(f"{chain[0][0]}: extends goes round in a circle: {names} → {path}")
        loaded = _read_preset(path)
        base = loaded.pop("extends", None)
        chain.append((path, loaded))
        if base is None:
            break
        if not isinstance(base, str) or not base:
            raise ParamsError(f"{path}: extends: expected a preset name or path, got {base!r}")
        try:
            path = preset_path(base)
        except ParamsError as error:
            raise ParamsError(f"{path}: extends: {error}") from None
    return chain[::-1]


def read_overrides(preset: Path | str | None, sets: list[str]) -> Overrides:
    """Flat `section.key: value` overrides: a preset (with the presets it extends) first, then
    `key=value` strings (YAML values), each key remembering which of them set it."""
    overrides = Overrides()
    for path, loaded in preset_chain(preset) if preset else []:
        overrides.files.append(str(path))
        for key, value in loaded.items():
            overrides.put(key, value, str(path))
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {item!r}: expected key=value")
        overrides.put(key, parse_value(value), "--set")
    return overrides


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_value(text: str) -> object:
    """A command-line value as YAML reads it, except that `1e-3` is a number (YAML 1.1, which PyYAML
    follows, reads an exponent without a dot as a string; `-S` and sweep grids are typed by hand)."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    return value


def apply_overrides(raw: dict, overrides: Mapping[str, object], source: str = "overrides",
                    base: str = str(PARAMS_FILE)) -> dict:
    """`raw` (the params file `base`) with the overrides applied. Names are checked in the order that
    blames the right file: first the base file's own unknown keys (a key misspelt there makes a
    preset's correct key look absent), then each override's, named after the preset file or
    `--set` that set it (`Overrides.origins`; `source` for a plain dict)."""
    origins = getattr(overrides, "origins", {})
    base_problems = unknown_keys(raw)
    lines = [f"{base}: {problem.key}: {problem.reason}" for problem in base_problems]
    explained = {problem.suggests for problem in base_problems if problem.suggests}
    merged = copy.deepcopy(raw)
    for key, value in overrides.items():
        origin = origins.get(key, source)
        loc = tuple(key.split("."))
        named = unknown_key(loc)
        nested = unknown_keys(value, loc) if named is None and isinstance(value, Mapping) else []
        if named is not None or nested:
            lines += [f"{origin}: {problem.key}: {problem.reason}" for problem in ([named] if named else nested)]
            continue
        node = merged
        *parents, leaf = loc
        for depth, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                if ".".join(loc[:depth + 1]) not in explained:
                    lines.append(f"{origin}: {key}: no section {'.'.join(loc[:depth + 1])!r} in {base}")
                break
            node = node[part]
        else:
            if leaf in node:
                node[leaf] = value
            elif key in explained:
                continue
            elif near := _near_miss(raw, loc):  # a misspelling the schema cannot call unknown (train, no TRL)
                lines.append(f"{base}: {key}: missing{near}")
            else:
                lines.append(f"{origin}: {key}: unknown key in {base} (dvc exp run -S sets only keys the file has: "
                             f"add it to {base})")
    if lines:
        raise ParamsError("\n".join(lines))
    return merged


def _override_value(value: object) -> str:
    """A value in DVC's override grammar (Hydra's): JSON, except that mapping keys go unquoted."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_override_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_override_value(item) for item in value) + "]"
    return json.dumps(value)


def dvc_set_args(overrides: dict[str, object]) -> list[str]:
    """`dvc exp run -S` arguments."""
    return [f"{key}={_override_value(value)}" for key, value in overrides.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.params",
                                     description="Validate params.yaml, optionally with a preset and overrides.")
    parser.add_argument("file", nargs="?", default=str(PARAMS_FILE))
    parser.add_argument("--preset", help="preset name (presets/<name>.yaml) or path: dotted-key overrides")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dvc-args", action="store_true",
                        help="print the overrides as `-S key=value` arguments for `dvc exp run`")
    args = parser.parse_args(argv)
    path = Path(args.file)
    try:
        raw = yaml.safe_load(path.read_text()) if path.exists() else None
        if raw is None:
            raise ParamsError(f"{path}: file not found or empty")
        overrides = read_overrides(args.preset, args.sets)
        params = parse_params(apply_overrides(raw, overrides, "--set", base=str(path)), path, overrides.origins)
    except (ParamsError, yaml.YAMLError) as error:
        print(f"error: invalid parameters\n{error}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_PARAMS) from None
    if args.dvc_args:
        print(" ".join(shlex.quote(f"-S={arg}") for arg in dvc_set_args(overrides)))
    else:
        print(f"{path}: ok (run_id={params.run_id}, model={params.model.name_or_path}, data={params.data.source})",
              file=sys.stderr)


if __name__ == "__main__":
    main()
