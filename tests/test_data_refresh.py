"""flows/data_refresh.py on a local Common-Crawl-layout mirror with two crawls, the second adding files.

Refresh 1 (the older crawl) makes dataset version 1. Refresh 2 (crawl=latest: collinfo.json names the newer
crawl) must download only the files version 1 does not hold, drop the pages that version 1 already has (the
newer crawl re-captured some), tokenize only its new documents and list version 1's shards by reference.
Refresh 3 finds nothing new and changes nothing, and so does refresh 4, which finds no `dataset` alias (a store
filled by `crawl2chat run`) and extends tokenize_shards/latest.
"""

import gzip
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator

from flows.data_refresh import DATASET, data_refresh
from stages.artifacts import ArtifactStore

TINY = Path(__file__).resolve().parent.parent / "data/tiny-cc/crawl-data/CC-MAIN-2024-22"
ZYTE = TINY / "segments/tiny-samples/warc/zyte-aeb-part1.warc.gz"  # 120 news pages: the mirror's WARCs cut from it
OLD, NEW = "CC-MAIN-2099-05", "CC-MAIN-2099-09"
# small presets for speed: a 300-piece tokenizer is enough to tokenize ~40 news pages
OVERRIDES = ["train_tokenizer.vocab_size=400", "train_tokenizer.heldout_chars=2000"]


def response_members(path: Path) -> list[bytes]:
    """The raw gzip members of a WARC's response records (one member per record, as Common Crawl writes)."""
    raw = path.read_bytes()
    members = []
    with open(path, "rb") as f:
        it = ArchiveIterator(f)
        for record in it:
            if record.rec_type == "response":
                record.content_stream().read()
                members.append((it.get_record_offset(), it.get_record_length()))
    return [raw[o:o + n] for o, n in members]


def write_warc(mirror: Path, crawl: str, name: str, members: list[bytes]) -> str:
    rel = f"crawl-data/{crawl}/segments/1.1/warc/{name}.warc.gz"
    (mirror / rel).parent.mkdir(parents=True, exist_ok=True)
    (mirror / rel).write_bytes(b"".join(members))
    return rel


def write_listing(mirror: Path, crawl: str, paths: list[str]) -> None:
    (mirror / f"crawl-data/{crawl}").mkdir(parents=True, exist_ok=True)
    (mirror / f"crawl-data/{crawl}/warc.paths.gz").write_bytes(gzip.compress("\n".join(paths).encode()))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    """OLD lists a1, a2; NEW lists them again plus b1 and b2, where b2 re-captures a1's pages."""
    root = tmp_path_factory.mktemp("mirror")
    pages = response_members(ZYTE)
    a1 = write_warc(root, OLD, "a1", pages[0:10])
    a2 = write_warc(root, OLD, "a2", pages[10:20])
    b1 = write_warc(root, NEW, "b1", pages[20:30])
    b2 = write_warc(root, NEW, "b2", pages[30:35] + pages[0:10])
    write_listing(root, OLD, [a1, a2])
    write_listing(root, NEW, [a1, a2, b1, b2])
    (root / "collinfo.json").write_text(json.dumps([{"id": NEW}, {"id": OLD}]))  # newest first
    return root


def shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def texts(store: ArtifactStore, ref: str) -> list[str]:
    art = store.get(*ref.split("/"))
    return [row for f in sorted((art.path / "docs").rglob("*.parquet"))
            for row in pq.read_table(f, columns=["text", "warc"]).to_pylist()]


def test_two_refreshes_make_two_versions_and_the_second_takes_only_new_files(mirror, tmp_path):
    root = str(tmp_path / "artifacts")
    store = ArtifactStore(root)
    first = data_refresh(preset="tiny", crawl=OLD, source=str(mirror), max_files=10, overrides=OVERRIDES, root=root)
    v1 = store.get(*first.split("/"))
    assert store.read_alias("tokenize_shards", DATASET) == v1.version
    dl1 = [m for m in store.manifests() if m["stage"] == "download"]
    assert len(dl1) == 1 and dl1[0]["stats"]["files_ok"] == 2

    second = data_refresh(preset="tiny", crawl="latest", source=str(mirror), max_files=10, overrides=OVERRIDES,
                          root=root)
    assert second != first
    v2 = store.get(*second.split("/"))
    stats = v2.manifest()["stats"]
    downloads = sorted((m for m in store.manifests() if m["stage"] == "download"), key=lambda m: m["ended"])
    assert len(downloads) == 2
    assert downloads[1]["stats"]["crawl"] == NEW
    assert downloads[1]["stats"]["files_ok"] == 2  # b1 and b2 only: a1, a2 are held by version 1
    files = json.loads((store.get("download", downloads[1]["version"]).path / "files.json").read_text())
    assert sorted(Path(f["path"]).name for f in files) == ["b1.warc.gz", "b2.warc.gz"]

    # version 2 extends version 1: its shards first, by reference; the tokenizer is the same
    assert stats["reuses"] == [first]
    assert stats["reused_shards"] == v1.manifest()["stats"]["train_shards"] + v1.manifest()["stats"]["val_shards"]
    assert stats["tokenizer_sha256"] == v1.manifest()["stats"]["tokenizer_sha256"]
    assert not [m for m in store.manifests() if m["stage"] == "train_tokenizer"][1:]  # trained once
    new_docs = stats["new_train_docs"] + stats["new_val_docs"]
    assert 0 < new_docs

    # no document of version 2 is a near-duplicate of one in version 1 (b2 re-captured a1's ten pages)
    extracts = sorted((m for m in store.manifests() if m["stage"] == "extract"), key=lambda m: m["ended"])
    old_docs = texts(store, f"extract/{extracts[0]['version']}")
    new_docs_rows = texts(store, f"extract/{extracts[1]['version']}")
    assert len(new_docs_rows) == new_docs
    assert extracts[1]["stats"]["deduplicated_against"] == [f"extract/{extracts[0]['version']}"]
    old_sh = [shingles(d["text"]) for d in old_docs]
    for d in new_docs_rows:
        s = shingles(d["text"])
        assert max(len(s & o) / len(s | o) for o in old_sh) < 0.8, d["text"][:80]
    # every a1 page that version 1 kept came again in b2, and was dropped as a near-duplicate of version 1
    from_a1 = sum(Path(d["warc"]).name == "a1.warc.gz" for d in old_docs)
    assert from_a1 > 0 and not any(Path(d["warc"]).name == "b2.warc.gz" and d["text"] in {o["text"] for o in old_docs}
                                   for d in new_docs_rows)
    funnel = {row["step"]: row for row in extracts[1]["stats"]["funnel"]}
    assert funnel["minhash_dedup"]["dropped"] >= from_a1

    # nothing new: no new version, no new stage work
    third = data_refresh(preset="tiny", crawl="latest", source=str(mirror), max_files=10, overrides=OVERRIDES,
                         root=root)
    assert third == second
    assert len([m for m in store.manifests() if m["stage"] == "download"]) == 2

    # a store that `crawl2chat run` filled has no dataset alias: the refresh extends tokenize_shards/latest
    (Path(root) / "_aliases" / "tokenize_shards" / DATASET).unlink()
    fourth = data_refresh(preset="tiny", crawl="latest", source=str(mirror), max_files=10, overrides=OVERRIDES,
                          root=root)
    assert fourth == second
    assert len([m for m in store.manifests() if m["stage"] == "download"]) == 2
