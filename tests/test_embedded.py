"""The embedded default: tiny Qwen-VL models and the synthetic MathVista-schema dataset."""

from __future__ import annotations

import hashlib

import pytest

from pipeline import modeling, prompts, synthetic

MATHVISTA_COLUMNS = ["pid", "question", "image", "decoded_image", "choices", "unit", "precision", "answer",
                     "question_type", "answer_type", "metadata", "query"]


@pytest.mark.parametrize("kind", modeling.TINY_KINDS)
def test_tiny_model_loads_through_from_pretrained_and_generates(tmp_path, kind):
    import torch
    from PIL import Image

    out = modeling.build_tiny_model(kind, tmp_path / kind, seed=0)
    processor = modeling.load_processor(str(out))
    model = modeling.load_model(str(out))
    expected_class = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                      "qwen3_vl": "Qwen3VLForConditionalGeneration"}[kind]
    assert type(model).__name__ == expected_class
    messages = prompts.conversation(prompts.user_text("How many circles are in the image?"))
    messages[1]["content"] = [{"type": "image"}, {"type": "text", "text": messages[1]["content"]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 96), "red")], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == (64 // 16) * (96 // 16)  # 8-px patches merged 2×2
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", modeling.TINY_KINDS)
def test_tiny_model_is_deterministic_for_a_seed(tmp_path, kind):
    digests = []
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        out = modeling.build_tiny_model(kind, tmp_path / name, seed=seed)
        digests.append(weights_digest(modeling.load_model(str(out))))
    assert digests[0] == digests[1] != digests[2]


def test_tokenizer_special_tokens_match_the_model_config(tiny_model_dir):
    processor = modeling.load_processor(str(tiny_model_dir))
    model = modeling.load_model(str(tiny_model_dir))
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert tokenizer.convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == model.config.vision_start_token_id
    assert tokenizer.convert_tokens_to_ids("<|vision_end|>") == model.config.vision_end_token_id
    assert set(modeling.vision_token_ids(tokenizer)) >= {model.config.image_token_id}


def test_synthetic_dataset_has_mathvista_schema(tmp_path):
    from datasets import load_dataset

    synthetic.write_dataset(tmp_path, num_rows=40, seed=1)
    dataset = load_dataset(str(tmp_path), split="testmini")
    assert dataset.column_names == MATHVISTA_COLUMNS
    assert dataset.features == synthetic.features()
    assert dataset.features["decoded_image"].__class__.__name__ == "Image"
    assert {row["question_type"] for row in dataset} == {"multi_choice", "free_form"}
    assert {row["answer_type"] for row in dataset} == {"integer", "float", "text"}
    for row in dataset:
        assert isinstance(row["image"], str)  # like MathVista: a path string; the picture is decoded_image
        assert row["decoded_image"].size == (row["metadata"]["img_width"], row["metadata"]["img_height"])
        if row["choices"] is not None:
            assert row["answer"] in row["choices"]
        if row["answer_type"] == "float":
            assert row["precision"] == 1.0 and len(row["answer"].split(".")[1]) == 1
        else:
            assert row["precision"] is None


def test_synthetic_dataset_is_byte_identical_for_a_seed(tmp_path):
    def digest(root, seed):
        path = synthetic.write_dataset(root, num_rows=24, seed=seed)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(tmp_path / "a", 5) == digest(tmp_path / "b", 5) != digest(tmp_path / "c", 6)


def test_warmed_up_model_formats_sometimes(tiny_model_dir):
    """The warm-up gives GRPO a signal: some samples follow the format, not all of them."""
    import torch

    from pipeline.answer_format import extract_answer
    from pipeline.generation import generate_batched

    processor = modeling.load_processor(str(tiny_model_dir))
    model = modeling.load_model(str(tiny_model_dir))
    rows = synthetic.make_rows(32, seed=99)
    conversations = [prompts.conversation(prompts.user_text(r["question"], r["choices"], r["unit"], r["precision"]))
                     for r in rows]
    torch.manual_seed(0)
    results = generate_batched(model, processor, conversations, [r["decoded_image"] for r in rows],
                               max_new_tokens=32, temperature=1.0, batch_size=16)
    formatted = sum(extract_answer(r.text) is not None for r in results)
    assert 0 < formatted < len(rows)
