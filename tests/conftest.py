"""Shared fixtures: the embedded default (tiny models + synthetic data), built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the network, and caches stay inside the workspace.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(REPO / ".cache" / "huggingface"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(REPO / ".cache" / "vllm"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist's workers (execnet) export COLUMNS=80 and LINES=24; the stages the tests start must
# see a user's environment, where a log file has no width (pipeline.logs sets one for it)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


@pytest.fixture(scope="session")
def embedded_root() -> Path:
    """`make embedded`'s output; rebuilt only when the code that defines it changed. `make test` runs
    two pytest workers (pytest-xdist): the first builds it, the other waits on the lock."""
    from filelock import FileLock

    from pipeline.embedded import ROOT, build_all

    os.chdir(REPO)
    (REPO / ".cache").mkdir(exist_ok=True)
    with FileLock(str(REPO / ".cache" / "embedded-build.lock")):
        return REPO / build_all(ROOT)


def git_env() -> dict[str, str]:
    """This environment with the test's Python first on PATH (dvc, python) and a git identity for the
    commits DVC experiments make."""
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.invalid", GIT_COMMITTER_NAME="ci",
               GIT_COMMITTER_EMAIL="ci@example.invalid", PYTHONUNBUFFERED="1")
    return env


def clone_repo(dest: Path, cache: Path) -> Path:
    """A fresh clone of the committed project whose DVC cache is `cache`, with the test's environment
    as its `.venv` (`make setup` finds it up to date). A cache shared by several clones builds the
    embedded default once and lets DVC's run cache restore a stage another clone already ran."""
    import subprocess
    import sys

    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    subprocess.run(["dvc", "cache", "dir", "--local", str(cache)], cwd=dest, env=git_env(), check=True)
    (dest / ".venv").symlink_to(Path(sys.executable).parents[1])
    return dest


@pytest.fixture(scope="session")
def shared_dvc_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dvc-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_root: Path) -> Path:
    return embedded_root / "tiny-qwen2_5_vl"


def shipped_params_text() -> str:
    """The project's params.yaml. After `make demo` the working copy holds that run's values (DVC
    experiments write them, run_id included); then the committed file is the shipped one."""
    import subprocess

    import yaml

    text = (REPO / "params.yaml").read_text()
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], capture_output=True, text=True, cwd=REPO)
    if shown.returncode == 0 and shown.stdout != text:
        if yaml.safe_load(text).get("run_id") != yaml.safe_load(shown.stdout).get("run_id"):
            return shown.stdout
    return text


def committed_params() -> dict:
    import yaml

    return yaml.safe_load(shipped_params_text())


def demo_params(run_id: str, **overrides) -> dict:
    """Committed params + presets/demo.yaml + `section__key=value` overrides."""
    import yaml

    from pipeline.params import apply_overrides

    preset = yaml.safe_load((REPO / "presets" / "demo.yaml").read_text())
    extra = {key.replace("__", "."): value for key, value in overrides.items()}
    return apply_overrides(committed_params(), {**preset, **extra, "run_id": run_id})


class Workspace:
    """A scratch project folder: params.yaml, the embedded assets, prepared data; stages run in it."""

    def __init__(self, root: Path, embedded: Path):
        self.root = root
        (root / "assets").mkdir(parents=True, exist_ok=True)
        link = root / "assets" / "embedded"
        if not link.exists():
            link.symlink_to(embedded)
        if not (root / "configs").exists():
            (root / "configs").symlink_to(REPO / "configs")

    def write_params(self, params: dict) -> None:
        import yaml

        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def run(self, module: str, timeout: int = 600, extra_env: dict | None = None, check: bool = True):
        import subprocess
        import sys

        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **(extra_env or {}))
        result = subprocess.run([sys.executable, "-m", module], cwd=self.root, env=env, capture_output=True,
                                text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{module} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        return result

    def kill_train_at(self, checkpoint: Path, timeout: float = 300) -> None:
        """Start the train stage and kill -9 it once `checkpoint` is written: a crash mid-run."""
        import signal
        import subprocess
        import sys
        import time

        log = self.root / "killed-train.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        process = subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=self.root, env=env,
                                   stdout=subprocess.DEVNULL, stderr=log.open("w"))
        deadline = time.time() + timeout
        while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        ended = process.poll() is not None
        if not ended:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not ended, f"the run ended before the kill:\n{log.read_text()[-4000:]}"
        assert checkpoint.exists(), f"no checkpoint before the kill:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, embedded_root) -> Path:
    """The demo preset's prepared data, made once; train tests copy it under their own run id."""
    ws = Workspace(tmp_path_factory.mktemp("prepared"), embedded_root)
    ws.write_params(demo_params("prepared"))
    ws.run("pipeline.prepare")
    return ws.root / "outputs" / "prepared" / "data"


@pytest.fixture
def workspace(tmp_path, embedded_root, prepared_data):
    """Factory: workspace(run_id, **overrides) → a Workspace with params written and data prepared."""
    import shutil

    def make(run_id: str = "t", **overrides) -> Workspace:
        ws = Workspace(tmp_path / run_id, embedded_root)
        ws.write_params(demo_params(run_id, **overrides))
        shutil.copytree(prepared_data, ws.root / "outputs" / run_id / "data")
        return ws

    return make
