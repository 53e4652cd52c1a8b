"""Logging for every stage: one format, and each distinct warning once per process.

vLLM's CPU worker replaces `torch.set_num_threads` with a function that warns on every call, and
the trainer calls it at every step: without a filter the same line fills the log hundreds of times.
vLLM configures its own loggers when it is imported (also in the engine processes it spawns);
`VLLM_LOGGING_CONFIG_PATH` points it at configs/vllm_logging.json, which puts the same filter on
its handler. TRL prints sample completions as a rich table sized to the terminal; in a log file
(no terminal) rich assumes 80 columns and wraps every cell to a few characters, so a wider page is
set when no terminal is attached.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(name)s: %(message)s"
VLLM_LOGGING_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vllm_logging.json"
LOG_FILE_COLUMNS = "200"


class OncePerProcess(logging.Filter):
    """Passes a warning (or error) the first time its logger, level and text are seen; info always."""

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def configure() -> None:
    """Call first in a stage's main(), before vLLM is imported."""
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, OncePerProcess) for f in handler.filters):
            handler.addFilter(OncePerProcess())
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", LOG_FILE_COLUMNS)
