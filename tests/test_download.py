"""stages.download against the bundled Common Crawl sample: local folder, file:// and a 127.0.0.1 HTTP mirror."""

from __future__ import annotations

import gzip
import http.server
import json
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest

from stages import download
from stages.artifacts import Artifact, ArtifactStore, sha256_file
from stages.common import StageError, build

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny-cc"
CRAWL = "CC-MAIN-2024-22"
LISTING = f"crawl-data/{CRAWL}/warc.paths.gz"
SMALL = f"crawl-data/{CRAWL}/segments/1715971057216.39/warc/CC-MAIN-20240517233122-20240518023122-00000.warc.gz"
ZYTE = f"crawl-data/{CRAWL}/segments/tiny-samples/warc/zyte-aeb-part1.warc.gz"
GARBAGE = f"crawl-data/{CRAWL}/segments/bad/warc/garbage.warc.gz"
TRUNCATED = f"crawl-data/{CRAWL}/segments/bad/warc/truncated.warc.gz"


def listed(root: Path) -> list[str]:
    return gzip.decompress((root / LISTING).read_bytes()).decode().split()


def write_listing(root: Path, lines: list[str]) -> None:
    (root / LISTING).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


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
    cfg = download.Config(source=source, num_files=0, backoff_s=0.01, timeout_s=5, **kw)
    return download.run(cfg, out=out), out


def check_output(stats: dict, out: Artifact, expected: list[str]) -> None:
    files = json.loads((out.path / "files.json").read_text())
    assert [f["path"] for f in files] == sorted(expected)
    for f in files:
        local = out.path / "warc" / f["path"]
        assert local.stat().st_size == f["size"]
        assert f["sha256"] == sha256_file(local)
        assert f["url"].endswith(f["path"])
    assert stats["bytes"] == sum(f["size"] for f in files)
    assert not list(out.path.rglob("*.part"))


def test_local_folder_and_file_url(mirror, tmp_path):
    expected = listed(mirror)
    stats, out = fetch_all(str(mirror), tmp_path, "plain")
    assert stats["files_requested"] == stats["files_fetched"] == stats["files_ok"] == 5
    assert stats["bad_files"] == [] and stats["rejected_lines"] == {}
    check_output(stats, out, expected)
    for p in expected:  # byte-identical copies
        assert (out.path / "warc" / p).read_bytes() == (mirror / p).read_bytes()

    stats2, out2 = fetch_all(mirror.as_uri(), tmp_path, "uri")
    check_output(stats2, out2, expected)
    assert json.loads((out.path / "files.json").read_text())[0]["sha256"] == \
        json.loads((out2.path / "files.json").read_text())[0]["sha256"]


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; answers 503 to the first request of each path listed in `fail_once`."""

    fail_once: set[str] = set()
    always_fail: set[str] = set()
    seen: list[str] = []

    def do_GET(self):
        path = self.path.lstrip("/")
        self.seen.append(path)
        if path in self.always_fail or path in self.fail_once:
            self.fail_once.discard(path)
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(mirror):
    FlakyHandler.fail_once, FlakyHandler.always_fail, FlakyHandler.seen = set(), set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(FlakyHandler, directory=str(mirror)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FlakyHandler
    server.shutdown()
    server.server_close()


def test_http_with_a_transient_503_retries(http_mirror, mirror, tmp_path):
    url, handler = http_mirror
    handler.fail_once = {SMALL, LISTING}
    stats, out = fetch_all(url, tmp_path)
    assert stats["files_fetched"] == 5 and stats["bad_files"] == []
    check_output(stats, out, listed(mirror))
    assert handler.seen.count(SMALL) == 2 and handler.seen.count(LISTING) == 2  # one 503, then the retry


def test_http_errors_that_do_not_go_away_fail_the_stage(http_mirror, tmp_path):
    url, handler = http_mirror
    handler.always_fail = {SMALL}
    with pytest.raises(StageError, match="re-run"):
        fetch_all(url, tmp_path, retries=2)
    assert handler.seen.count(SMALL) == 3  # the first try and 2 retries
    assert not (tmp_path / "out" / "files.json").exists()


def test_missing_file_is_a_bad_file_not_a_retry(http_mirror, mirror, tmp_path):
    url, handler = http_mirror
    gone = f"crawl-data/{CRAWL}/segments/gone/warc/missing.warc.gz"
    write_listing(mirror, listed(mirror) + [gone])
    stats, out = fetch_all(url, tmp_path)
    assert [b["path"] for b in stats["bad_files"]] == [gone]
    assert "404" in stats["bad_files"][0]["reason"]
    assert handler.seen.count(gone) == 1
    assert stats["files_ok"] == 5


def test_pick_is_deterministic():
    paths = [f"crawl-data/{CRAWL}/segments/s/warc/{i:03d}.warc.gz" for i in range(50)]
    a = download.pick(paths, 5, seed=1)
    assert a == download.pick(list(reversed(paths)), 5, seed=1) == sorted(a)
    assert len(set(a)) == 5
    assert len({tuple(download.pick(paths, 5, seed=s)) for s in range(5)}) > 1
    assert download.pick(paths, 0, seed=1) == paths and download.pick(paths, 99, seed=1) == paths


def test_same_seed_same_files(mirror, tmp_path):
    def chosen(name, seed):
        download.run(download.Config(source=str(mirror), num_files=2, seed=seed), out=out_dir(tmp_path, name))
        return [f["path"] for f in json.loads((tmp_path / name / "files.json").read_text())]

    first = chosen("a", 3)
    assert len(first) == 2 and chosen("b", 3) == first


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
    check_output(stats, out, good)
    assert not (out.path / "warc" / GARBAGE).exists() and not (out.path / "warc" / TRUNCATED).exists()


def test_resume_fetches_nothing_twice(mirror, tmp_path):
    first, out = fetch_all(str(mirror), tmp_path)
    (out.path / "warc" / SMALL).unlink()  # as if the run had crashed before this file
    (out.path / "warc" / (ZYTE + ".part")).write_bytes(b"half")  # and left a partial file behind
    second, _ = fetch_all(str(mirror), tmp_path)
    assert second["files_fetched"] == 1 and second["files_already_present"] == 4
    check_output(second, out, listed(mirror))
    third, _ = fetch_all(str(mirror), tmp_path)
    assert third["files_fetched"] == 0 and third["files_already_present"] == 5
    assert third["bytes"] == first["bytes"]


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
    with pytest.raises(StageError, match="warc.paths.gz"):
        download.run(download.Config(source="/nonexistent/mirror"), out=Artifact("download", "x", Path("/tmp")))
