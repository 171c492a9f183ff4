"""stages/lm/data.py: memory-mapped windows, deterministic shuffle, exact resume, rank sharding, eval, errors."""

import gc
import math

import numpy as np
import pytest
import torch

from docs_fixture import real_docs, train_tokenizer, write_docs
from stages import tokenize_shards as ts
from stages.artifacts import Artifact
from stages.common import StageError
from stages.lm.data import (ShardIndex, TokenLoader, TokenStream, bits_per_byte, check_tokenizer, eval_batches,
                            split_totals)

T, B = 32, 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    docs = write_docs(tmp / "docs", real_docs())
    tok, _ = train_tokenizer(tmp / "tok", docs, vocab_size=1024)
    (tmp / "shards").mkdir()
    # small shards so windows cross shard boundaries
    ts.run(ts.Config(val_fraction=0.1, shard_tokens=4096), docs, tok, out=Artifact(ts.NAME, "t", tmp / "shards"))
    return tmp / "shards"


def flat(path, split):
    index = ShardIndex.load(path)
    return np.concatenate([TokenStream(index, split).read(0, index.totals(split)["tokens"])])


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_index_load_and_stream(shards):
    index = ShardIndex.load(shards)
    assert ShardIndex.load(shards / "shards").root == index.root
    assert len(index.shards("train")) > 2
    stream = TokenStream(index, "train")
    gc.collect()  # the numpy views must keep their memory maps alive
    tokens = flat(shards, "train")
    assert stream.n_tokens == len(tokens) == index.totals("train")["tokens"]
    edge = int(stream.starts[1])
    assert np.array_equal(stream.read(edge - 5, 10), tokens[edge - 5:edge + 5])  # across a shard boundary
    starts = np.array([0, edge - 5, edge, 7, len(tokens) - 11])  # in a shard, across a boundary, at the end
    rows = stream.windows(starts, 11)
    assert rows.dtype == np.int64 and rows.shape == (5, 11)
    assert all(np.array_equal(row, tokens[s:s + 11]) for row, s in zip(rows, starts))


def test_batches_are_shifted_windows(shards):
    tokens = flat(shards, "train")
    loader = TokenLoader(shards, "train", seq_len=T, batch_size=B, seed=1)
    x, y = next(loader)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    w = loader.order()[:B]
    for row, win in zip(x, w):
        assert np.array_equal(row.numpy(), tokens[int(win) * T:int(win) * T + T])


def test_deterministic_and_seeded(shards):
    a = take(TokenLoader(shards, "train", T, B, seed=3), 5)
    assert same(a, take(TokenLoader(shards, "train", T, B, seed=3), 5))
    assert not same(a, take(TokenLoader(shards, "train", T, B, seed=4), 5))


def test_epochs_cover_every_window_once(shards):
    loader = TokenLoader(shards, "train", T, B, seed=0)
    steps = loader.n_windows // B
    tokens, seen = flat(shards, "train"), set()
    for _ in range(steps):
        seen |= {tuple(row.tolist()) for row in next(loader)[0]}
    assert loader.epoch == 0 and len(seen) == steps * B  # no window twice in an epoch
    starts = [tuple(tokens[w * T:w * T + T].tolist()) for w in range(loader.n_windows)]
    assert seen <= set(starts)
    next(loader)
    assert loader.epoch == 1 and loader.position == B
    assert not np.array_equal(loader.order(), TokenLoader(shards, "train", T, B, seed=0).order())


@pytest.mark.parametrize("k", [0, 3, 700])  # 700 steps crosses into the next epoch
def test_resume_gives_the_same_batches(shards, k):
    uninterrupted = TokenLoader(shards, "train", T, B, seed=7)
    take(uninterrupted, k)
    state = uninterrupted.state_dict()
    assert set(state) == {"epoch", "position", "seed"}
    expected = take(uninterrupted, 4)
    resumed = TokenLoader(shards, "train", T, B, seed=999)
    resumed.load_state_dict(state)
    assert same(take(resumed, 4), expected)


def test_ranks_are_disjoint_and_cover_the_step(shards):
    W = 3
    single = TokenLoader(shards, "train", T, B * W, seed=5)
    ranks = [TokenLoader(shards, "train", T, B, seed=5, rank=r, world_size=W) for r in range(W)]
    for _ in range(3):
        xs = [next(r)[0] for r in ranks]
        rows = {tuple(row.tolist()) for x in xs for row in x}
        assert len(rows) == B * W  # no window shared between ranks
        assert rows == {tuple(row.tolist()) for row in next(single)[0]}
    assert {r.state_dict()["position"] for r in ranks} == {3 * B * W}


def test_a_step_reads_the_same_windows_however_the_batch_is_cut(shards):
    """The global batch (4B windows a step) is the recipe: 1 rank x 4B, 1 x B with 4 accumulated micro batches,
    2 ranks x B x 2 and 4 ranks x B read the same windows at every step, across epoch ends (an epoch's remainder
    is dropped at a step boundary, never mid-step)."""
    def steps(micro, world, accum):
        loaders = [TokenLoader(shards, "train", T, micro, seed=9, rank=r, world_size=world, grad_accum=accum)
                   for r in range(world)]
        n = 2 * loaders[0].n_windows // (4 * B) + 3  # past two epoch ends
        return [sorted(tuple(row.tolist()) for _ in range(accum) for loader in loaders for row in next(loader)[0])
                for _ in range(n)]

    whole = steps(4 * B, 1, 1)
    assert steps(B, 1, 4) == steps(B, 2, 2) == steps(B, 4, 1) == whole
    assert steps(B, 1, 2) != whole[:len(steps(B, 1, 2))]  # a smaller global batch is another recipe


def test_resume_with_another_world_size(shards):
    two = [TokenLoader(shards, "train", T, B, seed=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        for r in two:
            next(r)
    state = two[0].state_dict()
    assert state["position"] == 5 * 2 * B
    one = TokenLoader(shards, "train", T, B, seed=2)
    one.load_state_dict(state)
    reference = TokenLoader(shards, "train", T, 2 * B, seed=2)
    take(reference, 5)
    assert torch.equal(next(one)[0], next(reference)[0][:B])  # continues at the same place in the data


def test_eval_batches(shards):
    tokens = flat(shards, "val")
    n = (len(tokens) - 1) // T
    batches = list(eval_batches(shards, T, B))
    assert sum(len(x) for x, _ in batches) == n
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert np.array_equal(x.flatten().numpy(), tokens[:n * T]) and np.array_equal(y.flatten().numpy(), tokens[1:n * T + 1])
    assert same(batches, list(eval_batches(shards, T, B)))
    parts = [list(eval_batches(shards, T, B, rank=r, world_size=2)) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    assert len(list(eval_batches(shards, T, B, max_batches=2))) == 2


def test_bits_per_byte(shards):
    totals = split_totals(shards, "val")
    assert totals["bytes"] > totals["tokens"] > totals["docs"] > 0
    assert bits_per_byte(math.log(2), shards) == pytest.approx(totals["tokens"] / totals["bytes"])


def test_errors_name_the_fix(shards, tmp_path):
    index = ShardIndex.load(shards)
    check_tokenizer(index, index.tokenizer_sha256)
    with pytest.raises(StageError, match=f"{index.tokenizer_sha256[:12]}.*{'ab' * 6}.*re-run tokenize_shards"):
        check_tokenizer(index, "ab" * 32)
    with pytest.raises(StageError, match="lower seq_len"):
        TokenLoader(shards, "val", seq_len=100_000, batch_size=B)
    with pytest.raises(StageError, match="tokenize_shards"):
        ShardIndex.load(tmp_path)
    with pytest.raises(StageError, match="no split"):
        index.shards("test")
