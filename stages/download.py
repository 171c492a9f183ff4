"""Download a deterministic sample of WARC files from Common Crawl (or any mirror in its layout).

    python -m stages.download --root artifacts --set source=data/tiny-cc --set num_files=0   # bundled sample, CPU, seconds
    python -m stages.download --root artifacts --set num_files=8                             # live Common Crawl

Reads `{source}/crawl-data/{crawl}/warc.paths.gz`, keeps the lines shaped like a Common Crawl WARC path, picks
`num_files` of them with `seed`, and fetches each into `warc/<listing path>` (written to `.part`, renamed when
complete and checked). A file that is not a readable WARC (no gzip magic, warcio cannot iterate it, or the
source says 404) is deleted and named in `stats["bad_files"]`; the run goes on. A file that still fails with a
transient error after `retries` fails the stage (so the artifact is never committed without it); re-run to resume. `files.json` lists every kept file with its sha256.
A re-run into the same directory skips files already present: only complete, checked files carry the final name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

import fsspec
import requests

from stages.artifacts import Artifact, sha256_file
from stages.common import StageError, main

NAME = "download"
CODE_VERSION = 1
log = logging.getLogger("crawl2chat")

# crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc/CC-MAIN-...-00000.warc.gz; each part is a plain name
LISTING_LINE = re.compile(r"crawl-data/CC-MAIN-[\w-]+/segments/[\w.-]+/warc/[\w.-]+\.warc\.gz")
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20  # 1 MiB read/hash/write unit


@dataclass(frozen=True)
class Config:
    # a local folder, file:// URL or http(s):// URL laid out like Common Crawl (crawl-data/<crawl>/warc.paths.gz)
    source: str = "https://data.commoncrawl.org"
    crawl: str = "CC-MAIN-2024-22"  # the crawl of May 2024; https://commoncrawl.org/latest-crawl
    num_files: int = 1  # WARC files to fetch (~1.2 GB, ~30k pages each on the live crawl); 0 or negative = all
    seed: int = 0  # which num_files of the listing: same seed, same files
    retries: int = 5  # extra attempts per file after a transient error (HTTP 5xx/429, connection, timeout)
    backoff_s: float = 2.0  # wait before retry k is backoff_s * 2**k seconds: 2, 4, 8, 16, 32 (~1 min in all)
    timeout_s: float = 60.0  # seconds to connect, and the longest wait for the next bytes of a response
    workers: int = 4  # files fetched at once; data.commoncrawl.org asks for few parallel requests per client

    def __post_init__(self):
        if not self.source:
            raise ValueError("source is empty; give a folder, file:// or http(s):// URL in Common Crawl layout")
        if not re.fullmatch(r"CC-MAIN-[\w-]+", self.crawl):
            raise ValueError(f"crawl '{self.crawl}' is not a Common Crawl name such as CC-MAIN-2024-22")
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")
        if self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("backoff_s must be >= 0 and timeout_s > 0 seconds")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


# ---- I/O: one opener for every source, retries only for what is transient --------------------------------------
class TransientError(Exception):
    """An I/O failure worth retrying: HTTP 5xx/429, a dropped connection, a timeout."""


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _chunks(url: str, timeout_s: float) -> Iterator[bytes]:
    """The bytes at `url` in chunks; requests for HTTP (clear status codes and timeouts), fsspec for the rest."""
    if not _is_http(url):
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        return
    try:
        with requests.get(url, stream=True, timeout=timeout_s) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise TransientError(f"HTTP {r.status_code} from {url}")
            r.raise_for_status()  # 4xx: retrying will not help
            yield from r.iter_content(CHUNK)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
        raise TransientError(f"{type(e).__name__} for {url}: {e}") from e


def with_retries(fn: Callable[[], object], what: str, cfg: Config):
    for attempt in range(cfg.retries + 1):
        try:
            return fn()
        except TransientError as e:
            if attempt == cfg.retries:
                raise
            wait = cfg.backoff_s * 2**attempt
            log.warning("%s: %s; retry %d/%d in %.1f s", what, e, attempt + 1, cfg.retries, wait)
            time.sleep(wait)


# ---- the listing ----------------------------------------------------------------------------------------------
def read_listing(cfg: Config) -> tuple[list[str], dict[str, int]]:
    """Valid WARC paths of the listing (sorted, unique) and how many lines were rejected, by reason."""
    url = f"{cfg.source.rstrip('/')}/crawl-data/{cfg.crawl}/warc.paths.gz"
    try:
        raw = with_retries(lambda: b"".join(_chunks(url, cfg.timeout_s)), "listing", cfg)
        text = gzip.decompress(raw).decode("utf-8")
    except (OSError, TransientError, requests.RequestException, UnicodeDecodeError) as e:
        raise StageError(f"cannot read the WARC listing {url} ({e}); check `source` and `crawl` "
                         f"(expected {{source}}/crawl-data/{{crawl}}/warc.paths.gz)") from e
    valid, rejected = set(), {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if "://" in line or line.startswith("/"):
            reason = "absolute path or URL"
        elif ".." in line.split("/"):
            reason = "'..' in path"
        elif not LISTING_LINE.fullmatch(line):
            reason = "not shaped crawl-data/CC-MAIN-*/segments/*/warc/*.warc.gz"
        else:
            valid.add(line)
            continue
        rejected[reason] = rejected.get(reason, 0) + 1
    if not valid:
        raise StageError(f"{url} has no valid WARC path (rejected: {rejected}); point `source` at a "
                         f"Common Crawl mirror whose listing holds crawl-data/CC-MAIN-*/segments/*/warc/*.warc.gz")
    return sorted(valid), rejected


def pick(paths: list[str], num_files: int, seed: int) -> list[str]:
    if num_files <= 0 or num_files >= len(paths):
        return list(paths)
    return sorted(random.Random(seed).sample(sorted(paths), num_files))


# ---- one file -------------------------------------------------------------------------------------------------
def check_warc(path: Path) -> str | None:
    """Why `path` is not a readable gzipped WARC, or None when it is.

    Two passes because each misses what the other sees: warcio stops quietly at a truncated gzip member, and
    gzip accepts any compressed bytes, which warcio then reads as a legacy ARC record.
    """
    from warcio.archiveiterator import ArchiveIterator

    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return "not gzip (no 1f 8b magic bytes)"
    try:
        with gzip.open(path, "rb") as g:
            while g.read(CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as e:
        return f"broken gzip (truncated download?): {type(e).__name__}: {e}"[:300]
    records = 0
    with open(path, "rb") as f:
        try:
            for record in ArchiveIterator(f):
                if record.format != "warc":
                    return f"record {records} is not a WARC record (warcio sees format '{record.format}')"
                records += 1
        except Exception as e:  # warcio raises many types (ArchiveLoadFailed, ValueError, ...)
            return f"warcio cannot read it: {type(e).__name__}: {e}"[:300]
    return None if records else "no WARC records"


def fetch(rel: str, cfg: Config, warc_dir: Path) -> dict:
    """Fetch one listing path; {'path', 'url', 'size', 'sha256', 'fetched'} or {'path', 'bad': reason}."""
    url = f"{cfg.source.rstrip('/')}/{rel}"
    dest = warc_dir / rel
    if dest.exists():  # only complete, checked files ever get the final name
        return {"path": rel, "url": url, "size": dest.stat().st_size, "sha256": sha256_file(dest), "fetched": False}
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    def attempt() -> str:
        h = hashlib.sha256()
        with open(part, "wb") as f:
            for chunk in _chunks(url, cfg.timeout_s):
                f.write(chunk)
                h.update(chunk)
        return h.hexdigest()

    try:
        digest = with_retries(attempt, rel, cfg)
    except TransientError as e:  # still failing after the retries: fatal in run(), so a re-run can resume
        part.unlink(missing_ok=True)
        return {"path": rel, "transient": str(e)}
    except (OSError, requests.RequestException) as e:  # a 404 or a missing local file: the listing is wrong
        reason = f"fetch failed: {type(e).__name__}: {e}"[:300]
    else:
        reason = check_warc(part)
    if reason:
        part.unlink(missing_ok=True)  # a bad file is not kept: stats name it, extract never sees it
        log.warning("bad WARC %s: %s", rel, reason)
        return {"path": rel, "bad": reason}
    size = part.stat().st_size
    os.replace(part, dest)
    log.info("fetched %s (%.1f MB)", rel, size / 1e6)
    return {"path": rel, "url": url, "size": size, "sha256": digest, "fetched": True}


def run(cfg: Config, *inputs: Artifact, out: Artifact) -> dict:
    if inputs:
        raise StageError(f"download takes no input artifacts, got {[a.ref for a in inputs]}")
    paths, rejected = read_listing(cfg)
    chosen = pick(paths, cfg.num_files, cfg.seed)
    log.info("download: %d of %d listed WARC files from %s (%d lines rejected)",
             len(chosen), len(paths), cfg.source, sum(rejected.values()))
    warc_dir = out.path / "warc"
    with ThreadPoolExecutor(cfg.workers) as pool:
        results = list(pool.map(lambda rel: fetch(rel, cfg, warc_dir), chosen))
    failed = [r for r in results if "transient" in r]
    if failed:
        raise StageError(f"{len(failed)} file(s) still failed after {cfg.retries} retries, e.g. "
                         f"{failed[0]['transient']}; re-run the stage: finished files are kept and skipped")
    for stale in warc_dir.rglob("*.part"):  # left by a crashed run whose file is now complete or dropped
        stale.unlink()
    good = [r for r in results if "bad" not in r]
    bad = [{"path": r["path"], "reason": r["bad"]} for r in results if "bad" in r]
    if not good:
        raise StageError(f"none of the {len(chosen)} chosen WARC files is readable ({bad[0]['reason']}, ...); "
                         f"check that `source` serves Common Crawl WARCs")
    files = [{k: r[k] for k in ("path", "url", "size", "sha256")} for r in good]
    (out.path / "files.json").write_text(json.dumps(files, indent=2))
    return {
        "listed": len(paths),
        "rejected_lines": rejected,
        "files_requested": len(chosen),
        "files_fetched": sum(r["fetched"] for r in good),
        "files_already_present": sum(not r["fetched"] for r in good),
        "files_ok": len(good),
        "bad_files": bad,
        "bytes": sum(r["size"] for r in good),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])
