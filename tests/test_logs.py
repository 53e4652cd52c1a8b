"""A stage's console: its own lines at INFO, libraries' at WARNING unless LOG_LEVEL says otherwise;
each distinct warning once per process, vLLM's included; progress bars paced for log files."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import logs
from pipeline.logs import OncePerProcess

REPO = Path(__file__).resolve().parents[1]
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1"}


def _stage_process(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` after logs.configure(), as a stage runs it: a fresh process, output to pipes (no terminal)."""
    return subprocess.run([sys.executable, "-c", "from pipeline import logs; logs.configure()\n" + code],
                          cwd=REPO, capture_output=True, text=True, env={**BASE_ENV, **env})


def test_a_repeated_warning_passes_once_and_info_always():
    once = OncePerProcess()

    def record(level: int, msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord("vllm.worker", level, __file__, 1, msg, args, None)

    assert [once.filter(record(logging.WARNING, "skip it")) for _ in range(3)] == [True, False, False]
    assert once.filter(record(logging.WARNING, "step %d", 1)) and once.filter(record(logging.WARNING, "step %d", 2))
    assert all(once.filter(record(logging.INFO, "progress")) for _ in range(3))


EMIT = """
import logging
for name in ("pipeline.prepare", "httpx", "datasets.builder"):
    for level in ("debug", "info", "warning"):
        getattr(logging.getLogger(name), level)(f"{name} {level} line")
"""


@pytest.mark.parametrize(("log_level", "shown"), [
    (None, {"pipeline.prepare info", "pipeline.prepare warning", "httpx warning", "datasets.builder warning"}),
    ("", {"pipeline.prepare info", "pipeline.prepare warning", "httpx warning", "datasets.builder warning"}),
    ("info", {"pipeline.prepare info", "pipeline.prepare warning", "httpx info", "httpx warning",
              "datasets.builder info", "datasets.builder warning"}),
    ("DEBUG", {f"{name} {level}" for name in ("pipeline.prepare", "httpx", "datasets.builder")
               for level in ("debug", "info", "warning")}),
    ("warning", {"pipeline.prepare warning", "httpx warning", "datasets.builder warning"}),
])
def test_log_level_decides_whose_lines_show(log_level, shown):
    result = _stage_process(EMIT, **({} if log_level is None else {"LOG_LEVEL": log_level}))
    assert result.returncode == 0, result.stderr
    printed = {line.split(": ", 1)[1].removesuffix(" line") for line in result.stderr.splitlines() if ": " in line}
    assert printed == shown


@pytest.mark.parametrize("value", ["verbose", "10", "warn"])
def test_a_bad_log_level_is_named_with_the_accepted_values(value):
    result = _stage_process("print('went on')", LOG_LEVEL=value)
    assert result.returncode == 1 and "went on" not in result.stdout
    assert f"LOG_LEVEL={value!r} is not a log level: use one of debug, info, warning, error" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(logs.LogLevelError, match="LOG_LEVEL"):
        logs.levels({"LOG_LEVEL": value})


VLLM = """
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging, init_logger
configure_logging(LoggingConfig())  # what vLLM does when it builds an engine: configs/vllm_logging.json
log = init_logger('vllm.v1.worker.cpu_worker')
for _ in range(5): log.warning('CPU backend does not allow it, skip it.')
log.info('engine ready'); log.info('engine ready'); log.debug('engine detail')
import logging
for _ in range(2): logging.getLogger('pipeline.x').warning('ours')
logging.getLogger('pipeline.x').info('our progress')
"""


@pytest.mark.parametrize(("env", "ready", "detail"), [
    ({}, 0, 0),
    ({"LOG_LEVEL": "debug"}, 2, 1),
    ({"VLLM_LOGGING_LEVEL": "INFO"}, 2, 0),  # vLLM's own variable, for vLLM's lines alone
])
def test_vllm_lines_follow_log_level_through_the_filter(env, ready, detail):
    """The real vLLM logger, configured from configs/vllm_logging.json as vLLM's engine does."""
    result = _stage_process(VLLM, **env)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert out.count("skip it.") == 1  # warnings always, once
    assert out.count("engine ready") == ready and out.count("engine detail") == detail
    assert out.count("ours") == 1 and out.count("our progress") == 1


def test_a_bar_in_a_log_file_redraws_rarely_and_ends_with_its_rate(monkeypatch):
    stderr = io.StringIO()  # no terminal
    monkeypatch.setattr(sys, "stderr", stderr)
    bar = logs.progress(range(1000), desc="eval base [vllm]")
    assert bar.mininterval == logs.LOG_FILE_BAR_INTERVAL_S
    for _ in bar:
        pass
    redraws = [part for part in stderr.getvalue().split("\r") if part.strip()]
    assert len(redraws) <= 2, redraws  # the start and the end, not one per row
    assert redraws[-1].startswith("eval base [vllm]: 100%") and "1000/1000" in redraws[-1] and "row/s" in redraws[-1]
    vllm_style = logs.progress_factory("eval adapter [vllm]")(total=3, desc="Processed prompts", dynamic_ncols=True)
    assert vllm_style.desc == "eval adapter [vllm]" and vllm_style.unit == "row"
    vllm_style.close()
