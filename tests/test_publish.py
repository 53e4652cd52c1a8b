"""The publish stage (`pipeline.publish`): local registration, the model card, Hub push failures and retries.

No test reaches the Hub: the failure path points HF_ENDPOINT at a closed local port, the
half-way failure and its retry use a stand-in for `HfApi`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, demo_params

from pipeline import publish as pub
from pipeline import registry
from pipeline.answer_format import SYSTEM_PROMPT
from pipeline.params import parse_params

FAKE_TOKEN = "hf_PLANTEDfakeTOKENdoNOTleak0123456789"
METRICS = {
    "base": {"rows": 58, "accuracy": 0.1552, "accuracy_ci95": [0.0838, 0.2693], "strict_format": 0.25,
             "soft_format": 0.3, "extraction_rate": 0.9},
    "adapter": {"rows": 58, "accuracy": 0.2241, "accuracy_ci95": [0.1, 0.3], "strict_format": 0.8966,
                "soft_format": 0.9, "extraction_rate": 1.0},
}


def _workspace(root: Path, run_id: str = "pub1", **overrides) -> Path:
    """A run's outputs as the earlier stages leave them: an adapter folder and eval metrics."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(demo_params(run_id, **overrides), sort_keys=False))
    adapter = root / "outputs" / run_id / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (adapter / "README.md").write_text("peft's template card")
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "eval_metrics.json").write_text(json.dumps(METRICS))
    return root


def _run_stage(root: Path, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
    env.update(PYTHONPATH=str(REPO), **env_changes)
    return subprocess.run([sys.executable, "-m", "pipeline.publish"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def _all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.name != ".env")


def test_default_registers_locally_and_says_nothing_was_pushed(tmp_path):
    root = _workspace(tmp_path / "ws")
    result = _run_stage(root)
    assert result.returncode == 0, result.stderr
    assert "NOTHING pushed to the Hub (publish.push_to_hub is false)" in result.stderr
    entry = registry.get(root / "outputs" / "registry.json", "pub1")
    assert entry["hub_status"] == "disabled" and entry["hub_revision"] is None
    assert entry["adapter_path"] == "outputs/pub1/adapter" and entry["adapter_digest"].startswith("sha256:")
    assert entry["base_model"] == "assets/embedded/tiny-qwen2_5_vl" and entry["base_model_revision"] == "main"
    assert entry["metrics"]["adapter"]["accuracy"] == 0.2241 and entry["params_digest"]
    assert entry["image_preprocessing"]["factor"] == 16  # the demo preset's, for pipeline.infer
    assert entry["system_prompt"] == SYSTEM_PROMPT  # infer asks as training asked
    for key in ("dvc_hashes", "git_commit", "registered_at", "image_tag"):
        assert key in entry
    record = json.loads((root / "outputs" / "pub1" / "publish.json").read_text())
    assert record == {key: value for key, value in entry.items() if key not in ("registered_at", "pushed_at")}
    assert "| pub1 |" in (root / "outputs" / "model_registry.md").read_text()


def test_push_without_token_is_pending_not_a_failure(tmp_path):
    root = _workspace(tmp_path / "ws", publish__push_to_hub=True, publish__hub_repo_id="me/grpo")
    result = _run_stage(root)
    assert result.returncode == 0, result.stderr
    assert "NOTHING pushed to the Hub: no HF_TOKEN in the environment or .env" in result.stderr
    entry = registry.get(root / "outputs" / "registry.json", "pub1")
    assert entry["hub_status"] == "pending" and entry["hub_repo_id"] == "me/grpo"
    assert "pending (me/grpo)" in (root / "outputs" / "model_registry.md").read_text()


def test_unreachable_hub_fails_fast_stays_pending_and_never_writes_the_token(tmp_path):
    root = _workspace(tmp_path / "ws", publish__push_to_hub=True, publish__hub_repo_id="me/grpo")
    (root / ".env").write_text(f"HF_TOKEN={FAKE_TOKEN}\n")  # only in .env: proves .env is read
    result = _run_stage(root, HF_ENDPOINT="http://127.0.0.1:9", IMAGE_TAG="grpo-qwen-vl:1.2.3")
    assert result.returncode == 0, result.stderr
    assert "NOTHING pushed to the Hub: the push failed" in result.stderr
    assert "run `python -m pipeline.publish` again" in result.stderr
    entry = registry.get(root / "outputs" / "registry.json", "pub1")
    assert entry["hub_status"] == "pending" and entry["hub_revision"] is None and entry["hub_error"]
    assert entry["image_tag"] == "grpo-qwen-vl:1.2.3"
    written = _all_text(root)
    assert (root / "outputs" / "registry.json").is_file()
    assert FAKE_TOKEN not in written and FAKE_TOKEN not in result.stdout + result.stderr
    assert FAKE_TOKEN not in yaml.safe_dump(demo_params("pub1"))  # nor in what dvc.lock would record


def test_hub_token_sources_and_redaction(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"# comment\nHF_TOKEN={FAKE_TOKEN}\n")
    assert pub.hub_token({}, dotenv) == FAKE_TOKEN
    assert pub.hub_token({"HF_TOKEN": "hf_fromenv"}, dotenv) == "hf_fromenv"  # the environment wins
    assert pub.hub_token({}, tmp_path / "absent.env") is None
    assert FAKE_TOKEN not in pub.redact(f"401 for Bearer {FAKE_TOKEN}", FAKE_TOKEN)
    assert "hf_***" in pub.redact("header: hf_someOtherTokenValue", None)


def _card_params(**overrides):
    raw = demo_params("card1", model__name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", data__source="AI4Math/MathVista",
                      publish__push_to_hub=True, publish__hub_repo_id="me/grpo-vl", **overrides)
    return parse_params(raw)


def test_model_card_has_metadata_provenance_and_no_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    params = _card_params()
    entry = {"git_commit": "c0ffee" * 6 + "abcd", "git_dirty": False, "params_digest": "0123456789abcdef",
             "dvc_hashes": {"data": "d" * 32 + ".dir", "adapter": "a" * 32 + ".dir"},
             "adapter_digest": "sha256:" + "e" * 64, "base_model_commit": "b" * 40, "image_tag": "img:7",
             "registered_at": "2026-01-01T00:00:00+00:00"}
    card = pub.build_model_card(params, entry, METRICS)
    text = str(card)
    data = card.data.to_dict()
    assert data["library_name"] == "peft"
    assert data["base_model"] == "Qwen/Qwen2.5-VL-7B-Instruct" and data["datasets"] == ["AI4Math/MathVista"]
    assert {"grpo", "lora", "run-card1"} <= set(data["tags"])
    results = data["model-index"][0]["results"]
    assert {(m["type"], m["value"]) for r in results for m in r["metrics"]} >= {("accuracy", 0.2241),
                                                                                ("strict_format", 0.8966)}
    for needle in (entry["git_commit"], "d" * 32 + ".dir", "a" * 32 + ".dir", "0123456789abcdef", "img:7",
                   "b" * 40, 'revision="card1"', "learning_rate:", "## Parameters", "0.1552 | 0.2241"):
        assert needle in text, needle
    assert FAKE_TOKEN not in text and "hf_" not in text


def test_the_model_card_says_when_the_base_was_quantized_in_training():
    plain = str(pub.build_model_card(_card_params(), {}, METRICS))
    assert "| base model in training | unquantized (the checkpoint's dtype) |" in plain and "QLoRA" not in plain
    qlora = str(pub.build_model_card(_card_params(model__quantization="4bit", train__vllm_weight_sync="adapter",
                                                  train__vllm_enable_sleep_mode=False), {}, METRICS))
    assert "| base model in training | 4-bit NF4, double quantization (bitsandbytes) |" in qlora
    assert "The base was quantized while training" in qlora and "quantization: 4bit" in qlora


def test_model_card_keeps_local_paths_out_of_hub_metadata():
    params = parse_params(demo_params("card2"))  # embedded default: local model and dataset folders
    card = pub.build_model_card(params, {"image_tag": None}, METRICS)
    assert "base_model" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert "assets/embedded/tiny-qwen2_5_vl" in str(card) and "IMAGE_TAG not set" in str(card)


class FakeHub:
    """Records calls; `fail_tag_once` makes the first create_tag fail, as a dropped connection would."""

    def __init__(self, fail_tag_once: bool = False):
        self.calls, self.tags, self.fail_tag_once, self.commits = [], {}, fail_tag_once, 0

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits += 1
        self.calls.append(("create_commit", sorted(op.path_in_repo for op in operations)))
        self.readme = next(op for op in operations if op.path_in_repo == "README.md").path_or_fileobj
        oid = f"{self.commits:040x}"
        return SimpleNamespace(oid=oid, commit_url=f"https://hub.test/{repo_id}/commit/{oid}")

    def list_repo_refs(self, repo_id):
        return SimpleNamespace(tags=[SimpleNamespace(name=n, target_commit=c) for n, c in self.tags.items()])

    def create_tag(self, repo_id, *, tag, revision, **kwargs):
        self.calls.append(("create_tag", tag, revision))
        if self.fail_tag_once:
            self.fail_tag_once = False
            raise ConnectionError(f"connection reset (Authorization: Bearer {FAKE_TOKEN})")
        self.tags[tag] = revision

    def delete_tag(self, repo_id, *, tag):
        self.calls.append(("delete_tag", tag))
        del self.tags[tag]


def test_push_failing_half_way_is_pending_and_a_retry_completes_it(tmp_path, monkeypatch):
    root = _workspace(tmp_path / "ws", run_id="half", publish__push_to_hub=True, publish__hub_repo_id="me/grpo")
    monkeypatch.chdir(root)
    params = parse_params(yaml.safe_load((root / "params.yaml").read_text()))
    env = {"HF_TOKEN": FAKE_TOKEN}
    hub = FakeHub(fail_tag_once=True)

    entry, outcome = pub.publish(params, env=env, api=hub)  # the commit lands, the tag does not
    assert entry["hub_status"] == "pending" and entry["hub_commit"] == f"{1:040x}" and entry["hub_revision"] is None
    assert "tag missing" in outcome and FAKE_TOKEN not in outcome and FAKE_TOKEN not in entry["hub_error"]
    assert hub.calls[1] == ("create_commit", ["README.md", "adapter_config.json", "adapter_model.safetensors"])
    assert b"library_name: peft" in hub.readme and b"peft's template card" not in hub.readme
    assert registry.get("outputs/registry.json", "half")["hub_status"] == "pending"  # consistent on disk, too

    entry, outcome = pub.publish(params, env=env, api=hub)  # retry: tags the existing commit, no re-upload
    assert hub.commits == 1 and hub.tags == {"half": f"{1:040x}"}
    assert entry["hub_status"] == "pushed" and entry["hub_revision"] == f"{1:040x}" and entry["hub_tag"] == "half"
    assert entry["hub_error"] is None and "pushed to the Hub" in outcome

    calls = len(hub.calls)
    entry, outcome = pub.publish(params, env=env, api=hub)  # nothing changed: nothing to do
    assert len(hub.calls) == calls and "already on the Hub" in outcome

    (root / "outputs" / "half" / "adapter" / "adapter_model.safetensors").write_bytes(b"\1" * 64)  # retrained
    entry, _ = pub.publish(params, env=env, api=hub)
    assert hub.commits == 2 and entry["hub_revision"] == f"{2:040x}" and hub.tags == {"half": f"{2:040x}"}
    assert ("delete_tag", "half") in hub.calls  # the run id's tag follows the newest adapter
    assert FAKE_TOKEN not in _all_text(root)


def test_publish_refuses_a_run_without_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no adapter in outputs/nothing/adapter"):
        pub.publish(parse_params(demo_params("nothing")))
    assert not (tmp_path / "outputs" / "registry.json").exists()
