"""Logging for every stage: one format, the stage's own lines over library noise, each distinct
warning once per process, and progress bars that suit a terminal and a log file alike.

A stage's console is for its own progress. vLLM alone logs dozens of INFO lines at engine start
(its config, every compile phase, the KV-cache size), and httpx, filelock, accelerate and TRL add
theirs: the stage's own lines (`pipeline.*`) were lost among them. So the project's loggers log at
INFO and every other library at WARNING (warnings and errors still show); `LOG_LEVEL=debug` (or
`info`, `warning`, `error`) puts everything, libraries included, at that level when a run needs
to be debugged.

vLLM's CPU worker replaces `torch.set_num_threads` with a function that warns on every call, and
the trainer calls it at every step: without a filter the same line fills the log hundreds of times.
vLLM configures its own loggers when it builds an engine (also in the engine processes it spawns;
until then its lines go through the root logger like any library's);
`VLLM_LOGGING_CONFIG_PATH` points it at configs/vllm_logging.json, which puts the same filter on
its handler and takes its level from `vllm_handler` here. TRL prints sample completions as a rich
table sized to the terminal; in a log file (no terminal) rich assumes 80 columns and wraps every
cell to a few characters, so a wider page is set when no terminal is attached.

Progress bars (tqdm) go to stderr. In a terminal a bar redraws in place; in a log file every redraw
is appended, so without a terminal a bar redraws at most every `LOG_FILE_BAR_INTERVAL_S` seconds
(and once at the end). Our own bars get that from `progress`; the libraries' own bars (datasets'
`map`, the Trainer's steps) from tqdm's `TQDM_MININTERVAL`/`TQDM_MAXINTERVAL`, which tqdm reads
when it is first imported (so in this process only if `configure` runs before that, and in every
process a stage starts).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(name)s: %(message)s"
VLLM_LOGGING_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "vllm_logging.json"
LOG_FILE_COLUMNS = "200"
LOG_FILE_BAR_INTERVAL_S = 15.0

OWN_LOGGER = "pipeline"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
DEFAULT_LEVELS = (logging.INFO, logging.WARNING)  # (the project's loggers, every other library's)
# libraries that keep a level of their own (set when they are imported, from these variables)
LIBRARY_LEVEL_VARIABLES = {"transformers": "TRANSFORMERS_VERBOSITY", "datasets": "DATASETS_VERBOSITY"}


class LogLevelError(ValueError):
    """LOG_LEVEL holds a value that is not a level."""


def levels(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(the project's level, the libraries' level) from LOG_LEVEL; unset or empty: INFO and WARNING."""
    value = environ.get("LOG_LEVEL", "").strip()
    if not value:
        return DEFAULT_LEVELS
    level = LEVELS.get(value.lower())
    if level is None:
        raise LogLevelError(f"LOG_LEVEL={value!r} is not a log level: use one of {', '.join(LEVELS)} "
                            "(unset: the stage's own lines at info, other libraries' at warning)")
    return level, level


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


def vllm_level(environ: Mapping[str, str] = os.environ) -> int:
    """vLLM's own `VLLM_LOGGING_LEVEL` when set (configure() sets it from LOG_LEVEL), else the
    libraries' level: vLLM reads that variable only when no config file is given, and ours is."""
    value = environ.get("VLLM_LOGGING_LEVEL", "").strip().upper()
    level = logging.getLevelName(value) if value else None
    return level if isinstance(level, int) else levels(environ)[1]


def vllm_handler() -> logging.Handler:
    """vLLM's handler, built by configs/vllm_logging.json in every process that imports vLLM.

    A dictConfig file cannot read the environment, so the level is set here, on the handler and on
    the `vllm` logger (the file names no level for it, so dictConfig keeps this one). On the logger
    too, not only the handler: vLLM then does not build records for the lines nobody will see."""
    level = vllm_level()
    logging.getLogger("vllm").setLevel(level)
    handler = logging.StreamHandler(sys.stdout)
    handler.setLevel(level)
    return handler


def configure() -> None:
    """Call first in a stage's main(), before vLLM, transformers or tqdm are imported.

    Raises SystemExit naming LOG_LEVEL when it holds no level: a typo there must not silently
    show (or hide) a run's lines."""
    try:
        own, libraries = levels()
    except LogLevelError as error:
        raise SystemExit(f"error: {error}") from None
    logging.basicConfig(format=FORMAT)
    root = logging.getLogger()
    root.setLevel(libraries)
    logging.getLogger(OWN_LOGGER).setLevel(own)
    for handler in root.handlers:
        if not any(isinstance(f, OncePerProcess) for f in handler.filters):
            handler.addFilter(OncePerProcess())
    if os.environ.get("LOG_LEVEL", "").strip():
        name = logging.getLevelName(libraries)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", name)
        for library, variable in LIBRARY_LEVEL_VARIABLES.items():
            os.environ.setdefault(variable, name.lower())
            logging.getLogger(library).setLevel(libraries)  # in case it was imported already
    os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", LOG_FILE_COLUMNS)
    if not sys.stderr.isatty():
        interval = f"{LOG_FILE_BAR_INTERVAL_S:g}"
        os.environ.setdefault("TQDM_MININTERVAL", interval)
        os.environ.setdefault("TQDM_MAXINTERVAL", interval)


def _bar_pacing() -> dict[str, float]:
    if sys.stderr.isatty():
        return {}
    return {"mininterval": LOG_FILE_BAR_INTERVAL_S, "maxinterval": LOG_FILE_BAR_INTERVAL_S}


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "row",
             **options: Any):
    """A tqdm bar on stderr with rate and ETA, for the stage's own long loops (use as tqdm:
    iterate it, or `update(n)` it in a `with` block)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, **{**_bar_pacing(), **options})


def progress_factory(desc: str, unit: str = "row") -> Callable[..., Any]:
    """A bar for libraries that make their own from a tqdm-like callable (vLLM's `use_tqdm`):
    ours, with our description, unit and pacing over theirs."""
    def make(*args: Any, **options: Any):
        return progress(*args, **{**options, "desc": desc, "unit": unit})

    return make
