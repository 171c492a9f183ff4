"""Test helpers: a docs artifact (the extract stage's output layout) made of real article text, and a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.artifacts import Artifact

TEXTS = Path(__file__).parent / "fixtures" / "zyte-aeb" / "texts.jsonl"


def real_docs() -> list[dict]:
    """67 web articles (scrapinghub/article-extraction-benchmark, MIT) as {id, url, text}."""
    rows = [json.loads(line) for line in TEXTS.read_text().splitlines()]
    return [{"id": f"zyte-{i:04d}", "url": r["url"], "text": r["text"]} for i, r in enumerate(rows)]


def write_docs(path: Path, docs: list[dict], n_files: int = 2) -> Artifact:
    """docs/**/*.parquet with extract's columns: id, url, text, language, language_score, warc."""
    for k in range(n_files):
        part = docs[k::n_files]
        (path / "docs" / f"{k:02d}").mkdir(parents=True, exist_ok=True)
        table = pa.table({"id": [d["id"] for d in part], "url": [d.get("url", "") for d in part],
                          "text": [d["text"] for d in part], "language": ["en"] * len(part),
                          "language_score": [0.99] * len(part), "warc": ["zyte-aeb.part1.warc.gz"] * len(part)})
        pq.write_table(table, path / "docs" / f"{k:02d}" / "part.parquet")
    return Artifact("extract", "test", path)


def train_tokenizer(path: Path, docs: Artifact, vocab_size: int = 1024) -> tuple[Artifact, dict]:
    from stages import train_tokenizer as tt

    path.mkdir(parents=True, exist_ok=True)
    out = Artifact(tt.NAME, "test", path)
    stats = tt.run(tt.Config(vocab_size=vocab_size, heldout_chars=20_000), docs, out=out)
    return out, stats


def build_shards(tmp: Path, vocab_size: int):
    """docs -> tokenizer -> shards (20% val, 8192-token shards) committed in a store under tmp.

    Returns (store, docs, tokenizer BuildResult, shards BuildResult); the store has `latest` aliases for both."""
    from stages import tokenize_shards
    from stages import train_tokenizer as tt
    from stages.artifacts import ArtifactStore
    from stages.common import build

    store = ArtifactStore(tmp / "store")
    docs = write_docs(tmp / "docs", real_docs())
    tok = build(tt, tt.Config(vocab_size=vocab_size, heldout_chars=20_000), [docs], store)
    shards = build(tokenize_shards, tokenize_shards.Config(val_fraction=0.2, shard_tokens=8192, workers=1),
                   [docs, tok.artifact], store)
    store.set_alias(tt.NAME, "latest", tok.artifact.version)
    store.set_alias(tokenize_shards.NAME, "latest", shards.artifact.version)
    return store, docs, tok, shards
