"""Test helpers for the extract stage on other executors (Ray, Slurm): a handmade three-WARC download artifact where
both dedups fire, the local executor's run of it as the reference, and what to compare between runs.

    from extract_fixture import CONFIG, documents, download_artifact, exclusions, local_run  # noqa: F401  (fixtures)
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from stages import extract
from stages.artifacts import Artifact

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-cc"
SEG = "crawl-data/CC-MAIN-2024-22/segments"
DOLMA = f"{SEG}/tiny-samples/warc/dolma-wget-sample-0000.warc.gz"  # 214 kB, 22 HTML pages, most of them English
EXACT = f"{SEG}/copies/warc/exact-copy.warc.gz"  # DOLMA byte for byte: exact dedup drops one page of each pair
NEAR = f"{SEG}/copies/warc/near-copy.warc.gz"  # DOLMA's pages with one word changed: MinHash drops them
# Small enough for a 2-core CI box: Ray and Slurm start a fresh process per datatrove task, which loads datatrove,
# spaCy and fastText again (~5 CPU-seconds each), so 2 tasks over the 3 files and 1 MinHash bucket (one task per
# bucket) instead of FineWeb's 14: 8 tasks in all. With one bucket of 4 hashes, a page that shares 97% of its 5-grams
# with another is caught with p = 0.97^4 = 0.89.
CONFIG = dict(tasks=2, minhash_buckets=1, minhash_hashes_per_bucket=4)
TASKS = {"filter": 2, "exact_find": 1, "minhash_signature": 2, "minhash_index": 1, "minhash_buckets": 1,
         "minhash_cluster": 1, "write": 2}  # datatrove tasks per pipeline under CONFIG


def write_near_copy(src: Path, dest: Path) -> None:
    """Every HTML response of `src` again, its first " the " changed to " a " and its URL marked as a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f, open(dest, "wb") as out:
        writer = WARCWriter(out, gzip=True)  # one gzip member per record, as Common Crawl writes them
        for record in ArchiveIterator(f):
            ctype = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
            if record.rec_type != "response" or "html" not in ctype:
                continue
            html = record.content_stream().read().replace(b" the ", b" a ", 1)  # de-chunked, decoded
            http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            url = record.rec_headers.get_header("WARC-Target-URI") + "?copy"
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html),
                                                          http_headers=http))


@pytest.fixture(scope="module")
def download_artifact(tmp_path_factory) -> Artifact:
    root = tmp_path_factory.mktemp("download")
    for rel in (DOLMA, EXACT):
        (root / "warc" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TINY / DOLMA, root / "warc" / rel)
    write_near_copy(TINY / DOLMA, root / "warc" / NEAR)
    (root / "files.json").write_text("[]")
    return Artifact("download", "handmade", root)


def run_extract(root: Path, dl: Artifact, name: str, **kw) -> tuple[dict, Path]:
    """extract.run with CONFIG and kw into root/name (made if missing: a second call resumes there)."""
    out = root / name
    out.mkdir(exist_ok=True)
    return extract.run(extract.Config(**CONFIG, **kw), dl, out=Artifact("extract", name, out)), out


@pytest.fixture(scope="module")
def local_run(download_artifact, tmp_path_factory) -> tuple[dict, Path]:
    """The reference: (stats, output folder) of the local executor, one worker. Checks that the data exercises what a
    distributed run must get right: filters, and both dedups across the files."""
    stats, out = run_extract(tmp_path_factory.mktemp("extract"), download_artifact, "local", executor="local",
                             workers=1)
    steps = {row["step"]: row for row in stats["funnel"]}
    assert stats["documents"] > 5 and steps["language"]["dropped"] > 0
    assert steps["exact_dedup"]["dropped"] > 5 and steps["minhash_dedup"]["dropped"] > 5, stats["funnel"]
    return stats, out


def documents(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "docs").to_pylist(), key=lambda row: row["id"])


def exclusions(out: Path) -> dict[str, list[dict]]:
    """{step: [excluded document, ...]} sorted by id, as the exclusion writers stored them (paths made relative)."""
    found = {}
    for step in sorted(p.name for p in (out / "excluded").iterdir()):
        docs = [json.loads(line) for f in (out / "excluded" / step).glob("*.jsonl.gz") for line in gzip.open(f, "rt")]
        for doc in docs:  # datatrove's JsonlReader notes the absolute path of filtered/<task>.jsonl.gz it read
            if "file_path" in doc["metadata"]:
                doc["metadata"]["file_path"] = str(Path(doc["metadata"]["file_path"]).relative_to(out))
        found[step] = sorted(docs, key=lambda d: d["id"])
    return found


def assert_same_output(stats: dict, out: Path, local: tuple[dict, Path]) -> None:
    """stats (funnel: documents and bytes in and out of every step; counts), documents and exclusions equal the
    local executor's, and every pipeline finished all its tasks."""
    assert stats == local[0]
    assert documents(out) == documents(local[1])
    assert exclusions(out) == exclusions(local[1])
    for stage, tasks in TASKS.items():
        assert len(list((out / "logs" / stage / "completions").iterdir())) == tasks, stage
