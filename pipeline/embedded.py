"""Build the embedded default: tiny Qwen2.5-VL / Qwen3-VL checkpoints and the synthetic dataset.

`python -m pipeline.embedded` (run by `make embedded`, part of `make demo`) writes them under
`assets/embedded/`; the demo preset points `model.name_or_path` and `data.source` there, and the
stages load them with the same `from_pretrained` / `load_dataset` code as the real ones.

A random model never writes the `<reasoning>`/`<answer>` tags, so every reward would be 0 and
GRPO would have no signal. The builder therefore gives each tiny model a short supervised
warm-up on synthetic rows (a different seed from the dataset) where only some targets follow the
format: the result behaves like a weak instruct model that formats sometimes and is right sometimes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from pathlib import Path

from pipeline import answer_format, logs, modeling, prompts, synthetic

logger = logging.getLogger("pipeline.embedded")

ROOT = Path("assets/embedded")
DATASET_DIR = "synthetic-mathvista"
DATASET_ROWS = 240
WARMUP_SEED = 777  # rows the warm-up sees are generated apart from the dataset's (seed 0)
WARMUP_STEPS = 120
WARMUP_BATCH = 8
WARMUP_LR = 3e-3
FORMATTED_SHARE = 0.3  # share of warm-up targets that follow the reasoning/answer format


def warmup_target(row: dict, rng: random.Random) -> str:
    answer = row["answer"]
    if row["choices"]:
        answer = chr(65 + row["choices"].index(answer))
    if rng.random() < FORMATTED_SHARE:
        return answer_format.formatted("I look at the image.", answer)
    return f"The answer is {answer}."


def warm_up(model, processor, seed: int, steps: int = WARMUP_STEPS) -> list[float]:
    """Supervised steps on the completion tokens only; returns the loss curve."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = synthetic.make_rows(steps * WARMUP_BATCH // 4, seed=WARMUP_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR)
    tokenizer = processor.tokenizer
    model.train()
    losses = []
    for _step in range(steps):
        batch = [rows[rng.randrange(len(rows))] for _ in range(WARMUP_BATCH)]
        prompt_texts, full_texts, images = [], [], []
        for row in batch:
            messages = prompts.conversation(prompts.user_text(row["question"], row["choices"], row["unit"],
                                                              row["precision"], row["answer_type"]))
            messages[1]["content"] = [{"type": "image"}, {"type": "text", "text": messages[1]["content"]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
            prompt_texts.append(prompt)
            full_texts.append(prompt + warmup_target(row, rng) + "<|im_end|>")
            images.append(row["decoded_image"])
        tokenizer.padding_side = "right"
        inputs = processor(text=full_texts, images=images, return_tensors="pt", padding=True)
        prompt_lengths = [len(ids) for ids in processor(text=prompt_texts, images=images)["input_ids"]]
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        for i, length in enumerate(prompt_lengths):
            labels[i, :length] = -100
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def build_model(kind: str, out_dir: Path, seed: int = 0, warmup_steps: int = WARMUP_STEPS) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText

    modeling.build_tiny_model(kind, out_dir, seed=seed)
    if warmup_steps:
        processor = modeling.load_processor(str(out_dir))
        model = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32)
        losses = warm_up(model, processor, seed, warmup_steps)
        logger.info("%s warm-up: loss %.2f → %.2f over %d steps", kind, losses[0], losses[-1], warmup_steps)
        model.save_pretrained(out_dir)
    return out_dir


def _source_digest() -> str:
    """Rebuild when the code that defines the assets changes."""
    digest = hashlib.sha256()
    for module in (modeling, prompts, synthetic):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def build_all(root: Path = ROOT, kinds: tuple[str, ...] = modeling.TINY_KINDS, force: bool = False) -> Path:
    stamp = root / "BUILD.json"
    want = {"source": _source_digest(), "kinds": list(kinds)}
    if not force and stamp.exists() and json.loads(stamp.read_text()) == want:
        logger.info("embedded default up to date in %s", root)
        return root
    root.mkdir(parents=True, exist_ok=True)
    synthetic.write_dataset(root / DATASET_DIR, num_rows=DATASET_ROWS, seed=0)
    for kind in kinds:
        build_model(kind, root / f"tiny-{kind}")
    stamp.write_text(json.dumps(want) + "\n")
    logger.info("embedded default built in %s", root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()
    logs.configure()
    build_all(args.root, force=args.force)


if __name__ == "__main__":
    main()
