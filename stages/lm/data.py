"""Memory-mapped token shards -> (x, y) training batches: packed windows, deterministic shuffle, resumable.

Reads what stages/tokenize_shards.py writes: index.json plus shards/{split}_{i:05d}.arrow, each one Arrow IPC
record batch with a flat "tokens" column, so a shard maps to a numpy array without copying or loading.

A split is one token stream (its shards concatenated). Window w covers tokens [w*T, w*T + T + 1): inputs are
its first T tokens, targets its last T, so consecutive windows share one token and every token is a target
exactly once per epoch. Windows ignore document boundaries; the bos/eos tokens mark them.

Training order: each epoch is a permutation of all windows, seeded by (seed, epoch). Every optimizer step
consumes the next batch_size * world_size * grad_accum windows of that order (the global batch), one micro batch
of batch_size * world_size windows at a time; rank r takes every world_size-th window of each, so ranks never
share a window, and a step trains on the same windows however it is cut into ranks and micro batches. An epoch's
remainder shorter than a global batch is dropped. The loader's state is (epoch, position, seed) with position
counting windows consumed by all ranks together: a loader restored from it yields exactly the batches an
uninterrupted one would, and it also resumes (at the same place in the data) after the number of ranks changed.

    loader = TokenLoader("artifacts/tokenize_shards/<version>", "train", seq_len=256, batch_size=8, seed=0)
    x, y = next(loader)                  # (B, T) int64 each
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from stages.common import StageError


@dataclass(frozen=True)
class ShardIndex:
    """index.json of a tokenize_shards artifact; `root` is the directory that holds it."""

    root: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path) -> "ShardIndex":
        """From a tokenize_shards artifact directory or its shards/ directory."""
        path = Path(path)
        for root in (path, path.parent):
            if (root / "index.json").exists():
                return cls(root, json.loads((root / "index.json").read_text()))
        raise StageError(f"no index.json in {path} or its parent: pass a tokenize_shards artifact "
                         f"(run `python -m stages.tokenize_shards` first)")

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def bos_id(self) -> int:
        return self.meta["bos_id"]

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]

    def shards(self, split: str) -> list[dict]:
        if split not in self.meta["splits"]:
            raise StageError(f"{self.root} has no split '{split}' (it has {', '.join(self.meta['splits'])})")
        return self.meta["splits"][split]

    def totals(self, split: str) -> dict:
        """{docs, tokens, bytes} of a split; bytes is the utf-8 size of its text (for bits per byte)."""
        self.shards(split)
        return self.meta["totals"][split]


def check_tokenizer(index: ShardIndex, expected_sha256: str) -> None:
    """Fail unless the shards were tokenized with the tokenizer the model uses."""
    if index.tokenizer_sha256 != expected_sha256:
        raise StageError(f"shards in {index.root} were tokenized with tokenizer {index.tokenizer_sha256[:12]}…, "
                         f"the model expects {expected_sha256[:12]}…: re-run tokenize_shards with the model's "
                         f"tokenizer")


def split_totals(path: str | Path | ShardIndex, split: str = "val") -> dict:
    """{docs, tokens, bytes} of a split."""
    return _index(path).totals(split)


def bits_per_byte(mean_loss_nats: float, path: str | Path | ShardIndex, split: str = "val") -> float:
    """Tokenizer-independent loss: nats per token -> bits per utf-8 byte of the split's text."""
    t = _index(path).totals(split)
    return mean_loss_nats / math.log(2) * t["tokens"] / t["bytes"]


def _index(path: str | Path | ShardIndex) -> ShardIndex:
    return path if isinstance(path, ShardIndex) else ShardIndex.load(path)


def _map_shard(path: Path) -> np.ndarray:
    """A shard's tokens as a read-only numpy view of the memory-mapped file (nothing is read yet)."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.num_record_batches != 1 or reader.schema.names != ["tokens"]:
        raise StageError(f"{path} is not a tokenize_shards shard (one record batch, one 'tokens' column): "
                         f"re-run tokenize_shards")
    return reader.get_batch(0).column(0).to_numpy(zero_copy_only=True)


class TokenStream:
    """The shards of one split as one random-access token sequence."""

    def __init__(self, index: ShardIndex, split: str):
        self.arrays = [_map_shard(index.root / s["file"]) for s in index.shards(split)]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])  # (n_shards + 1,)
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start+length] as int64 (a copy), across shard boundaries when needed."""
        out = np.empty(length, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < length:
            a, offset = self.arrays[shard], start + done - int(self.starts[shard])
            n = min(length - done, len(a) - offset)
            out[done:done + n] = a[offset:offset + n]
            done += n
            shard += 1
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """rows[i] = tokens[starts[i]:starts[i]+length] as int64, shape (len(starts), length). One shard lookup
        for all rows, then one slice copy (uint16 -> int64) per row; only rows that cross a shard boundary
        (about length/shard_tokens of them) go through read()."""
        out = np.empty((len(starts), length), dtype=np.int64)
        shards = np.searchsorted(self.starts, starts, side="right") - 1
        offsets = starts - self.starts[shards]
        # Python ints from here: a loop over numpy scalars costs several times more per row
        for i, (shard, offset) in enumerate(zip(shards.tolist(), offsets.tolist())):
            a = self.arrays[shard]
            if offset + length <= len(a):
                out[i] = a[offset:offset + length]
            else:
                out[i] = self.read(int(starts[i]), length)
        return out


def _to_batch(rows: np.ndarray, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(rows)  # (B, T+1)
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each
    if device is not None and torch.device(device).type == "cuda":
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        x, y = x.to(device), y.to(device)
    return x, y


class TokenLoader:
    """Infinite iterator of (x, y) int64 batches of shape (batch_size, seq_len) for one rank."""

    def __init__(self, path: str | Path | ShardIndex, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: torch.device | str | None = None, grad_accum: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.index = _index(path)
        self.stream = TokenStream(self.index, split)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.n_windows = max(0, (self.stream.n_tokens - 1) // seq_len)
        self.micro_windows = batch_size * world_size  # windows all ranks consume per micro batch
        self.step_windows = self.micro_windows * grad_accum  # ... and per optimizer step: the global batch
        if self.n_windows < self.step_windows:
            raise StageError(f"the {split} split has {self.stream.n_tokens} tokens, {self.n_windows} windows of "
                             f"seq_len={seq_len}, fewer than one step's batch of {self.step_windows}: lower seq_len "
                             f"or batch_size, or tokenize more documents")
        self.epoch = self.position = 0
        self._order_key: tuple[int, int] | None = None
        self._order = np.empty(0)

    def order(self) -> np.ndarray:
        """This epoch's permutation of window ids (uint32 while that fits: 4 bytes per window)."""
        if self._order_key != (self.seed, self.epoch):
            dtype = np.uint32 if self.n_windows < 2**32 else np.int64
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(np.arange(self.n_windows, dtype=dtype))
            self._order_key = (self.seed, self.epoch)
        return self._order

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        at_step_start = self.position % self.step_windows == 0
        if at_step_start and self.position + self.step_windows > self.n_windows:  # the remainder is dropped
            self.epoch, self.position = self.epoch + 1, 0
        mine = self.order()[self.position + self.rank:self.position + self.micro_windows:self.world_size]
        self.position += self.micro_windows
        rows = self.stream.windows(mine.astype(np.int64) * self.seq_len, self.seq_len + 1)  # (B, T+1)
        return _to_batch(rows, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def eval_batches(path: str | Path | ShardIndex, seq_len: int, batch_size: int, split: str = "val",
                 rank: int = 0, world_size: int = 1, max_batches: int | None = None,
                 device: torch.device | str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's windows in order, no shuffle, each target token once. Rank r takes windows r, r+W, ...;
    every rank gets the same number of batches (the last may be smaller than batch_size)."""
    stream = TokenStream(_index(path), split)
    per_rank = (stream.n_tokens - 1) // seq_len // world_size
    if per_rank == 0:
        raise StageError(f"the {split} split has {stream.n_tokens} tokens, less than one window of seq_len="
                         f"{seq_len} per rank: lower seq_len or raise tokenize_shards.val_fraction")
    windows = rank + world_size * np.arange(per_rank)
    for i, start in enumerate(range(0, per_rank, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        rows = stream.windows(windows[start:start + batch_size] * seq_len, seq_len + 1)  # (B, T+1)
        yield _to_batch(rows, device)
