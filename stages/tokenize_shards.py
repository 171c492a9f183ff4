"""Tokenize documents into flat, memory-mappable Arrow token shards split into train and val.

    python -m stages.tokenize_shards --root artifacts --input extract/latest --input train_tokenizer/latest
    python -m stages.tokenize_shards --root artifacts --input extract/latest --input train_tokenizer/latest \
        --set val_fraction=0.1 --set shard_tokens=1000000                                  # tiny, CPU

Each document becomes [<|bos|>] + ids + [<|eos|>] and documents are concatenated in input order. A document
goes to val when sha256(id) falls below val_fraction, so the split depends only on the ids (the same docs are
held out for every tokenizer and every re-run); with two or more docs at least one is in each split.

How it runs: every Parquet row group of the input is one work unit (extract's writer makes row groups of 1000
documents). A pool of `workers` processes, each loading the SentencePiece model once, encodes the units into
work/{unit:05d}.npz (per split: the concatenated tokens and each document's length); the rename of a finished
file into place is the unit's completion marker. Then one pass merges the units in input order into shards, so
the output is byte-identical for any number of workers. A crashed run re-runs in the same staging directory
(it depends only on the recipe) and encodes only the units without a finished file; the merge is redone whole
(it only copies tokens). work/ is deleted before the artifact is committed.

Incremental dataset versions (flows/data_refresh.py): given an earlier tokenize_shards artifact as a third
input, only `docs` (the new documents) are encoded; the index lists the earlier version's shards first, by a
path relative to this artifact ("../<version>/shards/..."; every version of a stage is a sibling directory in
the store), then the new shards. Nothing is copied or re-tokenized, and the earlier artifact stays an input in
the lineage. Both must use the same tokenizer.

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
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm

from stages.artifacts import Artifact
from stages.common import StageError, main, progress, runtime
from stages.lm.chat import marker_escapes
from stages.train_tokenizer import doc_files, hash_unit, load_tokenizer

NAME = "tokenize_shards"
CODE_VERSION = 2  # 2: index.json lists reused shards of an earlier version ("reuses")
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
    encode_batch_docs: int = 1024  # documents per SentencePiece encode call (bounds the Python lists in memory)
    # Encoding processes; 0 = one per CPU core this process may use. The output does not depend on it, and as a
    # runtime() field it stays out of the artifact's version.
    workers: int = runtime(0)

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise ValueError(f"shard_tokens must be at least 1024, got {self.shard_tokens}")
        if self.encode_batch_docs < 1:
            raise ValueError(f"encode_batch_docs must be at least 1, got {self.encode_batch_docs}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 (one per CPU core) or a positive count, got {self.workers}")


@dataclass(frozen=True)
class SplitRule:
    """doc id -> is it in val? Picklable, so every worker applies the same rule."""

    val_fraction: float
    to_val: str | None = None    # set when no id hashes below val_fraction: this doc goes to val anyway
    to_train: str | None = None  # set when every id does: this doc goes to train anyway

    def is_val(self, doc_id: str) -> bool:
        if doc_id == self.to_val or doc_id == self.to_train:
            return doc_id == self.to_val
        return hash_unit(doc_id) < self.val_fraction

    @classmethod
    def over(cls, files: list[Path], val_fraction: float) -> "SplitRule":
        """One pass over the ids finds the docs to move when a split would be empty."""
        n, n_val, lowest, highest = 0, 0, (2.0, None), (-1.0, None)
        for f in files:
            for i in pq.read_table(f, columns=["id"]).column("id").to_pylist():
                u = hash_unit(i)
                n += 1
                n_val += u < val_fraction
                lowest, highest = min(lowest, (u, i)), max(highest, (u, i))
        return cls(val_fraction, to_val=lowest[1] if n >= 2 and n_val == 0 else None,
                   to_train=highest[1] if n >= 2 and n_val == n else None)


# ---- encoding one work unit (runs in a worker process) ---------------------------------------------------------
_worker: dict = {}  # this process's SentencePiece model and settings, set once by _init_worker


def _init_worker(model_file: str, rule: SplitRule, batch_docs: int, dtype: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=model_file)
    escapes = marker_escapes(sp)
    is_marker = np.zeros(sp.get_piece_size(), dtype=bool)
    is_marker[list(escapes)] = True
    _worker.update(sp=sp, escapes=escapes, is_marker=is_marker, rule=rule, batch_docs=batch_docs, dtype=dtype)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """[bos] ids [eos] of every text, concatenated (int64), each one's length, and how many had escaped markers."""
    sp, escapes, is_marker = _worker["sp"], _worker["escapes"], _worker["is_marker"]
    encoded = sp.encode(texts, num_threads=1)  # one thread: the parallelism is the worker processes

    def flatten() -> np.ndarray:
        bos, eos = (sp.bos_id(),), (sp.eos_id(),)
        return np.fromiter(chain.from_iterable(chain(bos, ids, eos) for ids in encoded), dtype=np.int64,
                           count=sum(map(len, encoded)) + 2 * len(encoded))

    flat, escaped = flatten(), 0
    if is_marker[flat].any():  # rare: web text that literally holds a chat marker; fix those docs one by one
        for d, ids in enumerate(encoded):
            if is_marker[ids].any():
                encoded[d] = [e for t in ids for e in escapes.get(t, (t,))]
                escaped += 1
        flat = flatten()
    return flat, np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) + 2, escaped


def _encode_unit(job: tuple[int, str, int, str]) -> None:
    """Row group `row_group` of `file` -> work_dir/{unit:05d}.npz, written under a temporary name first."""
    unit, file, row_group, work_dir = job
    table = pq.ParquetFile(file).read_row_group(row_group, columns=["id", "text"])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    n_bytes = pc.fill_null(pc.binary_length(table.column("text")), 0).to_numpy()  # utf-8 bytes per doc
    rule, step = _worker["rule"], _worker["batch_docs"]
    keep = [d for d, t in enumerate(texts) if t]
    parts: dict[str, list] = {s: [] for s in SPLITS}  # split -> [(tokens, lengths)]
    result = {"skipped": len(texts) - len(keep), "escaped": 0}
    for split in SPLITS:
        mine = [d for d in keep if rule.is_val(ids[d]) == (split == "val")]
        for start in range(0, len(mine), step):
            tokens, lengths, escaped = _encode([texts[d] for d in mine[start:start + step]])
            parts[split].append((tokens, lengths))
            result["escaped"] += escaped
        result[f"{split}_bytes"] = int(n_bytes[mine].sum())
        result[f"{split}_tokens"] = np.concatenate([t for t, _ in parts[split]] or [[]]).astype(_worker["dtype"])
        result[f"{split}_lengths"] = np.concatenate([n for _, n in parts[split]] or [[]]).astype(np.int64)
    path = Path(work_dir) / f"{unit:05d}.npz"
    with open(path.with_suffix(".tmp"), "wb") as f:
        np.savez(f, **result)
    path.with_suffix(".tmp").replace(path)  # atomic: a finished file means a finished unit


# ---- merging units into shards (main process) ------------------------------------------------------------------
class _ShardWriter:
    """Accumulates the documents of one split and writes a shard at the first document end where it holds at
    least shard_tokens tokens."""

    def __init__(self, out: Artifact, split: str, shard_tokens: int):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.parts: list[np.ndarray] = []
        self.buffered = self.buffered_docs = 0  # in self.parts
        self.docs = self.tokens = self.bytes = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, lengths: np.ndarray, n_bytes: int) -> None:
        """Documents' tokens, concatenated, with each document's length."""
        self.docs, self.tokens, self.bytes = self.docs + len(lengths), self.tokens + len(tokens), self.bytes + n_bytes
        ends = np.cumsum(lengths)  # (docs,) end of each document within tokens
        done = done_docs = 0
        while True:
            # first document end at which the buffer reaches shard_tokens
            d = int(np.searchsorted(ends, done + self.shard_tokens - self.buffered, side="left"))
            if d == len(ends):
                break
            self.parts.append(tokens[done:ends[d]])
            self.buffered_docs += d + 1 - done_docs
            self.flush()
            done, done_docs = int(ends[d]), d + 1
        self.parts.append(tokens[done:])
        self.buffered += len(tokens) - done
        self.buffered_docs += len(ends) - done_docs

    def flush(self) -> None:
        if not self.buffered_docs:
            return
        tokens = np.concatenate(self.parts)
        name = f"shards/{self.split}_{len(self.shards):05d}.arrow"
        tmp = self.out.path / (name + ".tmp")
        # One record batch per file: the column is one contiguous buffer, memory-mapped zero-copy by readers.
        batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        tmp.replace(self.out.path / name)
        self.shards.append({"file": name, "docs": self.buffered_docs, "tokens": len(tokens)})
        self.parts, self.buffered, self.buffered_docs = [], 0, 0


def _cpu_count() -> int:
    """The cores this process may run on: a Slurm or taskset CPU set can be smaller than os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _reused_shards(earlier: tuple[Artifact, ...], tokenizer_sha256: str) -> dict | None:
    """The shard lists and totals of an earlier dataset version, with paths relative to the new artifact."""
    if not earlier:
        return None
    if len(earlier) > 1 or earlier[0].stage != NAME:
        raise StageError(f"tokenize_shards takes documents, a tokenizer and at most one earlier {NAME} artifact "
                         f"to extend; got {', '.join(a.ref for a in earlier)}")
    prev = earlier[0]
    index = json.loads((prev.path / "index.json").read_text())
    if index["tokenizer_sha256"] != tokenizer_sha256:
        raise StageError(f"{prev.ref} was tokenized with tokenizer {index['tokenizer_sha256'][:12]}…, not "
                         f"{tokenizer_sha256[:12]}…: extend a dataset version with the tokenizer that made it")

    def relative(shard: dict) -> dict:  # its own shards move one level up; its reused ones already are
        file = shard["file"]
        return {**shard, "file": file if file.startswith("../") else f"../{prev.version}/{file}"}

    return {"splits": {s: [relative(sh) for sh in index["splits"][s]] for s in SPLITS},
            "totals": index["totals"], "refs": index.get("reuses", []) + [prev.ref]}


def run(cfg: Config, docs: Artifact, tokenizer: Artifact, *earlier: Artifact, out: Artifact) -> dict:
    files = doc_files(docs)
    sp, meta = load_tokenizer(tokenizer)
    reused = _reused_shards(earlier, meta["tokenizer_sha256"])
    vocab_size = sp.get_piece_size()
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32

    # 1. encode every row group not finished by an earlier (crashed) run of this recipe
    units = [(str(f), g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    work = out.path / "work"
    work.mkdir(exist_ok=True)
    todo = [(k, f, g, str(work)) for k, (f, g) in enumerate(units) if not (work / f"{k:05d}.npz").exists()]
    workers = min(cfg.workers or _cpu_count(), max(1, len(todo)))
    log.info("%d work units (%d done by an earlier run), %d worker(s)", len(units), len(units) - len(todo), workers)
    init = (str(tokenizer.path / "tokenizer.model"), SplitRule.over(files, cfg.val_fraction),
            cfg.encode_batch_docs, np.dtype(dtype).name)
    if workers == 1:  # in this process: no start-up cost, and a debugger sees the encoding
        _init_worker(*init)
        for done, job in enumerate(todo, 1):
            _encode_unit(job)
            progress(len(units) - len(todo) + done, len(units), "work units")
    else:
        # spawn, not fork: the stage may run inside a threaded process (Prefect), where fork can deadlock.
        # ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (out of memory) fails the
        # run with BrokenProcessPool instead of hanging it.
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, init) as pool:
            for done, _ in enumerate(pool.map(_encode_unit, todo), 1):
                progress(len(units) - len(todo) + done, len(units), "work units")
                if done % max(1, len(todo) // 10) == 0:
                    log.info("encoded %d/%d units", done, len(todo))

    # 2. merge the units in input order into shards: the same bytes whatever the number of workers
    shutil.rmtree(out.path / "shards", ignore_errors=True)  # a merge cut short by a crash is redone whole
    (out.path / "shards").mkdir()
    writers = {s: _ShardWriter(out, s, cfg.shard_tokens) for s in SPLITS}
    skipped_empty = escaped = 0
    for k in range(len(units)):
        with np.load(work / f"{k:05d}.npz") as unit:
            for s, w in writers.items():
                w.add(unit[f"{s}_tokens"], unit[f"{s}_lengths"], int(unit[f"{s}_bytes"]))
            skipped_empty += int(unit["skipped"])
            escaped += int(unit["escaped"])
    for w in writers.values():
        w.flush()
    shutil.rmtree(work)  # scratch space, not part of the artifact

    new = {s: {"docs": w.docs, "tokens": w.tokens, "bytes": w.bytes} for s, w in writers.items()}
    if new["train"]["docs"] == 0 and not reused:
        raise StageError(f"{docs.ref} holds no non-empty documents: re-run extract with more input")
    totals = {s: {k: v + (reused["totals"][s][k] if reused else 0) for k, v in t.items()} for s, t in new.items()}
    index = {
        "format": 1,
        "layout": "one Arrow IPC record batch per shard, column 'tokens', flat stream of [bos] doc [eos]",
        "tokenizer_sha256": meta["tokenizer_sha256"], "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name, "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
        "splits": {s: (reused["splits"][s] if reused else []) + w.shards for s, w in writers.items()},
        "totals": totals,
        "reuses": reused["refs"] if reused else [],
        "total_docs": sum(t["docs"] for t in totals.values()),
        "total_tokens": sum(t["tokens"] for t in totals.values()),
    }
    (out.path / "index.json").write_text(json.dumps(index, indent=2))
    return {"tokenizer_sha256": meta["tokenizer_sha256"], "dtype": index["dtype"],
            **{f"{s}_{k}": v for s, t in totals.items() for k, v in t.items()},
            **{f"new_{s}_{k}": v for s, t in new.items() for k, v in t.items()},
            **{f"{s}_shards": len(index["splits"][s]) for s in SPLITS},
            "reused_shards": sum(len(reused["splits"][s]) for s in SPLITS) if reused else 0,
            "reuses": index["reuses"],
            "skipped_empty_docs": skipped_empty, "docs_with_escaped_markers": escaped, "work_units": len(units)}


if __name__ == "__main__":
    main(sys.modules[__name__])
