"""Download a deterministic sample of WARC files from Common Crawl (or a mirror in its layout), verified as it streams.

    python -m stages.download --root artifacts --set source=data/tiny-cc --set num_files=0   # bundled sample, CPU, seconds
    python -m stages.download --root artifacts --set num_files=8                             # live Common Crawl
    python -m stages.download --root artifacts --set crawl=latest --set fraction=0.001 --set sample_mb=5

Sources, one code path: https:// (default data.commoncrawl.org; requests, so status codes, Range and timeouts are
explicit), s3://commoncrawl (fsspec, anonymous; needs `pip install s3fs`), a local folder or file:// (fsspec).

1. Crawl: `crawl` names one (CC-MAIN-2024-22) or is "latest", resolved at run time from collinfo.json (newest
   first) and recorded in stats["crawl"]. The artifact version hashes the config, so "latest" keeps its version
   when a new crawl appears: a re-run reuses the old artifact (its stats say which crawl it holds). Name the crawl
   for reproducible runs; change any field (or name the new crawl) to get a new one.
2. Selection: `{source}/crawl-data/{crawl}/warc.paths.gz` lists the WARCs; lines not shaped like a Common Crawl
   WARC path are rejected (counted in stats). The listing is shuffled with `seed` and the first `num_files` (or
   `fraction` of the listing) are kept, so a bigger sample contains a smaller one with the same seed. The kept
   files are split round-robin over `workers` threads.
3. Each file streams into `warc/<listing path>.part`. Every byte is inflated once: gzip members (one WARC
   record each in Common Crawl) are cut at their boundaries and warcio reads the decompressed records, whose
   WARC-Block-Digest (sha1, base32) is checked. A dropped connection, a timeout, HTTP 5xx/429 or an error page
   (XML/HTML, even with status 200) is retried with exponential backoff and jitter, resuming the .part with a
   Range request. A file that fails verification (bad digest, cut gzip member, not gzip) is fetched again from
   scratch; when it fails the same way twice (or comes from a folder, or the server confirms it ends there), the
   source itself is bad: the file is dropped and named in stats["bad_files"] with its bad records; the run goes on.
   A 404 is a bad file at once. A file that still fails with a transient error after `retries` fails the stage
   (the artifact is never committed without it): re-run to resume; finished files are re-verified from disk, not
   fetched again.
4. `sample_mb` > 0 fetches only the first sample_mb MB of each WARC (one Range request) and keeps the whole gzip
   members in it: real records at a small cost, for small runs.

`files.json` lists every kept file with its sha256, record and digest counts. Progress (files, MB, MB/s, ETA) is
logged at INFO on the "crawl2chat" logger every few seconds and per file.

This file holds the choices (crawl, listing, selection) and the stage's result; the fetching machinery (readers,
Range resume, retries, the digest-checking WARC reader) is in stages/cc_fetch.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stages.artifacts import Artifact
from stages.cc_fetch import CorruptError, MissingError, Progress, TransientError, fetch, read_small
from stages.common import StageError, main, runtime

NAME = "download"
CODE_VERSION = 2  # 2: shuffled (nested) selection, digest-verified records, counts in files.json
log = logging.getLogger("crawl2chat")

# crawl-data/CC-MAIN-2024-22/segments/1715971057216.39/warc/CC-MAIN-...-00000.warc.gz; each part is a plain name
LISTING_LINE = re.compile(r"crawl-data/CC-MAIN-[\w-]+/segments/[\w.-]+/warc/[\w.-]+\.warc\.gz")
OFFICIAL = ("https://data.commoncrawl.org", "s3://commoncrawl")  # where collinfo.json lives elsewhere:
COLLINFO = "https://index.commoncrawl.org/collinfo.json"  # [{"id": "CC-MAIN-2024-22", ...}, ...], newest first


@dataclass(frozen=True)
class Config:
    # https:// (default), s3://commoncrawl (pip install s3fs), a local folder or file:// in Common Crawl layout
    source: str = "https://data.commoncrawl.org"
    crawl: str = "CC-MAIN-2024-22"  # the crawl of May 2024, or "latest" (resolved at run time; see the module doc)
    # where "latest" is looked up; "" = index.commoncrawl.org for the official sources, else {source}/collinfo.json
    collinfo_url: str = ""
    # WARC files (~1.2 GB, ~30k pages each on the live crawl); None = 1 unless fraction is set; 0 or negative = all
    num_files: int | None = None
    fraction: float = 0.0  # instead of num_files: this share of the listing (at least 1 file); 0 = unused
    seed: int = 0  # which files: same seed, same files
    # Exactly these listing paths instead of a selection (each must be in the crawl's listing): how a data refresh
    # (flows/data_refresh.py) asks for the files no dataset version holds yet.
    files: tuple[str, ...] = ()
    sample_mb: float = 0.0  # > 0: only the whole gzip members in the first sample_mb MB (1e6 bytes) of each WARC
    retries: int = 5  # attempts per file after a failure; an attempt that got new bytes does not count
    backoff_s: float = 2.0  # before retry k, wait a random time in [0, backoff_s * 2**k] (capped at 60 s)
    timeout_s: float = 60.0  # seconds to connect, and the longest wait for the next bytes of a response
    # files fetched at once (threads): the concurrency limit. data.commoncrawl.org (S3 behind CloudFront) answers
    # 503 SlowDown when a client asks too fast; a few connections, with backoff, is the polite maximum.
    workers: int = runtime(4)

    def __post_init__(self):
        if not self.source:
            raise ValueError("source is empty; give a folder, file://, s3:// or http(s):// URL in Common Crawl layout")
        if self.crawl != "latest" and not re.fullmatch(r"CC-MAIN-[\w-]+", self.crawl):
            raise ValueError(f"crawl '{self.crawl}' is not a Common Crawl name such as CC-MAIN-2024-22 (or 'latest')")
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.num_files is not None and self.num_files < 0:
            raise ValueError(f"num_files must be 0 (every file of the source) or more, got {self.num_files}")
        if self.fraction and self.num_files is not None:
            raise ValueError("num_files and fraction are exclusive: set num_files=none to use fraction")
        if self.files and (self.num_files is not None or self.fraction):
            raise ValueError("files names the WARC files itself: leave num_files and fraction unset")
        if self.sample_mb < 0:
            raise ValueError(f"sample_mb must be 0 (whole files) or more, got {self.sample_mb}")
        if self.retries < 0:
            raise ValueError(f"retries must be 0 or more, got {self.retries}")
        if self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("backoff_s must be >= 0 and timeout_s > 0 seconds")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


# ---- crawl and listing --------------------------------------------------------------------------------------------
def resolve_crawl(cfg: Config) -> str:
    """`cfg.crawl`, or for "latest" the newest id in collinfo.json."""
    if cfg.crawl != "latest":
        return cfg.crawl
    source = cfg.source.rstrip("/")
    url = cfg.collinfo_url or (COLLINFO if source in OFFICIAL else f"{source}/collinfo.json")
    try:
        crawls = read_small(url, cfg, json.loads)
        newest = crawls[0]["id"]
    except (TransientError, MissingError, CorruptError, KeyError, IndexError, TypeError) as e:
        raise StageError(f"cannot resolve crawl=latest from {url} ({type(e).__name__}: {e}); set collinfo_url to a "
                         f"JSON list of {{\"id\": \"CC-MAIN-...\"}}, newest first, or name the crawl") from e
    if not isinstance(newest, str) or not re.fullmatch(r"CC-MAIN-[\w-]+", newest):
        raise StageError(f"{url} names '{newest}' as the newest crawl, not a CC-MAIN-* id; name the crawl instead")
    return newest


def read_listing(cfg: Config, crawl: str | None = None) -> tuple[list[str], dict[str, int]]:
    """Valid WARC paths of the listing (sorted, unique) and how many lines were rejected, by reason."""
    url = f"{cfg.source.rstrip('/')}/crawl-data/{crawl or resolve_crawl(cfg)}/warc.paths.gz"
    try:
        text = read_small(url, cfg, lambda raw: gzip.decompress(raw).decode("utf-8"))
    except (TransientError, MissingError, CorruptError) as e:
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
    """`num_files` paths chosen by `seed` (all when <= 0), sorted. The first n of one seeded shuffle, so the files
    chosen for n are among those chosen for any larger n."""
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    return sorted(order if num_files <= 0 else order[:num_files])


def how_many(cfg: Config, listed: int) -> int:
    if cfg.fraction:
        return max(1, round(cfg.fraction * listed))
    return 1 if cfg.num_files is None else cfg.num_files


def split(paths: list[str], workers: int) -> list[list[str]]:
    """Round-robin shares of `paths`, one per worker (Common Crawl's files are all about the same size)."""
    return [paths[i::workers] for i in range(min(workers, len(paths)))]


def run(cfg: Config, *inputs: Artifact, out: Artifact) -> dict:
    if inputs:
        raise StageError(f"download takes no input artifacts, got {[a.ref for a in inputs]}")
    crawl = resolve_crawl(cfg)
    paths, rejected = read_listing(cfg, crawl)
    if cfg.files:
        missing = sorted(set(cfg.files) - set(paths))
        if missing:
            raise StageError(f"{len(missing)} of the requested files are not in the {crawl} listing at {cfg.source}, "
                             f"e.g. {missing[0]}: name files from `warc.paths.gz`, or leave `files` empty to select")
        chosen = sorted(cfg.files)
    else:
        chosen = pick(paths, how_many(cfg, len(paths)), cfg.seed)
    log.info("download: %d of %d listed WARC files of %s from %s (%d lines rejected)%s", len(chosen), len(paths),
             crawl, cfg.source, sum(rejected.values()), f", first {cfg.sample_mb} MB of each" if cfg.sample_mb else "")
    warc_dir = out.path / "warc"
    progress = Progress(len(chosen))
    with ThreadPoolExecutor(cfg.workers) as pool:
        shares = pool.map(lambda share: [fetch(rel, cfg, warc_dir, progress) for rel in share],
                          split(chosen, cfg.workers))
        results = sorted((r for share in shares for r in share), key=lambda r: r["path"])
    failed = [r for r in results if "transient" in r]
    if failed:
        raise StageError(f"{len(failed)} file(s) still failed after {cfg.retries} retries, e.g. "
                         f"{failed[0]['transient']}; re-run the stage: finished files are kept and skipped")
    for stale in warc_dir.rglob("*.part"):  # partial files of bad files
        stale.unlink()
    good = [r for r in results if "bad" not in r]
    bad = [{"path": r["path"], "reason": r["bad"], "bad_records": r["bad_records"]} for r in results if "bad" in r]
    if not good:
        raise StageError(f"none of the {len(chosen)} chosen WARC files is readable ({bad[0]['reason']}, ...); "
                         f"check that `source` serves Common Crawl WARCs")
    keys = ("path", "url", "size", "sha256", "records", "digests_verified")
    (out.path / "files.json").write_text(json.dumps([{k: r[k] for k in keys} for r in good], indent=2))
    seconds = time.monotonic() - progress.t0
    return {
        "crawl": crawl,
        "listed": len(paths),
        "rejected_lines": rejected,
        "files_requested": len(chosen),
        "files_fetched": sum(r["fetched"] for r in good),
        "files_already_present": sum(not r["fetched"] for r in good),
        "files_ok": len(good),
        "bad_files": bad,
        "bytes": sum(r["size"] for r in good),
        "sample_mb": cfg.sample_mb,
        "records": sum(r["records"] for r in good),
        "digests_verified": sum(r["digests_verified"] for r in good),  # the rest carry no WARC-Block-Digest
        "retries": sum(r["retries"] for r in good),
        "files_resumed": sum(r["resumed_from"] > 0 for r in good),  # continued from a .part with a Range request
        "bytes_transferred": progress.bytes,  # network bytes, retries included
        "seconds": round(seconds, 3),
        "mb_per_s": round(progress.bytes / 1e6 / max(seconds, 1e-9), 2),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])
