"""Whole-dataset decisions of the prepare stage, taken in the main process on light columns only:
duplicate ids, the length filter, the train/eval split by id hash, and the checks that no example
(by id, or the same question on the same picture) is in both splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.prepare_errors import PrepareError
from pipeline.prompt_tokens import PromptTokenCounter

REPORT_EXAMPLES = 5



def split_of(example_id: str, seed: int, eval_fraction: float) -> str:
    """Deterministic and independent of row order: the same id always lands in the same split."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"



@dataclass
class Ledger:
    """Dropped rows by reason, with a few example ids each: the data report's core."""

    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, example_id: str) -> None:
        self.dropped[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < REPORT_EXAMPLES:
            ids.append(example_id)



@dataclass
class Candidate:
    source: int  # index into the list of sources
    row: int  # row index in that source's processed dataset
    id: str
    prompt: list
    image_tokens: int
    content_key: str
    label: str  # how the report names it (eval-source rows are prefixed, ids may repeat across sources)
    train_drop_reason: str | None = None  # usable for evaluation, not for training
    split: str = ""
    prompt_tokens: int = 0



def row_candidates(light: dict[str, list], source_index: int, prefix: str, ledger: Ledger) -> list[Candidate]:
    """Rows that passed the row checks; later duplicates of an id are dropped (the first one wins)."""
    seen: set[str] = set()
    kept = []
    for row, reason in enumerate(light["drop_reason"]):
        example_id = light["id"][row]
        if reason is None and example_id in seen:
            reason = "duplicate_id"
        if reason is not None:
            ledger.drop(reason, prefix + example_id)
            continue
        seen.add(example_id)
        kept.append(Candidate(source_index, row, example_id, light["prompt"][row], light["image_tokens"][row],
                              light["content_key"][row], prefix + example_id, light["train_drop_reason"][row]))
    return kept



def check_id_collisions(train: list[Candidate], evaluation: list[Candidate]) -> None:
    shared = sorted({c.id for c in train} & {c.id for c in evaluation})
    if shared:
        raise PrepareError(
            f"{len(shared)} example id(s) appear in both the training source and data.eval_source, e.g. "
            f"{shared[:REPORT_EXAMPLES]}: the evaluation would not be held out. Remove them from one source "
            "or map data.columns.id to a column that is unique across both."
        )



def length_filter(candidates: list[Candidate], counter: PromptTokenCounter, budget: int,
                  ledger: Ledger) -> list[Candidate]:
    counts = counter.count([c.prompt for c in candidates], [c.image_tokens for c in candidates])
    for candidate, count in zip(candidates, counts, strict=True):
        candidate.prompt_tokens = count
    return _drop_where(candidates, ledger, "prompt_too_long", lambda c: c.prompt_tokens > budget)


def _drop_where(candidates: list[Candidate], ledger: Ledger, reason: str, dropped) -> list[Candidate]:
    """The candidates kept; each one `dropped` says goes to the ledger under `reason`."""
    kept = []
    for candidate in candidates:
        if dropped(candidate):
            ledger.drop(reason, candidate.label)
        else:
            kept.append(candidate)
    return kept



def assign_splits(candidates: list[Candidate], roles: Sequence[str], seed: int, eval_fraction: float) -> None:
    for candidate in candidates:
        role = roles[candidate.source]
        candidate.split = split_of(candidate.id, seed, eval_fraction) if role == "all" else role



def drop_untrainable(candidates: list[Candidate], ledger: Ledger) -> list[Candidate]:
    """Rows an evaluation grades but training should not see (repeated options): dropped from train only."""
    kept = []
    for candidate in candidates:
        if candidate.split == "train" and candidate.train_drop_reason:
            ledger.drop(candidate.train_drop_reason, candidate.label)
        else:
            kept.append(candidate)
    return kept



def drop_cross_split_duplicates(candidates: list[Candidate], ledger: Ledger) -> list[Candidate]:
    """Same question on the same picture under another id would leak the eval answer into training."""
    eval_keys = {c.content_key for c in candidates if c.split == "eval"}
    return _drop_where(candidates, ledger, "duplicate_of_eval_row",
                       lambda c: c.split == "train" and c.content_key in eval_keys)



def check_disjoint(candidates: list[Candidate]) -> None:
    """The guarantee itself, checked on what is about to be written, whatever produced it."""
    train = [c for c in candidates if c.split == "train"]
    held_out = [c for c in candidates if c.split == "eval"]
    if {c.id for c in train} & {c.id for c in held_out} or {c.content_key for c in train} & {
            c.content_key for c in held_out}:
        raise PrepareError("internal error: an example is in both splits")

