"""stages.extract with executor="ray" (datatrove's RayPipelineExecutor) on a local Ray instance gives the same
documents, exclusions and funnel as the local executor, on three small WARCs where both dedups fire.

Skipped when Ray is not installed (`pip install ray`): Ray is an optional extra, only the cluster path needs it."""

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

try:
    import ray
except ImportError:  # not installed, or installed but broken
    pytest.skip("Ray is not importable: `pip install ray` to test extract's executor='ray'", allow_module_level=True)

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-cc"
SEG = "crawl-data/CC-MAIN-2024-22/segments"
DOLMA = f"{SEG}/tiny-samples/warc/dolma-wget-sample-0000.warc.gz"  # 214 kB, 22 HTML pages, most of them English
EXACT = f"{SEG}/copies/warc/exact-copy.warc.gz"  # DOLMA byte for byte: exact dedup drops one page of each pair
NEAR = f"{SEG}/copies/warc/near-copy.warc.gz"  # DOLMA's pages with one word changed: MinHash drops them
pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")  # datatrove vs tldextract 5
# Small enough for a 2-core CI box: Ray starts a fresh worker process per datatrove task, which loads datatrove, spaCy
# and fastText again (~5 CPU-seconds each), so 2 tasks over the 3 files and 1 MinHash bucket (one task per bucket)
# instead of FineWeb's 14: 8 Ray tasks in all. With one bucket of 4 hashes, a page that shares 97% of its 5-grams with
# another is caught with p = 0.97^4 = 0.89.
CONFIG = dict(tasks=2, minhash_buckets=1, minhash_hashes_per_bucket=4)


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


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray instance with 2 CPUs, shut down after the module. `memory` is Ray's logical reservation, not a
    limit: datatrove asks 2 GB per task by default, which a small CI box might not have to offer, leaving the tasks
    unscheduled; these tasks use a few hundred MB."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the Ray project (no network here)
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, _memory=8 << 30, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def run_extract(tmp_path: Path, dl: Artifact, name: str, **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    out.mkdir()
    return extract.run(extract.Config(**CONFIG, **kw), dl, out=Artifact("extract", name, out)), out


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


def test_ray_executor_matches_local(download_artifact, local_ray, tmp_path):
    local, local_out = run_extract(tmp_path, download_artifact, "local", executor="local", workers=1)
    on_ray, ray_out = run_extract(tmp_path, download_artifact, "ray", executor="ray")

    # the data exercises what a distributed run must get right: filters, and both dedups across the files
    steps = {row["step"]: row for row in local["funnel"]}
    assert local["documents"] > 5 and steps["language"]["dropped"] > 0
    assert steps["exact_dedup"]["dropped"] > 5 and steps["minhash_dedup"]["dropped"] > 5, local["funnel"]

    assert on_ray == local  # stats: funnel (documents and bytes in and out of every step), counts
    assert documents(ray_out) == documents(local_out)
    assert exclusions(ray_out) == exclusions(local_out)
    for stage, tasks in {"filter": 2, "exact_find": 1, "minhash_signature": 2, "minhash_buckets": 1,
                         "minhash_cluster": 1, "write": 2}.items():  # every stage ran, as Ray tasks
        logs = ray_out / "logs" / stage
        assert "ray_remote_kwargs" in json.loads((logs / "executor.json").read_text()), stage  # RayPipelineExecutor
        assert len(list((logs / "completions").iterdir())) == tasks, stage
