"""TokenLoader throughput vs a plain numpy copy of the same bytes, on CPU.

What it measures: tokens per second of stages/lm/data.TokenLoader (memory-mapped Arrow shards, shuffled windows
of seq_len + 1 tokens, int64 (x, y) batches) divided by the tokens per second of the simplest thing that yields
the same batches: every .arrow shard read whole with open().read(), its token buffer viewed with numpy, the
shards concatenated in memory once (untimed), and then for each batch the same windows sliced out, stacked,
widened to int64 and split into x and y. The baseline's windows follow the loader's documented order
(a permutation of windows per epoch seeded by (seed, epoch), the epoch's remainder dropped), and every batch
of the run is checked to be equal on both sides. Blocks of batches alternate between the two sides (the side
that goes first switches every round) and the ratio is taken between the median block throughputs.

Data: shards built in a temporary directory from tests/docs_fixture's 67 real web articles, with a SentencePiece
tokenizer of vocab 1024 (uint16 tokens) and small shards (--shard-tokens) so that windows cross shard boundaries.

Goal: ratio >= 0.5, i.e. the loader's memory mapping, shard-crossing reads and shuffling cost at most 2x an
in-memory copy (the loader is then far from being what limits a training step).

    make setup && source .venv/bin/activate
    python bench/loader.py
    python bench/loader.py --seq-len 2048 --batch 16 --shard-tokens 65536
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from docs_fixture import real_docs, train_tokenizer, write_docs  # noqa: E402
from stages import tokenize_shards as ts  # noqa: E402
from stages.artifacts import Artifact  # noqa: E402
from stages.lm.data import ShardIndex, TokenLoader  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--shard-tokens", type=int, default=8192, help="tokenize_shards.shard_tokens (>= 1024)")
    p.add_argument("--split", default="train")
    p.add_argument("--rounds", type=int, default=21, help="timed rounds; each runs one block per side")
    p.add_argument("--block", type=int, default=300, help="batches per side per round")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goal", type=float, default=0.5)
    return p.parse_args(argv)


def build_shards(tmp: Path, vocab: int, shard_tokens: int) -> Path:
    docs = write_docs(tmp / "docs", real_docs())
    tok, _ = train_tokenizer(tmp / "tok", docs, vocab_size=vocab)
    (tmp / "shards").mkdir()
    ts.run(ts.Config(val_fraction=0.1, shard_tokens=shard_tokens), docs, tok,
           out=Artifact(ts.NAME, "bench", tmp / "shards"))
    return tmp / "shards"


def read_shard_bytes(path: Path, dtype) -> np.ndarray:
    """The whole file through open().read(); numpy views the token buffer inside those bytes (pyarrow only
    tells where it starts)."""
    with open(path, "rb") as f:
        raw = f.read()
    buf = pa.py_buffer(raw)
    col = pa.ipc.open_file(buf).get_batch(0).column(0)
    offset = col.buffers()[1].address - buf.address + col.offset * np.dtype(dtype).itemsize
    return np.frombuffer(raw, dtype=dtype, count=len(col), offset=offset)


class NumpyBaseline:
    """The loader's batches from one in-memory token array: plain slices, no mmap, no shard lookup."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int):
        self.tokens, self.T, self.B, self.seed = tokens, seq_len, batch, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        self.epoch = self.pos = 0
        self.order = self._perm()

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(np.arange(self.n_windows, dtype=np.uint32))

    def __next__(self):
        if self.pos + self.B > self.n_windows:
            self.epoch, self.pos = self.epoch + 1, 0
            self.order = self._perm()
        mine = self.order[self.pos:self.pos + self.B]
        self.pos += self.B
        T = self.T
        rows = np.stack([self.tokens[int(w) * T:int(w) * T + T + 1] for w in mine]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        shards = build_shards(Path(tmp), args.vocab, args.shard_tokens)
        build_s = time.perf_counter() - t0
        index = ShardIndex.load(shards)
        dtype = np.dtype(index.meta["dtype"])
        files = [index.root / s["file"] for s in index.shards(args.split)]
        tokens = np.concatenate([read_shard_bytes(f, dtype) for f in files])
        assert len(tokens) == index.totals(args.split)["tokens"]

        sides = {
            "loader": TokenLoader(shards, args.split, args.seq_len, args.batch, seed=args.seed),
            "numpy": NumpyBaseline(tokens, args.seq_len, args.batch, args.seed),
        }
        n_windows = sides["loader"].n_windows
        starts = np.cumsum([0] + [s["tokens"] for s in index.shards(args.split)])[1:-1]
        crossing = sum(bool(((starts > w * args.seq_len) & (starts < w * args.seq_len + args.seq_len + 1)).any())
                       for w in range(n_windows))

        # correctness: every batch the timed run will draw, compared on fresh instances (untimed)
        n_batches = args.rounds * args.block + 2
        check = (TokenLoader(shards, args.split, args.seq_len, args.batch, seed=args.seed),
                 NumpyBaseline(tokens, args.seq_len, args.batch, args.seed))
        mismatches = 0
        for _ in range(n_batches):
            (x1, y1), (x2, y2) = next(check[0]), next(check[1])
            mismatches += not (torch.equal(x1, x2) and torch.equal(y1, y2))

        for it in sides.values():  # warm-up: page cache, permutation
            next(it)
            next(it)
        tps: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        batch_tokens = args.batch * args.seq_len
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                it = sides[name]
                t0 = time.perf_counter()
                for _ in range(args.block):
                    next(it)
                tps[name].append(args.block * batch_tokens / (time.perf_counter() - t0))

    med = {name: statistics.median(v) for name, v in tps.items()}
    ratio = med["loader"] / med["numpy"]
    paired = statistics.median(a / b for a, b in zip(tps["loader"], tps["numpy"]))
    print(f"ratio={ratio:.2f} (goal >= {args.goal:.2f})")
    print(f"data: {len(tokens)} {args.split} tokens in {len(files)} shards of ~{args.shard_tokens} ({dtype}), "
          f"{n_windows} windows of {args.seq_len}+1, {crossing} cross a shard boundary; batch {args.batch}; "
          f"built in {build_s:.1f} s")
    print(f"{'side':<7} {'median tok/s':>13} {'min':>11} {'max':>11} {'us/batch':>9}")
    for name, v in tps.items():
        print(f"{name:<7} {med[name]:>13.3g} {min(v):>11.3g} {max(v):>11.3g} {1e6 * batch_tokens / med[name]:>9.1f}")
    print(f"median of per-round block ratios: {paired:.2f}; {args.rounds} rounds x {args.block} batches per side")
    print(f"batches equal on both sides: {n_batches - mismatches}/{n_batches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
