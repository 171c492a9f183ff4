"""Encoded examples (conversations, preference pairs, prompts) -> padded, shuffled, resumable batches.

Read from JSONL files whose malformed lines are counted and reported by line number, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stages.common import StageError


def read_jsonl(path: Path | str, check: Callable[[dict], str | None]) -> tuple[list[dict], list[dict]]:
    """(records, problems). check(record) returns why a record is malformed, or None."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"data file {path} does not exist: give an existing JSONL path")
    records, problems = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                why = check(rec) if isinstance(rec, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                why = f"invalid JSON: {e.msg}"
            if why:
                problems.append({"line": n, "reason": why})
            else:
                records.append(rec)
    if not records:
        raise StageError(f"{path} holds no valid records ({len(problems)} malformed, first: "
                         f"{problems[:1]}); check its format")
    return records, problems


def split_heldout(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic (train, val) split; val gets at least one record."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, int(len(records) * val_fraction))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def pad_batch(seqs: list[list[int]], pad: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (T - len(s)) for s in seqs], dtype=torch.long)


class ExampleLoader:
    """Infinite, seeded, resumable iterator of lists of examples (collate them yourself)."""

    def __init__(self, examples: list, batch_size: int, seed: int, collate: Callable[[list], object]):
        if not examples:
            raise StageError("no training examples: check the data file")
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.epoch = self.position = 0

    def __iter__(self):
        return self

    def __next__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        if self.position >= len(order):
            self.epoch, self.position = self.epoch + 1, 0
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        idx = order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate([self.examples[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
