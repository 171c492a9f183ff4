"""stages.download against the bundled Common Crawl sample: local folder, file:// and a 127.0.0.1 mirror that
injects faults (tests/ccserver.py): retries, Range resume, error bodies, digest checks, samples, crawl=latest."""

from __future__ import annotations

import gzip
import importlib.util
import io
import itertools
import json
import logging
import shutil
import zlib
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator

from ccserver import FAULTS, CCServer
from stages import cc_fetch, download
from stages.artifacts import Artifact, ArtifactStore, sha256_file
from stages.common import StageError, build

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-cc"
CRAWL = "CC-MAIN-2024-22"
LISTING = f"crawl-data/{CRAWL}/warc.paths.gz"
SMALL = f"crawl-data/{CRAWL}/segments/1715971057216.39/warc/CC-MAIN-20240517233122-20240518023122-00000.warc.gz"
ZYTE = f"crawl-data/{CRAWL}/segments/tiny-samples/warc/zyte-aeb-part1.warc.gz"  # 4.3 MB, 121 gzip members
GARBAGE = f"crawl-data/{CRAWL}/segments/bad/warc/garbage.warc.gz"
TRUNCATED = f"crawl-data/{CRAWL}/segments/bad/warc/truncated.warc.gz"
FAST = dict(backoff_s=0.001, timeout_s=5)  # tiny waits: the retry logic is under test, not the clock


def listed(root: Path) -> list[str]:
    return gzip.decompress((root / LISTING).read_bytes()).decode().split()


def write_listing(root: Path, lines: list[str]) -> None:
    (root / LISTING).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


def members(data: bytes) -> list[bytes]:
    """The gzip members of `data`, compressed, in order."""
    out = []
    while data:
        d = zlib.decompressobj(wbits=31)
        d.decompress(data)
        out.append(data[: len(data) - len(d.unused_data)])
        data = d.unused_data
    return out


def digest_headers(data: bytes) -> int:
    """Records carrying a WARC-Block-Digest, counted by warcio alone (independent of the stage's own reader)."""
    return sum(bool(r.rec_headers.get_header("WARC-Block-Digest")) for r in ArchiveIterator(io.BytesIO(data)))


@pytest.fixture
def mirror(tmp_path) -> Path:
    """A writable copy of the bundled sample."""
    root = tmp_path / "mirror"
    shutil.copytree(TINY, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def out_dir(tmp_path, name="out") -> Artifact:
    path = tmp_path / name
    path.mkdir(exist_ok=True)
    return Artifact("download", "test", path)


def fetch_all(source: str, tmp_path, name="out", **kw) -> tuple[dict, Artifact]:
    out = out_dir(tmp_path, name)
    cfg = download.Config(source=source, **({"num_files": 0} | FAST | kw))
    return download.run(cfg, out=out), out


def check_output(stats: dict, out: Artifact, expected: list[str], source: Path | None = None) -> None:
    files = json.loads((out.path / "files.json").read_text())
    assert [f["path"] for f in files] == sorted(expected)
    for f in files:
        local = out.path / "warc" / f["path"]
        assert local.stat().st_size == f["size"]
        assert f["sha256"] == sha256_file(local)
        assert f["url"].endswith(f["path"])
        if source is not None:  # byte-identical to the source, every digest it carries verified
            assert local.read_bytes() == (source / f["path"]).read_bytes()
            assert f["digests_verified"] == digest_headers(local.read_bytes()) > 0
    assert stats["bytes"] == sum(f["size"] for f in files)
    assert stats["digests_verified"] == sum(f["digests_verified"] for f in files)
    assert not list(out.path.rglob("*.part"))


def test_local_folder_and_file_url(mirror, tmp_path):
    expected = listed(mirror)
    stats, out = fetch_all(str(mirror), tmp_path, "plain")
    assert stats["files_requested"] == stats["files_fetched"] == stats["files_ok"] == 5
    assert stats["bad_files"] == [] and stats["rejected_lines"] == {} and stats["crawl"] == CRAWL
    assert stats["records"] == 234 and stats["digests_verified"] == 217  # the sample: 17 records carry no digest
    check_output(stats, out, expected, source=mirror)

    stats2, out2 = fetch_all(mirror.as_uri(), tmp_path, "uri")
    check_output(stats2, out2, expected, source=mirror)


def test_faulty_server_gives_identical_verified_files(mirror, tmp_path):
    # 20 files (the 5 real ones and copies of the 4 small ones under new names) so that faults hit many requests
    paths = listed(mirror)
    for i in range(15):
        src = [p for p in paths if p != ZYTE][i % 4]
        copy = f"crawl-data/{CRAWL}/segments/copies/warc/copy-{i:02d}.warc.gz"
        (mirror / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / src, mirror / copy)
        paths.append(copy)
    write_listing(mirror, paths)
    # Seed 9 draws 7 faults in 26 requests, 6 of the 7 kinds (the draws are sequential, so the same each run;
    # which file gets which fault depends on thread timing)
    with CCServer(mirror, fault_rate=0.2, seed=9) as server:
        stats, out = fetch_all(server.url, tmp_path, retries=10, workers=3)
    check_output(stats, out, paths, source=mirror)
    assert stats["files_ok"] == 20 and stats["bad_files"] == [] and stats["retries"] > 0
    faults = [fault for _, _, fault in server.log if fault]
    assert 0 < len(faults) < 0.3 * len(server.log)
    assert len(set(faults)) >= 5  # several kinds, not one lucky one
    # files whose body broke part-way were resumed with a Range request, not fetched from byte 0 again
    assert stats["files_resumed"] > 0 and any(rng and not rng.startswith("bytes=0-") for _, rng, _ in server.log)


def test_xml_error_body_with_status_200_is_rejected_and_retried(mirror, tmp_path):
    with CCServer(mirror) as server:
        # twice: an error body is a transient error, not a corrupt file (the same damage twice would drop the file)
        server.force(SMALL, "xml200", "xml200")
        server.force(LISTING, "503")
        stats, out = fetch_all(server.url, tmp_path)
    assert [fault for _, _, fault in server.requests_for(SMALL)] == ["xml200", "xml200", None]
    assert [fault for _, _, fault in server.requests_for(LISTING)] == ["503", None]
    assert stats["files_ok"] == 5 and stats["bad_files"] == [] and stats["retries"] == 2  # the listing's is apart
    check_output(stats, out, listed(mirror), source=mirror)


def test_every_fault_kind_alone_is_survived(mirror, tmp_path):
    with CCServer(mirror) as server:
        for fault in FAULTS:  # the whole list on one file, one after the other
            server.force(ZYTE, fault)
        stats, out = fetch_all(server.url, tmp_path, retries=len(FAULTS))
    assert [fault for _, _, fault in server.requests_for(ZYTE)][: len(FAULTS)] == list(FAULTS)
    check_output(stats, out, listed(mirror), source=mirror)


def test_partial_file_is_resumed_with_a_range_request(mirror, tmp_path):
    whole = (mirror / ZYTE).read_bytes()
    out = out_dir(tmp_path)
    part = out.path / "warc" / (ZYTE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:1_000_003])  # an earlier attempt stopped mid-member
    with CCServer(mirror) as server:
        stats, _ = fetch_all(server.url, tmp_path, num_files=0)
    assert [rng for _, rng, _ in server.requests_for(ZYTE)] == ["bytes=1000003-"]
    assert stats["files_resumed"] == 1
    assert stats["bytes_transferred"] == sum((mirror / p).stat().st_size for p in listed(mirror)) - 1_000_003
    check_output(stats, out, listed(mirror), source=mirror)


def test_server_that_ignores_range_gets_a_full_refetch(mirror, tmp_path):
    out = out_dir(tmp_path)
    part = out.path / "warc" / (ZYTE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes((mirror / ZYTE).read_bytes()[:500_000])
    with CCServer(mirror, ignore_range=True) as server:
        stats, _ = fetch_all(server.url, tmp_path)
    assert len(server.requests_for(ZYTE)) == 1 and stats["files_resumed"] == 0  # its 200 replaced the .part
    check_output(stats, out, listed(mirror), source=mirror)


def test_damaged_partial_file_is_fetched_again_from_scratch(mirror, tmp_path):
    out = out_dir(tmp_path)
    part = out.path / "warc" / (ZYTE + ".part")
    part.parent.mkdir(parents=True)
    head = bytearray((mirror / ZYTE).read_bytes()[:600_000])
    head[300_000] ^= 0xFF  # one flipped bit pattern inside a compressed record: gzip or the digest catches it
    part.write_bytes(bytes(head))
    with CCServer(mirror) as server:
        stats, _ = fetch_all(server.url, tmp_path)
    assert [rng for _, rng, _ in server.requests_for(ZYTE)] == ["bytes=600000-", None]  # resumed, failed, refetched
    check_output(stats, out, listed(mirror), source=mirror)


def bad_digest_warc(mirror: Path) -> tuple[str, str]:
    """Copy ZYTE with one payload byte changed in record 5 (gzip stays valid); its path and that record's ID."""
    parts = members((mirror / ZYTE).read_bytes())
    text = bytearray(gzip.decompress(parts[5]))
    text[-10] ^= 0x20  # a byte of the payload near the end, before the record's closing blank lines
    parts[5] = gzip.compress(bytes(text))
    path = f"crawl-data/{CRAWL}/segments/bad/warc/bad-digest.warc.gz"
    (mirror / path).parent.mkdir(parents=True, exist_ok=True)
    (mirror / path).write_bytes(b"".join(parts))
    record = next(iter(ArchiveIterator(io.BytesIO(gzip.decompress(parts[5])))))
    return path, record.rec_headers.get_header("WARC-Record-ID")


def test_bad_digest_is_refetched_then_reported(mirror, tmp_path):
    bad, record_id = bad_digest_warc(mirror)
    write_listing(mirror, listed(mirror) + [bad])
    with CCServer(mirror) as server:
        stats, out = fetch_all(server.url, tmp_path)
    assert len(server.requests_for(bad)) == 2  # fetched again once; the same bad record twice: the source is bad
    [report] = stats["bad_files"]
    assert report["path"] == bad and "digest" in report["reason"]
    assert [r["record"] for r in report["bad_records"]] == [record_id]
    assert not (out.path / "warc" / bad).exists()
    check_output(stats, out, [p for p in listed(mirror) if p != bad], source=mirror)


def test_errors_that_do_not_go_away_fail_the_stage(mirror, tmp_path):
    with CCServer(mirror) as server:
        server.force(SMALL, *["503"] * 10)
        with pytest.raises(StageError, match="re-run"):
            fetch_all(server.url, tmp_path, retries=2)
    assert len(server.requests_for(SMALL)) == 3  # the first try and 2 retries
    assert not (tmp_path / "out" / "files.json").exists()


def test_missing_file_is_a_bad_file_not_a_retry(mirror, tmp_path):
    gone = f"crawl-data/{CRAWL}/segments/gone/warc/missing.warc.gz"
    write_listing(mirror, listed(mirror) + [gone])
    with CCServer(mirror) as server:
        stats, out = fetch_all(server.url, tmp_path)
    assert [b["path"] for b in stats["bad_files"]] == [gone]
    assert "404" in stats["bad_files"][0]["reason"]
    assert len(server.requests_for(gone)) == 1
    assert stats["files_ok"] == 5


def test_sample_keeps_whole_members_of_the_first_megabytes(mirror, tmp_path):
    with CCServer(mirror) as server:
        stats, out = fetch_all(server.url, tmp_path, sample_mb=1.0)
    assert [rng for _, rng, _ in server.requests_for(ZYTE)] == ["bytes=0-999999"]
    source = (mirror / ZYTE).read_bytes()
    sample = (out.path / "warc" / ZYTE).read_bytes()
    assert 900_000 < len(sample) <= 1_000_000 and source.startswith(sample)
    assert len(sample) in set(itertools.accumulate(map(len, members(source))))  # ends at a member boundary
    [entry] = [f for f in json.loads((out.path / "files.json").read_text()) if f["path"] == ZYTE]
    assert entry["digests_verified"] == entry["records"] == digest_headers(sample) < 121
    for p in listed(mirror):  # files under 1 MB come whole
        if p != ZYTE:
            assert (out.path / "warc" / p).read_bytes() == (mirror / p).read_bytes()
    local, out2 = fetch_all(str(mirror), tmp_path, "local", sample_mb=1.0)  # the same bytes from a folder
    assert (out2.path / "warc" / ZYTE).read_bytes() == sample and local["bytes"] == stats["bytes"]

    with pytest.raises(StageError, match="raise sample_mb"):  # no whole record in the first 100 bytes
        fetch_all(str(mirror), tmp_path, "tiny", sample_mb=0.0001)


def test_stream_cuts_at_members_whatever_the_chunks(monkeypatch):
    """WarcStream on ragged chunks (1-byte first chunks split the gzip magic; then chunks smaller than a member, and
    chunks of several inflate slices), with zlib and with the inflater in use (ISA-L when installed): the same member
    boundary, records and digests."""
    data = (TINY / ZYTE).read_bytes()[:1_000_000]
    ends = set(itertools.accumulate(map(len, members((TINY / ZYTE).read_bytes()))))

    def ragged(step: int):
        yield data[:1]
        yield data[1:2]
        for i in range(2, len(data), step):
            yield data[i: i + step]

    results = []
    for step in (7919, 200_003):  # primes, so chunks, slices and members never line up; 200_003 > 3 x INFLATE_SLICE
        for inflater in (zlib, cc_fetch.inflate):
            monkeypatch.setattr(cc_fetch, "inflate", inflater)
            stream = cc_fetch.WarcStream(ragged(step))
            results.append((cc_fetch.verify(stream), stream.whole, stream.size))
    assert results[0] == results[1] == results[2] == results[3]
    counts, whole, size = results[0]
    assert whole in ends and size - whole < 20_000 and counts["digests_verified"] == counts["records"] > 10
    with pytest.raises(cc_fetch.CorruptError, match="not gzip"):
        cc_fetch.verify(cc_fetch.WarcStream(iter([b"\x1f", b"<?xml"])))


def test_latest_crawl_from_collinfo(mirror, tmp_path):
    with pytest.raises(StageError, match="collinfo_url"):
        fetch_all(str(mirror), tmp_path, "none", crawl="latest")
    (mirror / "collinfo.json").write_text(json.dumps([{"id": CRAWL, "name": "May 2024"},
                                                       {"id": "CC-MAIN-2024-18", "name": "April 2024"}]))
    stats, _ = fetch_all(str(mirror), tmp_path, "local", crawl="latest", num_files=1)
    assert stats["crawl"] == CRAWL and stats["files_ok"] == 1
    with CCServer(mirror) as server:
        server.force("collinfo.json", "xml200")
        stats, _ = fetch_all(server.url, tmp_path, "http", crawl="latest", num_files=1)
        assert [f for _, _, f in server.requests_for("collinfo.json")] == ["xml200", None]
    assert stats["crawl"] == CRAWL
    custom = tmp_path / "crawls.json"
    custom.write_text(json.dumps([{"id": "CC-MAIN-2099-01"}]))  # the newest crawl is not in this mirror
    with pytest.raises(StageError, match="CC-MAIN-2099-01/warc.paths.gz"):
        fetch_all(str(mirror), tmp_path, "custom", crawl="latest", collinfo_url=str(custom))


def test_pick_is_deterministic_and_nested():
    paths = [f"crawl-data/{CRAWL}/segments/s/warc/{i:03d}.warc.gz" for i in range(50)]
    a = download.pick(paths, 5, seed=1)
    assert a == download.pick(list(reversed(paths)), 5, seed=1) == sorted(a)
    assert len(set(a)) == 5
    assert len({tuple(download.pick(paths, 5, seed=s)) for s in range(5)}) > 1
    assert set(a) <= set(download.pick(paths, 20, seed=1))  # growing a sample keeps what it had
    assert download.pick(paths, 0, seed=1) == paths and download.pick(paths, 99, seed=1) == paths


def test_fraction_and_split():
    assert download.how_many(download.Config(fraction=0.1), 50) == 5
    assert download.how_many(download.Config(fraction=0.001), 50) == 1  # at least one file
    assert download.how_many(download.Config(), 50) == 1 and download.how_many(download.Config(num_files=0), 50) == 0
    with pytest.raises(ValueError, match="exclusive"):
        download.Config(num_files=2, fraction=0.5)
    with pytest.raises(ValueError, match="num_files must be 0"):
        download.Config(num_files=-1)
    shares = download.split([f"f{i}" for i in range(7)], 3)
    assert shares == [["f0", "f3", "f6"], ["f1", "f4"], ["f2", "f5"]]
    assert download.split(["f0"], 4) == [["f0"]]


def test_same_seed_same_files(mirror, tmp_path):
    def chosen(name, **kw):
        download.run(download.Config(source=str(mirror), **kw), out=out_dir(tmp_path, name))
        return [f["path"] for f in json.loads((tmp_path / name / "files.json").read_text())]

    first = chosen("a", num_files=2, seed=3)
    assert len(first) == 2 and chosen("b", num_files=2, seed=3) == first
    assert chosen("c", fraction=0.4, seed=3) == first  # 40% of 5 files is 2: the same two


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_s3fs_names_the_fix(tmp_path):
    with pytest.raises(StageError, match="pip install s3fs"):
        fetch_all("s3://commoncrawl", tmp_path)


def test_progress_is_logged(mirror, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="crawl2chat"):
        fetch_all(str(mirror), tmp_path)
    lines = [r.getMessage() for r in caplog.records if "files," in r.getMessage()]
    per_file = [line for line in lines if "; fetched crawl-data/" in line]  # plus one every few seconds, if slow
    assert len(per_file) == 5 and per_file[-1].startswith("download: 5/5 files")
    assert all("MB/s" in line and "ETA" in line for line in lines)


def test_untrusted_listing_lines_are_rejected(mirror, tmp_path):
    evil = ["../../etc/passwd", "http://evil/x.warc.gz", "/etc/shadow.warc.gz",
            f"crawl-data/{CRAWL}/segments/x/warc/../../../../etc/passwd.warc.gz", "crawl-data/notes.txt"]
    write_listing(mirror, evil + listed(mirror))
    stats, out = fetch_all(str(mirror), tmp_path)
    assert stats["listed"] == 5 and stats["files_ok"] == 5
    assert sum(stats["rejected_lines"].values()) == 5
    assert stats["rejected_lines"]["absolute path or URL"] == 2
    assert stats["rejected_lines"]["'..' in path"] == 2
    assert not (tmp_path / "etc").exists() and not (out.path / "etc").exists()

    write_listing(mirror, evil)
    with pytest.raises(StageError, match="no valid WARC path"):
        fetch_all(str(mirror), tmp_path, "none")


def test_corrupt_files_are_named_and_dropped(mirror, tmp_path):
    (mirror / GARBAGE).parent.mkdir(parents=True)
    (mirror / GARBAGE).write_bytes(b"this is not a WARC file\n" * 100)
    whole = (mirror / ZYTE).read_bytes()
    (mirror / TRUNCATED).write_bytes(whole[: len(whole) // 3])  # a download cut short
    good = listed(mirror)
    write_listing(mirror, good + [GARBAGE, TRUNCATED])
    stats, out = fetch_all(str(mirror), tmp_path)
    bad = {b["path"]: b["reason"] for b in stats["bad_files"]}
    assert set(bad) == {GARBAGE, TRUNCATED}
    assert "gzip" in bad[GARBAGE] and "truncated" in bad[TRUNCATED]
    assert stats["files_ok"] == 5
    check_output(stats, out, good, source=mirror)
    assert not (out.path / "warc" / GARBAGE).exists() and not (out.path / "warc" / TRUNCATED).exists()

    with CCServer(mirror) as server:  # over HTTP: asked for the rest (416), then known to be cut at the source
        stats, _ = fetch_all(server.url, tmp_path, "http")
    assert {b["path"] for b in stats["bad_files"]} == {GARBAGE, TRUNCATED}
    assert [rng for _, rng, _ in server.requests_for(TRUNCATED)] == [None, f"bytes={len(whole) // 3}-"]
    assert len(server.requests_for(GARBAGE)) == 2  # not gzip, twice: the source is bad


def test_resume_fetches_nothing_twice(mirror, tmp_path):
    first, out = fetch_all(str(mirror), tmp_path)
    (out.path / "warc" / SMALL).unlink()  # as if the run had crashed before this file
    (out.path / "warc" / (ZYTE + ".part")).write_bytes(b"half")  # and left a partial file behind
    second, _ = fetch_all(str(mirror), tmp_path)
    assert second["files_fetched"] == 1 and second["files_already_present"] == 4
    check_output(second, out, listed(mirror), source=mirror)
    third, _ = fetch_all(str(mirror), tmp_path)
    assert third["files_fetched"] == 0 and third["files_already_present"] == 5
    assert third["bytes"] == first["bytes"] and third["digests_verified"] == first["digests_verified"]
    assert third["bytes_transferred"] == 0


def test_builds_through_the_store(mirror, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    cfg = download.Config(source=str(mirror), num_files=1)
    result = build(download, cfg, [], store)
    assert not result.reused and result.stats["files_ok"] == 1
    assert (result.artifact.path / "files.json").exists()
    assert build(download, cfg, [], store).reused


def test_config_validation():
    with pytest.raises(ValueError, match="crawl"):
        download.Config(crawl="2024-22")
    with pytest.raises(ValueError, match="retries"):
        download.Config(retries=-1)
    with pytest.raises(ValueError, match="fraction"):
        download.Config(fraction=1.5)
    with pytest.raises(ValueError, match="sample_mb"):
        download.Config(sample_mb=-1)
    with pytest.raises(StageError, match="warc.paths.gz"):
        download.run(download.Config(source="/nonexistent/mirror"), out=Artifact("download", "x", Path("/tmp")))


def test_named_files_must_be_in_the_listing(mirror, tmp_path):
    listed = download.read_listing(download.Config(source=str(mirror), crawl=CRAWL), CRAWL)[0]
    out = Artifact(download.NAME, "named", tmp_path / "named")
    out.path.mkdir()
    stats = download.run(download.Config(source=str(mirror), crawl=CRAWL, files=(listed[-1],)), out=out)
    fetched = [p.name for p in (out.path / "warc").rglob("*.warc.gz")]
    assert stats["files_ok"] == 1 and fetched == [Path(listed[-1]).name]
    with pytest.raises(StageError, match="not in the .* listing"):
        download.run(download.Config(source=str(mirror), crawl=CRAWL, files=(listed[0].replace(".warc", "-x.warc"),)),
                     out=Artifact(download.NAME, "bad", tmp_path / "bad"))
    with pytest.raises(ValueError, match="leave num_files and fraction unset"):
        download.Config(files=(listed[0],), num_files=2)
