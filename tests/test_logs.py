"""Each distinct warning once per process, vLLM's included; info lines always."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from pipeline.logs import OncePerProcess

REPO = Path(__file__).resolve().parents[1]


def test_a_repeated_warning_passes_once_and_info_always():
    once = OncePerProcess()

    def record(level: int, msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord("vllm.worker", level, __file__, 1, msg, args, None)

    assert [once.filter(record(logging.WARNING, "skip it")) for _ in range(3)] == [True, False, False]
    assert once.filter(record(logging.WARNING, "step %d", 1)) and once.filter(record(logging.WARNING, "step %d", 2))
    assert all(once.filter(record(logging.INFO, "progress")) for _ in range(3))


def test_vllm_loggers_go_through_the_filter_in_a_stage_process():
    """The real vLLM logger, configured at its import from configs/vllm_logging.json."""
    code = ("from pipeline import logs; logs.configure()\n"
            "from vllm.logger import init_logger\n"
            "log = init_logger('vllm.v1.worker.cpu_worker')\n"
            "for _ in range(5): log.warning('CPU backend does not allow it, skip it.')\n"
            "log.info('engine ready'); log.info('engine ready')\n"
            "import logging\n"
            "for _ in range(2): logging.getLogger('pipeline.x').warning('ours')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "VLLM_NO_USAGE_STATS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert out.count("skip it.") == 1
    assert out.count("engine ready") == 2
    assert out.count("ours") == 1
