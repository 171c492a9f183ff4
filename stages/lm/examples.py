"""Encoded examples (conversations, preference pairs, prompts) -> packed or padded, shuffled, resumable batches.

read_jsonl reads benchmark files (HellaSwag, GSM8K) whose malformed lines are counted and reported by line
number, never dropped silently; training data arrives through the import_data stage instead.
"""

from __future__ import annotations

import bisect
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


def pack(examples: list[tuple[list[int], list[int]]], row_len: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate (ids, mask) examples into rows of at most row_len tokens, so few positions are padding.

    Best-fit decreasing (longest first, each into the row it fills most tightly): close to the fewest rows
    possible, deterministic, and fast (a bisect into a sorted list of free space). Hand-written: twenty lines,
    against a new dependency (the `binpacking` package) for the same idea. Examples longer than row_len must be
    truncated by the caller. Each example keeps its own mask, so packed rows train on exactly the tokens the
    examples would alone.
    """
    rows: list[tuple[list[int], list[int]]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row index) of rows that still have room
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):
        if len(ids) > row_len:
            raise ValueError(f"an example of {len(ids)} tokens does not fit a row of {row_len}: truncate it first")
        at = bisect.bisect_left(free, (len(ids), -1))
        if at == len(free):  # no row has room: open one
            rows.append(([], []))
            row, room = len(rows) - 1, row_len
        else:
            room, row = free.pop(at)
        rows[row][0].extend(ids)
        rows[row][1].extend(mask)
        if room - len(ids) > 0:
            bisect.insort(free, (room - len(ids), row))
    return rows


def real_fraction(lengths: list[int], batch_size: int, seed: int) -> float:
    """The fraction of real (non-pad) tokens over one epoch of ExampleLoader batches of sequences of these
    lengths, each batch padded to its longest: 1.0 means no compute is spent on padding."""
    order = np.random.default_rng([seed, 0]).permutation(len(lengths))
    real = padded = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i:i + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return real / max(padded, 1)


def pad_batch(seqs: list[list[int]], pad: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [pad] * (T - len(s)) for s in seqs], dtype=torch.long)


class ExampleLoader:
    """Infinite, seeded, resumable iterator of lists of examples (collate them yourself).

    Each optimizer step draws one global batch of batch_size x world_size x grad_accum examples from a seeded
    per-epoch shuffle, one micro batch of batch_size x world_size at a time, and rank `rank` takes its own
    batch_size of each, so ranks never train on the same example in a step, and a step's examples are the same
    however the batch is cut into ranks and micro batches. An epoch's remainder shorter than a global batch is
    dropped. The state counts global examples, so a resume (with any number of ranks) continues the same order."""

    def __init__(self, examples: list, batch_size: int, seed: int, collate: Callable[[list], object],
                 rank: int = 0, world_size: int = 1, grad_accum: int = 1):
        self.micro = batch_size * world_size  # examples all ranks take per micro batch
        self.step = self.micro * grad_accum  # ... and per optimizer step
        if len(examples) < self.step:
            raise StageError(f"{len(examples)} training examples, fewer than one step's batch of {self.step}: give "
                             f"more data or lower batch_size")
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.rank, self.world_size = rank, world_size
        self.epoch = self.position = 0

    def __iter__(self):
        return self

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def __next__(self):
        if self.position % self.step == 0 and self.position + self.step > len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        idx = self._order()[start:start + self.batch_size]
        self.position += self.micro
        return self.collate([self.examples[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
