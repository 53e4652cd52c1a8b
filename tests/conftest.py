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


@pytest.fixture(scope="session")
def embedded_root() -> Path:
    """`make embedded`'s output; rebuilt only when the code that defines it changed."""
    from pipeline.embedded import ROOT, build_all

    os.chdir(REPO)
    return REPO / build_all(ROOT)


@pytest.fixture(scope="session")
def tiny_model_dir(embedded_root: Path) -> Path:
    return embedded_root / "tiny-qwen2_5_vl"
