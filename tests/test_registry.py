"""The model registry (`pipeline.registry`): round trip, atomic writes, concurrent writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from pipeline import registry


def _temps(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def test_round_trip_merge_and_doc(tmp_path):
    path, doc = tmp_path / "registry.json", tmp_path / "docs" / "model_registry.md"
    assert registry.read(path) == registry.empty()  # no file yet: an empty registry, not an error
    registry.upsert(path, "v2", {"base_model": "Qwen/Qwen2.5-VL-7B-Instruct", "metrics": {
        "base": {"accuracy": 0.5, "strict_format": 0.1}, "adapter": {"accuracy": 0.6, "strict_format": 0.9}}},
        doc=doc)
    registry.upsert(path, "v1", {"adapter_path": "outputs/v1/adapter", "hub_status": "pending"}, doc=doc)
    entry = registry.upsert(path, "v2", {"hub_status": "pushed", "hub_repo_id": "org/m", "hub_revision": "a" * 40},
                            doc=doc)
    assert entry["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and entry["hub_status"] == "pushed"  # merged

    data = json.loads(path.read_text())
    assert data["schema_version"] == registry.SCHEMA_VERSION
    assert list(data["runs"]) == ["v1", "v2"]  # sorted: diffs stay small
    assert registry.get(path, "v1")["adapter_path"] == "outputs/v1/adapter"
    with pytest.raises(registry.RegistryError, match="unknown run id 'v3'.*v1, v2"):
        registry.get(path, "v3")

    text = doc.read_text()
    assert text == registry.render_markdown(path)  # the doc is regenerated with every write
    v1_row = next(line for line in text.splitlines() if line.startswith("| v1 |"))
    assert "| pending |" in v1_row and "`outputs/v1/adapter`" in v1_row
    assert "org/m@aaaaaaaaaa" in text and "0.5 → 0.6" in text and "0.1 → 0.9" in text
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # a shared file, not mkstemp's private mode


def test_corrupt_or_newer_registry_is_a_clear_error(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text("{ not json")
    with pytest.raises(registry.RegistryError, match="not valid JSON"):
        registry.upsert(path, "x", {})
    assert path.read_text() == "{ not json"  # never "repaired" by overwriting someone's entries
    path.write_text(json.dumps({"schema_version": 99, "runs": {}}))
    with pytest.raises(registry.RegistryError, match="newer"):
        registry.read(path)


def test_failed_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "registry.json"
    registry.upsert(path, "old", {"note": "kept"})
    before = path.read_bytes()

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.upsert(path, "new", {"note": "lost"})
    assert path.read_bytes() == before
    assert _temps(path) == []


KILLED_WRITER = """
import os, signal, sys
from pipeline import registry
real_fsync = os.fsync
def die(fd):
    real_fsync(fd)
    os.kill(os.getpid(), signal.SIGKILL)  # the temp file is complete, the rename never happens
os.fsync = die
registry.upsert(sys.argv[1], "new", {"note": "x" * 100000})
"""


def test_writer_killed_mid_write_leaves_old_file_and_releases_the_lock(tmp_path):
    path = tmp_path / "registry.json"
    registry.upsert(path, "old", {"note": "kept"})
    before = path.read_bytes()
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=REPO, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert len(_temps(path)) == 1  # the dead writer's temp file ...
    registry.upsert(path, "next", {"note": "ok"})  # ... the lock died with it, and the next writer
    assert _temps(path) == []  # cleans up after it
    assert set(registry.runs(path)) == {"old", "next"}


WRITER = """
import sys
from pipeline import registry
path, doc, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for i in range(count):
    registry.upsert(path, f"w{worker}-{i}", {"worker": worker, "i": i}, doc=doc)
"""


def test_eight_concurrent_writers_lose_nothing_and_readers_never_see_half_a_file(tmp_path):
    path, doc = tmp_path / "registry.json", tmp_path / "model_registry.md"
    registry.upsert(path, "seed", {"worker": -1})
    writers, per_writer = 8, 12
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(doc), str(w), str(per_writer)], cwd=REPO)
             for w in range(writers)]
    reads, deadline = 0, time.monotonic() + 120
    while any(p.poll() is None for p in procs):
        registry.read(path)  # lock-free reader: raises on a torn file
        reads += 1
        assert time.monotonic() < deadline, "writers did not finish"
    assert [p.returncode for p in procs] == [0] * writers
    runs = registry.runs(path)
    assert len(runs) == 1 + writers * per_writer
    assert {f"w{w}-{i}" for w in range(writers) for i in range(per_writer)} <= set(runs)
    assert all(f"| w{w}-{i} |" in doc.read_text() for w in range(writers) for i in range(per_writer))
    assert reads > 0 and _temps(path) == []
