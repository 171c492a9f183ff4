"""tokenize_shards: flat uint16 shards that decode back to the documents, a stable train/val split, index.json,
the same bytes for any number of workers, and a resumed run that encodes only the unfinished work units."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import sentencepiece as spm

from docs_fixture import real_docs, train_tokenizer, write_docs
from stages import tokenize_shards as ts
from stages.artifacts import Artifact
from stages.common import StageError
from stages.lm.data import ShardIndex, TokenStream

EXTRA = [{"id": "marker", "text": "web text that says <|user|> and <|end|> literally"}, {"id": "empty", "text": ""}]


def shard(tmp, docs, tok, **cfg):
    out = Artifact(ts.NAME, "test", tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    # one worker unless a test asks for more: encoding in-process skips the pool's start-up (~1 s per worker)
    return out, ts.run(ts.Config(**{"val_fraction": 0.1, "shard_tokens": 8192, "workers": 1, **cfg}), docs, tok,
                       out=out)


def contents(path):
    """Every file under path -> its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    docs = write_docs(tmp / "docs", real_docs() + EXTRA)
    tok, tok_stats = train_tokenizer(tmp / "tok", docs, vocab_size=1024)
    out, stats = shard(tmp / "shards", docs, tok)
    sp = spm.SentencePieceProcessor(model_file=str(tok.path / "tokenizer.model"))
    return docs, tok, tok_stats, out, stats, sp


def read(path):
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        assert reader.num_record_batches == 1 and reader.schema.names == ["tokens"]
        return reader.get_batch(0).column(0).to_numpy(zero_copy_only=True).copy()


def test_index_and_stats(built):
    _, _, tok_stats, out, stats, _ = built
    index = json.loads((out.path / "index.json").read_text())
    assert index["tokenizer_sha256"] == tok_stats["tokenizer_sha256"] == stats["tokenizer_sha256"]
    assert (index["vocab_size"], index["dtype"], index["bos_id"], index["eos_id"]) == (1024, "uint16", 1, 2)
    n_real = len(real_docs()) + 1  # the empty doc is skipped
    assert stats["train_docs"] + stats["val_docs"] == index["total_docs"] == n_real
    assert stats["skipped_empty_docs"] == 1 and stats["docs_with_escaped_markers"] == 1
    for split in ("train", "val"):
        shards = index["splits"][split]
        assert shards and sum(s["docs"] for s in shards) == index["totals"][split]["docs"] > 0
        assert sum(s["tokens"] for s in shards) == index["totals"][split]["tokens"] == stats[f"{split}_tokens"]
        for s in shards:
            tokens = read(out.path / s["file"])
            assert tokens.dtype == np.uint16 and len(tokens) == s["tokens"]
            assert s["file"] == f"shards/{split}_{shards.index(s):05d}.arrow"
            assert (tokens == 1).sum() == (tokens == 2).sum() == s["docs"]  # one bos/eos pair per doc
            assert tokens[0] == 1 and tokens[-1] == 2
        assert all(s["tokens"] >= 8192 for s in shards[:-1])
    assert stats["train_shards"] > 1
    json.dumps(stats)


def test_shards_decode_to_the_documents(built):
    docs, _, _, out, _, sp = built
    index = json.loads((out.path / "index.json").read_text())
    decoded = []
    for split in ("train", "val"):
        stream = np.concatenate([read(out.path / s["file"]) for s in index["splits"][split]])
        bounds = np.flatnonzero(stream == 1)
        decoded += [sp.decode(doc[1:-1].tolist()) for doc in np.split(stream, bounds[1:])]
    texts = [d["text"] for d in real_docs() + EXTRA if d["text"]]
    assert sorted(decoded) == sorted(texts)
    assert sum(index["totals"][s]["bytes"] for s in ("train", "val")) == sum(len(t.encode()) for t in texts)


def test_chat_markers_in_web_text_are_not_special(built):
    *_, out, _, sp = built
    index = json.loads((out.path / "index.json").read_text())
    for split in ("train", "val"):
        for s in index["splits"][split]:
            assert not np.isin(read(out.path / s["file"]), [4, 5, 6, 7]).any()


def test_split_is_deterministic_and_by_id(built, tmp_path):
    docs, tok, _, out, stats, _ = built
    _, again = shard(tmp_path / "a", docs, tok, shard_tokens=2**20)  # other shard size, same split
    assert (again["train_docs"], again["val_docs"]) == (stats["train_docs"], stats["val_docs"])
    assert (again["train_tokens"], again["val_tokens"]) == (stats["train_tokens"], stats["val_tokens"])
    assert again["train_shards"] == again["val_shards"] == 1
    # reversing the input order moves no document between splits
    rev = write_docs(tmp_path / "rev", list(reversed(real_docs() + EXTRA)), n_files=3)
    _, flipped = shard(tmp_path / "b", rev, tok)
    assert (flipped["train_docs"], flipped["val_tokens"]) == (stats["train_docs"], stats["val_tokens"])


def test_two_docs_give_one_val_doc(built, tmp_path):
    _, tok, *_ = built
    docs = write_docs(tmp_path / "docs", real_docs()[:2], n_files=1)
    _, stats = shard(tmp_path / "s", docs, tok, val_fraction=0.001)
    assert (stats["train_docs"], stats["val_docs"]) == (1, 1)


def test_bad_inputs(built, tmp_path):
    docs, tok, *_ = built
    with pytest.raises(StageError, match="train_tokenizer"):
        shard(tmp_path / "s", docs, docs)
    with pytest.raises(ValueError, match="val_fraction"):
        ts.Config(val_fraction=0.0)
    with pytest.raises(ValueError, match="workers"):
        ts.Config(workers=-1)


def test_output_is_the_same_for_any_number_of_workers(built, tmp_path):
    _, tok, *_ = built
    docs = write_docs(tmp_path / "docs", real_docs() + EXTRA, n_files=5)  # 5 row groups = 5 work units
    _, one = shard(tmp_path / "one", docs, tok, workers=1)
    _, two = shard(tmp_path / "two", docs, tok, workers=2)
    assert one == two and one["work_units"] == 5
    assert contents(tmp_path / "one") == contents(tmp_path / "two")
    assert "work" not in {p.name for p in (tmp_path / "two").iterdir()}  # scratch space is removed


def test_a_crashed_run_resumes_with_the_unfinished_units(built, tmp_path, monkeypatch):
    _, tok, *_ = built
    docs = write_docs(tmp_path / "docs", real_docs() + EXTRA, n_files=5)
    encode, encoded = ts._encode_unit, []

    def crash_after_two(job):
        if len(encoded) == 2:
            raise RuntimeError("simulated crash")
        encode(job)
        encoded.append(job[0])

    monkeypatch.setattr(ts, "_encode_unit", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard(tmp_path / "s", docs, tok)
    assert sorted(p.name for p in (tmp_path / "s" / "work").iterdir()) == ["00000.npz", "00001.npz"]
    (tmp_path / "s" / "shards").mkdir()  # as a crash during the merge would leave it
    (tmp_path / "s" / "shards" / "train_00042.arrow").write_bytes(b"partial merge of the crashed run")

    def count(job):
        encode(job)
        encoded.append(job[0])

    encoded.clear()
    monkeypatch.setattr(ts, "_encode_unit", count)
    _, resumed = shard(tmp_path / "s", docs, tok)
    assert encoded == [2, 3, 4]  # only the units the crash left unfinished
    _, clean = shard(tmp_path / "clean", docs, tok)
    assert resumed == clean
    assert contents(tmp_path / "s") == contents(tmp_path / "clean")


def test_extends_an_earlier_version_without_copying(built, tmp_path):
    """A data refresh: the new version encodes only the new documents and lists the earlier shards by path."""
    docs, tok, _, first, first_stats, _ = built
    store = tmp_path / "store"  # versions of a stage are siblings in the store: ../<version>/ reaches them
    prev = Artifact(ts.NAME, "v1", store / ts.NAME / "v1")
    prev.path.parent.mkdir(parents=True)
    shutil.copytree(first.path, prev.path)
    new_docs = write_docs(tmp_path / "new_docs", [{"id": "fresh-1", "text": "brand new page about rivers " * 40},
                                                  {"id": "fresh-2", "text": "another new page on mountains " * 40}])
    out = Artifact(ts.NAME, "v2", store / ts.NAME / "v2")
    out.path.mkdir()
    stats = ts.run(ts.Config(val_fraction=0.1, shard_tokens=8192, workers=1), new_docs, tok, prev, out=out)

    index = json.loads((out.path / "index.json").read_text())
    assert index["reuses"] == stats["reuses"] == ["tokenize_shards/v1"]
    assert stats["new_train_docs"] + stats["new_val_docs"] == 2
    assert stats["reused_shards"] == first_stats["train_shards"] + first_stats["val_shards"]
    for split in ("train", "val"):
        assert stats[f"{split}_docs"] == first_stats[f"{split}_docs"] + stats[f"new_{split}_docs"]
        files = [s["file"] for s in index["splits"][split]]
        assert all(f.startswith("../v1/shards/") for f in files[:first_stats[f"{split}_shards"]])
    own = sorted(p.name for p in (out.path / "shards").iterdir())  # only the new documents' shards
    assert len(own) == stats["train_shards"] + stats["val_shards"] - stats["reused_shards"] <= 2
    # the loader reads the whole dataset: earlier tokens, then the new ones
    stream = TokenStream(ShardIndex.load(out.path), "train")
    assert sum(len(a) for a in stream.arrays) == stats["train_tokens"]

    other_tok, _ = train_tokenizer(tmp_path / "tok2", docs, vocab_size=600)
    with pytest.raises(StageError, match="extend a dataset version with the tokenizer that made it"):
        out3 = Artifact(ts.NAME, "v3", store / ts.NAME / "v3")
        out3.path.mkdir()
        ts.run(ts.Config(val_fraction=0.1, workers=1), new_docs, other_tok, prev, out=out3)
