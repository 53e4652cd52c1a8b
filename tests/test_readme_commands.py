"""Every shell command of README.md and docs/inference_guide.md, run as written, in order, in a
fresh clone after `make demo`, with the project's environment on PATH as the README says
(`source .venv/bin/activate`); then the figures the docs print are compared with the real ones.

A fenced ```bash block runs line by line (a `\\` continuation joins lines), a ```python block runs
as a script; a block right after an HTML comment `<!-- docs-test: not run: <reason> -->` is not
run (GPU hosts, the image build), and `NOT_RUN` holds the single lines that cannot run inside the
test suite. The file sorts after test_pipeline.py on purpose: both clones share one DVC cache, so
`make demo` here restores the demo that test_pipeline.py trained from DVC's run cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import clone_repo, git_env

# one pytest-xdist worker: test_readme_commands.py restores this module's demo from the shared DVC cache
pytestmark = pytest.mark.xdist_group("clone")

REPO = Path(__file__).resolve().parents[1]
DOCS = (REPO / "README.md", REPO / "docs" / "inference_guide.md")
NOT_RUN = {"make test": "the test suite itself"}
SKIP = re.compile(r"<!-- docs-test: not run: (?P<reason>[^>]+?) -->\s*$")
BLOCK = re.compile(r"^```(?P<lang>\w+)\n(?P<body>.*?)^```", re.S | re.M)
# What the docs' printed figures may differ by from a run on another CPU (docs/performance.md:
# the demo's reward and accuracy over 3 seeds spread by less than this)
FIGURE_TOLERANCE = 0.15


def documented_steps(path: Path) -> list[tuple[str, str]]:
    """('bash', line) and ('python', script) in document order; skipped blocks need a reason."""
    text = path.read_text()
    steps = []
    for match in BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if SKIP.search(before):
            continue
        assert "docs-test" not in before, f"{path.name}: a skip comment without its reason: {before}"
        if match["lang"] == "python":
            steps.append(("python", match["body"]))
        elif match["lang"] == "bash":
            for line in match["body"].replace("\\\n", " ").splitlines():
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#") and command not in NOT_RUN:
                    steps.append(("bash", command))
    return steps


def test_the_docs_mark_what_they_do_not_run():
    """Every command not run is one the docs still show, and each skipped block says why."""
    steps = {text for path in DOCS for _, text in documented_steps(path)}
    assert any(step.startswith("make demo") for step in steps)
    readme = DOCS[0].read_text()
    for line in NOT_RUN:
        assert re.search(rf"^{re.escape(line)}\b", readme, re.M), f"NOT_RUN names {line!r}, no longer in README"
    for path in DOCS:
        for reason in re.findall(r"<!-- docs-test: not run: ([^>]*) -->", path.read_text()):
            assert len(reason.split()) >= 3, f"{path.name}: say why a block is not run ({reason!r})"


@pytest.fixture(scope="module")
def clone(tmp_path_factory, shared_dvc_cache) -> Path:
    return clone_repo(tmp_path_factory.mktemp("readme") / "repo", shared_dvc_cache)


def _shell(clone: Path, command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = git_env()
    venv = clone / ".venv"
    env.update(PATH=f"{venv}/bin:{env['PATH']}", VIRTUAL_ENV=str(venv))  # source .venv/bin/activate
    return subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def outputs(clone) -> dict[str, str]:
    """Each documented step's output, keyed by the command; the first failure stops the walk."""
    seen = {}
    for path in DOCS:
        for kind, step in documented_steps(path):
            command = step if kind == "bash" else f"python - <<'GUIDE'\n{step}GUIDE"
            result = _shell(clone, command)
            assert result.returncode == 0, (f"{path.name}: `{step[:200]}` exited {result.returncode}:\n"
                                            f"{result.stdout[-3000:]}\n{result.stderr[-4000:]}")
            seen[step] = result.stdout + result.stderr
    return seen


def _table(text: str, header: str) -> dict[str, list[str]]:
    """A fixed-width table printed by `make compare`: first column → the row's cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("$"):
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def _exp_ref(clone: Path, name: str) -> str:
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=clone,
                          capture_output=True, text=True, check=True).stdout.split()
    return next(ref for ref in refs if ref.rsplit("/", 1)[-1] == name)


def _close(documented: str, measured: str) -> bool:
    try:
        return abs(float(documented) - float(measured)) <= FIGURE_TOLERANCE
    except ValueError:
        return documented == measured


def test_every_documented_command_runs_and_the_figures_hold(clone, outputs):
    readme = DOCS[0].read_text()
    documented = _table(readme.split("$ make compare", 1)[1], "run ")
    measured = _table(outputs["make compare"], "run ")
    for run in ("demo", "short"):
        assert run in measured, outputs["make compare"]
        doc_cells, real_cells = documented[run][:6], measured[run][:6]  # steps, reward, accuracies, format
        assert all(_close(d, m) for d, m in zip(doc_cells, real_cells, strict=True)), (run, doc_cells, real_cells)

    # the run lifecycle the README walks through
    assert "train.max_steps=12" in outputs["make compare"]
    registry = json.loads((clone / "outputs" / "registry.json").read_text())["runs"]
    assert {"demo", "short", "v2"} <= set(registry)  # `dvc exp apply demo` dropped no run
    def exp_file(name: str, path: str) -> str:
        return subprocess.run(["git", "show", f"{_exp_ref(clone, name)}:{path}"], cwd=clone,
                              capture_output=True, text=True, check=True).stdout

    adapters = {name: yaml.safe_load(exp_file(name, "dvc.lock"))["stages"]["train"]["outs"][0]["md5"]
                for name in ("lr-1", "lr-2")}  # the sweep: two runs of DVC's queue, each its own
    assert adapters["lr-1"] != adapters["lr-2"]
    assert yaml.safe_load(exp_file("lr-2", "params.yaml"))["train"]["learning_rate"] == 0.003
    assert (clone / "dvc_plots" / "index.html").is_file()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    allowed = ("params.yaml", "dvc.lock", "reports/", "images/")  # what an experiment documents, the guide's images
    assert all(line[3:].startswith(allowed) for line in status.splitlines()), status

    # the inference guide: the demo adapter, asked as it was trained, answers in the format
    guide = outputs['python -m pipeline.infer --run_id demo --image_path images --prompt '
                    '"How many squares are in the image?" --answer_type integer']
    followed = guide.count("format: followed")
    assert followed >= 3, guide
    assert guide.count("[demo] images/") == 4
    assert os.path.isdir(clone / "outputs" / "inference")
