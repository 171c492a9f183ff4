"""Tokenize documents into flat, memory-mappable Arrow token shards split into train and val.

    python -m stages.tokenize_shards --root artifacts --input extract/latest --input train_tokenizer/latest
    python -m stages.tokenize_shards --root artifacts --input extract/latest --input train_tokenizer/latest \
        --set val_fraction=0.1 --set shard_tokens=1000000                                  # tiny, CPU

Each document becomes [<|bos|>] + ids + [<|eos|>] and documents are concatenated in input order. A document
goes to val when sha256(id) falls below val_fraction, so the split depends only on the ids (the same docs are
held out for every tokenizer and every re-run); with two or more docs at least one is in each split.

Layout (read by stages/lm/data.py):
    shards/{split}_{i:05d}.arrow   Arrow IPC file, one record batch, one column "tokens" (uint16 when the
                                   vocab fits, else uint32): a flat token stream, so a reader memory-maps it
                                   and views it as a numpy array without copying. A shard ends at a document
                                   boundary once it holds shard_tokens tokens.
    index.json                     tokenizer sha256, vocab size, dtype, special ids, per split: shards
                                   [{file, docs, tokens}] and totals {docs, tokens, bytes}. `bytes` is the
                                   utf-8 size of the split's text, so bits/byte = loss_nats * tokens /
                                   (ln 2 * bytes), with tokens counting the bos/eos tokens.

Web text that literally contains a chat marker such as "<|user|>" would encode to the special token; such
spans are re-encoded as ordinary text ("<" + "|user|>"), so pre-training data never holds chat markers.
A crashed run starts over: tokenizing is minutes for what pre-training reads in hours.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.artifacts import Artifact
from stages.common import StageError, main
from stages.lm.chat import marker_escapes
from stages.train_tokenizer import doc_files, hash_unit, iter_docs, load_tokenizer

NAME = "tokenize_shards"
CODE_VERSION = 1
SPLITS = ("train", "val")

log = logging.getLogger(f"crawl2chat.{NAME}")


@dataclass(frozen=True)
class Config:
    # Fraction of documents held out for validation. 1% of a multi-billion-token crawl is plenty; the tiny
    # preset uses ~0.1 so its val split has more than a handful of documents.
    val_fraction: float = 0.01
    # 2**26 tokens = 128 MiB per uint16 shard: big enough that a 10B-token run has ~150 files, small enough
    # to write from memory and to move one at a time.
    shard_tokens: int = 2**26
    encode_batch_docs: int = 1024  # documents per SentencePiece batch encode
    num_threads: int = 2  # SentencePiece encode threads

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise ValueError(f"shard_tokens must be at least 1024, got {self.shard_tokens}")
        if self.encode_batch_docs < 1 or self.num_threads < 1:
            raise ValueError("encode_batch_docs and num_threads must be at least 1")


def _split_rule(files, val_fraction: float):
    """A function id -> 'train' | 'val'. One pass over the ids finds the docs to move when a split is empty."""
    n, n_val, lowest, highest = 0, 0, (2.0, None), (-1.0, None)
    for f in files:
        for i in pq.read_table(f, columns=["id"]).column("id").to_pylist():
            u = hash_unit(i)
            n += 1
            n_val += u < val_fraction
            lowest, highest = min(lowest, (u, i)), max(highest, (u, i))
    to_val = lowest[1] if n >= 2 and n_val == 0 else None      # ensure a val doc
    to_train = highest[1] if n >= 2 and n_val == n else None   # ensure a train doc

    def split(doc_id: str) -> str:
        if doc_id == to_val:
            return "val"
        if doc_id == to_train:
            return "train"
        return "val" if hash_unit(doc_id) < val_fraction else "train"
    return split


class _ShardWriter:
    """Accumulates documents' tokens of one split and writes a shard when it holds shard_tokens."""

    def __init__(self, out: Artifact, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.parts: list[np.ndarray] = []
        self.buffered = 0  # tokens in self.parts
        self.docs = self.tokens = self.bytes = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        self.parts.append(ids)
        self.buffered += len(ids)
        self.docs += 1
        self.tokens += len(ids)
        self.bytes += n_bytes
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        tokens = np.concatenate(self.parts).astype(self.dtype)
        name = f"shards/{self.split}_{len(self.shards):05d}.arrow"
        tmp = self.out.path / (name + ".tmp")
        # One record batch per file: the column is one contiguous buffer, memory-mapped zero-copy by readers.
        batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        tmp.replace(self.out.path / name)
        docs_before = sum(s["docs"] for s in self.shards)
        self.shards.append({"file": name, "docs": self.docs - docs_before, "tokens": len(tokens)})
        self.parts, self.buffered = [], 0


def run(cfg: Config, docs: Artifact, tokenizer: Artifact, *, out: Artifact) -> dict:
    files = doc_files(docs)
    sp, meta = load_tokenizer(tokenizer)
    vocab_size = sp.get_piece_size()
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    bos, eos = sp.bos_id(), sp.eos_id()
    marker_ids = {i: np.array(ids, dtype=np.int64) for i, ids in marker_escapes(sp).items()}

    (out.path / "shards").mkdir(exist_ok=True)
    for stale in (out.path / "shards").iterdir():  # partial work of a crashed run: start over
        stale.unlink()
    split_of = _split_rule(files, cfg.val_fraction)
    writers = {s: _ShardWriter(out, s, dtype, cfg.shard_tokens) for s in SPLITS}
    skipped_empty = escaped = 0
    for ids_batch, texts in iter_docs(files, batch_size=cfg.encode_batch_docs):
        keep = [(i, t) for i, t in zip(ids_batch, texts) if t]
        skipped_empty += len(texts) - len(keep)
        encoded = sp.encode([t for _, t in keep], num_threads=cfg.num_threads)
        for (doc_id, text), ids in zip(keep, encoded):
            ids = np.asarray(ids, dtype=np.int64)
            if np.isin(ids, list(marker_ids)).any():
                escaped += 1
                ids = np.concatenate([marker_ids.get(int(t), np.array([t])) for t in ids])
            writers[split_of(doc_id)].add(np.concatenate([[bos], ids, [eos]]), len(text.encode()))
    for w in writers.values():
        w.flush()

    totals = {s: {"docs": w.docs, "tokens": w.tokens, "bytes": w.bytes} for s, w in writers.items()}
    if totals["train"]["docs"] == 0:
        raise StageError(f"{docs.ref} holds no non-empty documents: re-run extract with more input")
    index = {
        "format": 1,
        "layout": "one Arrow IPC record batch per shard, column 'tokens', flat stream of [bos] doc [eos]",
        "tokenizer_sha256": meta["tokenizer_sha256"], "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name, "bos_id": bos, "eos_id": eos, "pad_id": sp.pad_id(),
        "splits": {s: w.shards for s, w in writers.items()},
        "totals": totals,
        "total_docs": sum(t["docs"] for t in totals.values()),
        "total_tokens": sum(t["tokens"] for t in totals.values()),
    }
    (out.path / "index.json").write_text(json.dumps(index, indent=2))
    return {"tokenizer_sha256": meta["tokenizer_sha256"], "dtype": index["dtype"],
            **{f"{s}_{k}": v for s, t in totals.items() for k, v in t.items()},
            **{f"{s}_shards": len(w.shards) for s, w in writers.items()},
            "skipped_empty_docs": skipped_empty, "docs_with_escaped_markers": escaped}


if __name__ == "__main__":
    main(sys.modules[__name__])
