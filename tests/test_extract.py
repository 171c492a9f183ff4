"""stages.extract on a small download artifact built by hand from the bundled sample, with no network at all."""

from __future__ import annotations

import gzip
import ipaddress
import json
import shutil
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages import extract
from stages.artifacts import Artifact
from stages.common import StageError

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-cc"
SEG = "crawl-data/CC-MAIN-2024-22/segments"
SMALL = f"{SEG}/1715971057216.39/warc/CC-MAIN-20240517233122-20240518023122-00000.warc.gz"
DOLMA = f"{SEG}/tiny-samples/warc/dolma-wget-sample-0000.warc.gz"
ZYTE = f"{SEG}/tiny-samples/warc/zyte-aeb-part1.warc.gz"
TRUNCATED = f"{SEG}/bad/warc/truncated.warc.gz"
GARBAGE = f"{SEG}/bad/warc/garbage.warc.gz"
pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")  # datatrove vs tldextract 5
COLUMNS = ["id", "url", "text", "language", "language_score", "warc"]


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Any name lookup or TCP connection beyond this machine fails the test (unix sockets, 127.0.0.1 allowed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                raise AssertionError(f"network access to {address} during an extract test")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            raise AssertionError(f"name lookup of {host} during an extract test")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="module")
def download_artifact(tmp_path_factory) -> Artifact:
    """Two good WARCs, the first third of the 120-article one (cut mid-gzip) and a file of garbage."""
    root = tmp_path_factory.mktemp("download")
    for rel in (SMALL, DOLMA):
        (root / "warc" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TINY / rel, root / "warc" / rel)
    (root / "warc" / TRUNCATED).parent.mkdir(parents=True)
    whole = (TINY / ZYTE).read_bytes()
    (root / "warc" / TRUNCATED).write_bytes(whole[: len(whole) // 3])
    (root / "warc" / GARBAGE).write_bytes(b"\x1f\x8bnot really gzip" * 50)
    (root / "files.json").write_text("[]")
    return Artifact("download", "handmade", root)


def run_extract(tmp_path: Path, dl: Artifact, name: str = "out", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    return extract.run(extract.Config(**kw), dl, out=Artifact("extract", "test", out)), out


def check_funnel(stats: dict) -> None:
    rows = stats["funnel"]
    for row in rows:
        assert row["docs_in"] - row["dropped"] == row["docs_out"] >= 0, row
        if "reasons" in row:
            assert sum(row["reasons"].values()) <= row["dropped"]
    for before, after in zip(rows, rows[1:]):
        assert before["docs_out"] == after["docs_in"], (before, after)
    assert rows[0]["docs_in"] == stats["records"]
    assert rows[-1]["docs_out"] == stats["documents"]
    assert rows[-1]["chars"] == stats["characters"]


@pytest.fixture(scope="module")
def default_run(download_artifact, tmp_path_factory):
    """The default Config (resiliparse, English, FineWeb thresholds), 2 worker processes."""
    return run_extract(tmp_path_factory.mktemp("extract"), download_artifact)


def test_docs_are_english_text_with_the_contracted_columns(default_run):
    stats, out = default_run
    table = pq.read_table(out / "docs")
    assert table.column_names == COLUMNS
    assert table.num_rows == stats["documents"] >= 10
    rows = table.to_pylist()
    assert sum(len(r["text"]) for r in rows) == stats["characters"]
    for r in rows:
        assert r["text"].strip() and "<html" not in r["text"].lower()
        assert r["language"] == "en" and r["language_score"] > 0.65
        assert r["url"].startswith("http") and r["id"]
        assert r["warc"].startswith("warc/crawl-data/") and r["warc"].endswith(".warc.gz")
    assert len({r["id"] for r in rows}) == len(rows)


def test_funnel_adds_up_and_exclusions_are_kept(default_run):
    stats, out = default_run
    check_funnel(stats)
    steps = [r["step"] for r in stats["funnel"]]
    assert steps == ["read_warc", "url", "resiliparse", "language", "gopher_repetition", "gopher_quality",
                     "write_parquet"]
    by_step = {r["step"]: r for r in stats["funnel"]}
    for step in ("language", "gopher_repetition", "gopher_quality"):
        files = list((out / "excluded" / step).glob("*.jsonl.gz"))
        kept = [json.loads(line) for f in files for line in gzip.open(f, "rt")]
        assert len(kept) == by_step[step]["dropped"]
    assert by_step["language"]["dropped"] > 0  # the sample has non-English pages
    quality = [json.loads(line) for f in (out / "excluded" / "gopher_quality").glob("*.jsonl.gz")
               for line in gzip.open(f, "rt")]
    assert all(d["metadata"]["filter_reason"].startswith("gopher_") for d in quality)


def test_damaged_warcs_are_reported_not_fatal(default_run):
    stats, out = default_run
    named = " ".join(stats["unreadable_warcs"])
    assert len(stats["unreadable_warcs"]) == 2 and f"warc/{TRUNCATED}" in named and f"warc/{GARBAGE}" in named
    warcs = set(pq.read_table(out / "docs", columns=["warc"]).column("warc").to_pylist())
    assert f"warc/{DOLMA}" in warcs
    assert f"warc/{TRUNCATED}" in warcs  # the articles before the cut are kept


def test_rerun_skips_finished_tasks(download_artifact, default_run):
    stats, out = default_run
    before = {p: p.stat().st_mtime_ns for p in (out / "docs").glob("*.parquet")}
    again = extract.run(extract.Config(), download_artifact, out=Artifact("extract", "test", out))
    assert again == stats
    assert {p: p.stat().st_mtime_ns for p in (out / "docs").glob("*.parquet")} == before


def test_trafilatura_all_languages_in_process(download_artifact, tmp_path):
    """One task in this process, so the no_internet guard sees every connection datatrove might attempt."""
    stats, out = run_extract(tmp_path, download_artifact, extractor="trafilatura", languages=(), workers=1, tasks=1)
    check_funnel(stats)
    assert stats["funnel"][2]["step"] == "trafilatura"
    table = pq.read_table(out / "docs")
    assert table.num_rows == stats["documents"] > 0
    assert all(t.strip() for t in table.column("text").to_pylist())
    assert len(stats["unreadable_warcs"]) == 2


def test_input_without_warcs_names_the_fix(tmp_path):
    empty = tmp_path / "dl"
    (empty / "warc").mkdir(parents=True)
    with pytest.raises(StageError, match="stages.download"):
        run_extract(tmp_path, Artifact("download", "empty", empty))
    with pytest.raises(StageError, match="one download artifact"):
        extract.run(extract.Config(), out=Artifact("extract", "x", tmp_path))


def test_config_validation():
    with pytest.raises(ValueError, match="extractor"):
        extract.Config(extractor="beautifulsoup")
    with pytest.raises(ValueError, match="language_threshold"):
        extract.Config(language_threshold=1.5)
    with pytest.raises(ValueError, match="languages"):
        extract.Config(languages="en")
    assert extract.lid_model_path().is_file()
