"""tokenize_shards throughput per core vs raw SentencePiece encoding of the same text, on CPU.

What it measures: utf-8 bytes of text per second per worker of a whole stages/tokenize_shards.run (reading the
Parquet docs, the train/val split pass, encoding in `--workers` processes, escaping chat markers, writing the
per-unit files, merging them into Arrow shards, index.json) divided by the bytes per second of the simplest
thing that does the encoding alone: one `sp.encode(texts, num_threads=1)` over the same documents, already in
memory as Python strings, in one process. Rounds alternate between the two sides (the side that goes first
switches every round) and the ratio is taken between the median throughputs. The same ratio per CPU-second
(this process and the stage's workers) is printed too: on a shared machine where other jobs take cores, wall
time per worker understates a multi-worker run. The token counts of both sides
are checked to agree (the stage adds a bos and an eos per document).

Data: tests/docs_fixture's 67 real web articles repeated (each copy under new ids) to --mb megabytes of text,
written as Parquet in row groups of --row-group documents (each row group is one work unit), and a SentencePiece
BPE tokenizer of --vocab trained on them by stages/train_tokenizer.

Goal: ratio >= 0.9, i.e. everything the stage does besides SentencePiece costs at most ~10% per core.
With --workers 2 the stage's throughput is divided by 2; on a shared 2-core machine that side is noisy.

    make setup && source .venv/bin/activate
    python bench/tokenize_shards.py
    python bench/tokenize_shards.py --workers 2 --mb 8
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from docs_fixture import real_docs, train_tokenizer, write_docs  # noqa: E402
from stages import tokenize_shards as ts  # noqa: E402
from stages.artifacts import Artifact  # noqa: E402
from stages.train_tokenizer import load_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=4.0, help="megabytes of text (the fixture repeated)")
    p.add_argument("--row-group", type=int, default=256, help="documents per Parquet row group (work unit)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1, help="tokenize_shards.workers; throughput is divided by it")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each runs both sides once")
    p.add_argument("--goal", type=float, default=0.9)
    return p.parse_args(argv)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the stage's pool workers, once it has shut down)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_docs(mb: float) -> list[dict]:
    base, docs = real_docs(), []
    size = sum(len(d["text"].encode()) for d in base)
    for r in range(max(1, round(mb * 1e6 / size))):
        docs += [{**d, "id": f"{d['id']}-r{r:04d}"} for d in base]
    return docs


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        docs = make_docs(args.mb)
        n_files = max(1, len(docs) // args.row_group)  # write_docs writes one row group per file
        docs_art = write_docs(tmp / "docs", docs, n_files=n_files)
        tok, _ = train_tokenizer(tmp / "tok", docs_art, vocab_size=args.vocab)
        sp, _ = load_tokenizer(tok)
        texts = [d["text"] for d in docs if d["text"]]
        n_bytes = sum(len(t.encode()) for t in texts)
        build_s = time.perf_counter() - t0
        cfg = ts.Config(val_fraction=0.01, workers=args.workers)

        def stage() -> int:
            out = tmp / "shards"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            stats = ts.run(cfg, docs_art, tok, out=Artifact(ts.NAME, "bench", out))
            return stats["train_tokens"] + stats["val_tokens"]

        def sentencepiece() -> int:
            return sum(len(ids) + 2 for ids in sp.encode(texts, num_threads=1))  # + bos, eos as the stage

        sides = {"stage": stage, "sentencepiece": sentencepiece}
        per_core = {"stage": args.workers, "sentencepiece": 1}
        bps: dict[str, list[float]] = {name: [] for name in sides}
        cpu_bps: dict[str, list[float]] = {name: [] for name in sides}
        tokens: dict[str, set[int]] = {name: set() for name in sides}
        order = list(sides)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), cpu_seconds()
                tokens[name].add(sides[name]())
                bps[name].append(n_bytes / (time.perf_counter() - t0) / per_core[name])
                cpu_bps[name].append(n_bytes / (cpu_seconds() - c0))

    med = {name: statistics.median(v) for name, v in bps.items()}
    ratio = med["stage"] / med["sentencepiece"]
    paired = statistics.median(a / b for a, b in zip(bps["stage"], bps["sentencepiece"]))
    n_tokens = tokens["sentencepiece"].pop()
    print(f"ratio={ratio:.2f} (goal >= {args.goal:.2f})")
    print(f"data: {n_bytes / 1e6:.1f} MB of text, {len(texts)} docs in {n_files} row groups, {n_tokens} tokens "
          f"(vocab {args.vocab}); stage workers {args.workers}; set-up {build_s:.1f} s")
    print(f"{'side':<14} {'median MB/s/core':>17} {'min':>7} {'max':>7} {'tok/s/core':>11}")
    for name, v in bps.items():
        print(f"{name:<14} {med[name] / 1e6:>17.2f} {min(v) / 1e6:>7.2f} {max(v) / 1e6:>7.2f} "
              f"{med[name] * n_tokens / n_bytes:>11.3g}")
    print(f"median of per-round ratios: {paired:.2f}; {args.rounds} rounds")
    cpu = {name: statistics.median(v) for name, v in cpu_bps.items()}
    print(f"per CPU-second instead of per wall-second and worker: {cpu['stage'] / 1e6:.2f} vs "
          f"{cpu['sentencepiece'] / 1e6:.2f} MB/s, ratio {cpu['stage'] / cpu['sentencepiece']:.2f} "
          f"(robust to other load on a shared machine; includes starting the workers)")
    print(f"token counts agree: {tokens['stage'] == {n_tokens}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
