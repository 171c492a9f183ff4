"""The fetching machinery of stages.download: bytes of a URL (https through requests; s3://, file:// and folders
through fsspec), one file's transfer with Range resume, retries with backoff and jitter, and the WARC reader that
checks every record's WARC-Block-Digest while the bytes stream in.

Three kinds of failure, each with its own remedy: TransientError (retry, resuming the .part), CorruptError (fetch
again from scratch, or report the file as bad), MissingError (report the file as bad at once). `fetch` turns them into
one result per file; stages.download.run decides what a failed file means for the stage.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import io
import itertools
import logging
import random
import re
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import fsspec
import requests
import urllib3

try:  # ISA-L inflates about twice as fast as zlib (68 vs 35 MB/s of .warc.gz measured here), with zlib's API
    from isal import isal_zlib as inflate
except ImportError:  # optional: `pip install isal`; zlib gives the same bytes, slower
    inflate = zlib

from stages.artifacts import sha256_file
from stages.common import StageError, progress

if TYPE_CHECKING:  # the stage's Config: retries, backoff_s, timeout_s, sample_mb, source
    from stages.download import Config

log = logging.getLogger("crawl2chat")

GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 20  # 1 MiB read/hash/write unit
# Compressed bytes per call to the decompressor (see WarcStream._feed). Measured here on the 4.3 MB zyte WARC: ISA-L
# alone inflates 200 MB/s of .warc.gz in 64 KiB slices against 137 MB/s in whole 1 MiB chunks; the whole check
# (inflate, sha1 of every block, sha256 of the file, warcio) takes 46 ms against 50 ms; 16 and 256 KiB are slower.
INFLATE_SLICE = 64 << 10
BACKOFF_CAP_S = 60.0  # no single wait longer than a minute, however many retries
PROGRESS_EVERY_S = 5.0  # seconds between progress lines (plus one line per finished file)

# ---- errors: each kind has its own remedy ---------------------------------------------------------------------------
class TransientError(Exception):
    """Worth retrying, resuming the .part: HTTP 5xx/429, an error page, a dropped connection, a timeout, a short read."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds, when the server said so (Retry-After)


class CorruptError(Exception):
    """The bytes are wrong (bad digest, cut gzip member, not a WARC): fetch the file again from scratch."""

    def __init__(self, message: str, bad_records: list[dict] | None = None, at_source: bool = False):
        super().__init__(message)
        self.bad_records = bad_records or []
        self.at_source = at_source  # known to be the source's own damage: fetching again will not help


class MissingError(Exception):
    """The source has no such file (HTTP 4xx, not found): retrying will not help."""


def backoff(attempt: int, cfg: Config, retry_after: float | None = None) -> float:
    """Seconds to wait before retry `attempt` (0-based): "full jitter", so that workers hit by the same outage do
    not retry in lockstep (https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/)."""
    wait = random.uniform(0, min(BACKOFF_CAP_S, cfg.backoff_s * 2**attempt))
    return max(wait, min(retry_after or 0.0, BACKOFF_CAP_S))


# ---- sources: bytes [start, end) of a URL -------------------------------------------------------------------------
@dataclass
class Body:
    chunks: Iterator[bytes]
    offset: int  # where these bytes start in the file: 0 when a server ignored our Range


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


_sessions = threading.local()  # one requests.Session (keep-alive connections) per thread: Session is not thread-safe


@contextlib.contextmanager
def open_bytes(url: str, start: int, end: int | None, cfg: Config) -> Iterator[Body]:
    """The bytes of `url` from `start` up to `end` (None: to the end of the file), in chunks."""
    if not _is_http(url):
        yield from _fsspec_bytes(url, start, end)
        return
    session = getattr(_sessions, "session", None) or requests.Session()
    _sessions.session = session
    headers = {"Accept-Encoding": "identity"}  # the stored .gz bytes; no transparent decoding by requests
    if start or end is not None:
        headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
    try:
        r = session.get(url, headers=headers, stream=True, timeout=cfg.timeout_s)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise TransientError(f"{type(e).__name__}: {e}") from e
    with r:
        status, ctype = r.status_code, r.headers.get("Content-Type", "")
        if status >= 500 or status == 429:  # S3 says 503 SlowDown when asked too fast
            after = r.headers.get("Retry-After", "")
            raise TransientError(f"HTTP {status}: {_excerpt(r)}", float(after) if after.isdigit() else None)
        if status == 416:  # asked from past the end: fine only when the .part is exactly the whole file
            total = _range_total(r.headers.get("Content-Range", ""))
            if total != start:
                raise CorruptError(f"the partial file ({start} bytes) does not fit the source ({total} bytes)")
            yield Body(iter(()), start)
            return
        if status >= 400:
            raise MissingError(f"HTTP {status} for {url}")
        if "xml" in ctype or "html" in ctype:  # Common Crawl and proxies answer errors with XML/HTML pages
            raise TransientError(f"HTTP {status} with an error page ({ctype}): {_excerpt(r)}")
        length = int(r.headers["Content-Length"]) if r.headers.get("Content-Length", "").isdigit() else None
        if status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", ""))
            if not m or int(m[1]) != start:
                raise TransientError(f"Content-Range '{r.headers.get('Content-Range')}' does not answer "
                                     f"Range '{headers['Range']}'")
            if length is not None and length != int(m[2]) - int(m[1]) + 1:
                raise TransientError(f"Content-Length {length} disagrees with Content-Range {m[0]}")
            offset, length = start, int(m[2]) - int(m[1]) + 1
        elif status == 200:  # no Range asked, or the server ignored it: the whole file from byte 0
            offset = 0
            if end is not None and length is not None:
                length = min(length, end)  # a sample: read the first `end` bytes, then hang up
        else:
            raise MissingError(f"HTTP {status} for {url}: expected 200 or 206")
        yield Body(_http_chunks(r, offset, length, end), offset)


def _http_chunks(r: requests.Response, offset: int, length: int | None, end: int | None) -> Iterator[bytes]:
    """The response body, converting every network failure into TransientError; checks its length at the end."""
    received = 0
    limit = length if length is not None else (end - offset if end is not None else None)
    stream = r.raw.stream(CHUNK, decode_content=False)
    while limit is None or received < limit:
        try:
            chunk = next(stream, b"")
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:  # reset, timeout, short read
            raise TransientError(f"connection broken after {received} bytes: {type(e).__name__}: {e}") from e
        if not chunk:
            break
        if received == 0 and offset == 0 and not chunk.startswith(GZIP_MAGIC) and chunk.lstrip()[:1] == b"<":
            raise TransientError(f"HTTP {r.status_code} with an XML/HTML error body: {chunk[:200]!r}")
        if limit is not None:
            chunk = chunk[: limit - received]
        received += len(chunk)
        yield chunk
    if length is not None and received < length:
        raise TransientError(f"short body: {received} of {length} bytes")


def _fsspec_bytes(url: str, start: int, end: int | None) -> Iterator[Body]:
    """Local folders, file:// and s3:// (anonymous): seek to `start`, read to `end`."""
    remote = not _is_local(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, **({"anon": True} if url.startswith("s3://") else {}))
        size = fs.size(path)
        f = fs.open(path, "rb")
    except ImportError as e:  # fsspec names the missing package: s3fs for s3://
        raise StageError(f"reading {url} needs an extra package ({e}): pip install s3fs") from e
    except (FileNotFoundError, PermissionError) as e:
        raise MissingError(f"{type(e).__name__}: {e}") from e
    except Exception as e:  # an object store's own errors (botocore, aiohttp): may go away, retry
        if remote:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        raise MissingError(f"{type(e).__name__}: {e}") from e
    if start > size:
        raise CorruptError(f"the partial file ({start} bytes) is longer than the source ({size} bytes)")

    def chunks() -> Iterator[bytes]:
        f.seek(start)
        left = (min(end, size) if end is not None else size) - start
        while left > 0:
            try:
                chunk = f.read(min(CHUNK, left))
            except Exception as e:  # s3fs retries internally; what is left is worth our retry too
                if remote:
                    raise TransientError(f"{type(e).__name__}: {e}") from e
                raise
            if not chunk:
                raise TransientError(f"short read: {size - left - start} of {size - start} bytes")
            left -= len(chunk)
            yield chunk

    with f:
        yield Body(chunks(), start)


def _excerpt(r: requests.Response) -> str:
    try:
        return r.raw.read(300, decode_content=False).decode("utf-8", "replace").strip() or r.reason
    except Exception:  # the error body is only for the message; a broken one must not hide the status
        return r.reason


def _range_total(content_range: str) -> int | None:
    m = re.fullmatch(r"bytes \*/(\d+)", content_range)
    return int(m[1]) if m else None


def read_small(url: str, cfg: Config, parse) -> object:
    """A small whole file (listing, collinfo.json) parsed by `parse`, with retries; damage is transient remotely."""
    def once():
        with open_bytes(url, 0, None, cfg) as body:
            raw = b"".join(body.chunks)
        try:
            return parse(raw)
        except (OSError, EOFError, ValueError) as e:  # gzip/JSON/UTF-8 errors; a cut body over the network
            if _is_local(url):
                raise MissingError(f"cannot parse it: {type(e).__name__}: {e}") from e
            raise TransientError(f"cannot parse it: {type(e).__name__}: {e}") from e

    for attempt in range(cfg.retries + 1):
        try:
            return once()
        except TransientError as e:
            if attempt == cfg.retries:
                raise
            wait = backoff(attempt, cfg, e.retry_after)
            log.warning("%s: %s; retry %d/%d in %.2f s", url, e, attempt + 1, cfg.retries, wait)
            time.sleep(wait)


# ---- verification while streaming ---------------------------------------------------------------------------------
class WarcStream(io.RawIOBase):
    """A readable stream over .warc.gz chunks: counts and sha256-hashes the compressed bytes, decompresses each gzip
    member once (ISA-L or zlib) and hands out the WARC text of whole members only, for warcio to parse.

    Handing out whole members is what lets a sample end at the last complete record, and what finds a file cut
    short: `whole` is where the last complete member ends; bytes after it at the end are a cut member."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.sha256 = hashlib.sha256()
        self.size = 0  # compressed bytes seen
        self.whole = 0  # compressed offset just after the last complete gzip member
        self._member = inflate.decompressobj(wbits=31)  # 31: a gzip header and trailer around deflate data
        self._pending: list[bytes] = []  # WARC text of the member in progress (one record: ~1 MB at most in CC)
        self._ready: collections.deque[memoryview] = collections.deque()  # WARC text of whole members, in pieces
        self._head = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes of WARC text; whole members' text as it is, without copying, when it fits."""
        while not self._ready and not self._eof:
            self._feed(next(self.chunks, None))
        if not self._ready:
            return b""
        text = self._ready.popleft()
        if 0 <= size < len(text):
            self._ready.appendleft(text[size:])
            text = text[:size]
        return text.obj if len(text) == len(text.obj) else bytes(text)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def _feed(self, chunk: bytes | None) -> None:
        if chunk is None:
            self._eof = True
            return
        if self.size < 2:  # the first two bytes, however the chunks fall
            self._head = (self._head + chunk)[:2]
            if not GZIP_MAGIC.startswith(self._head):
                raise CorruptError("not gzip (no 1f 8b magic bytes)")
        start = self.size  # compressed offset of `chunk`
        self.sha256.update(chunk)
        self.size += len(chunk)
        view, at = memoryview(chunk), 0  # `at`: offset in `chunk` of the next byte to inflate
        while at < len(view):
            # INFLATE_SLICE bytes at most per call: at a member's end the decompressor copies the input it did not use
            # into unused_data, so a whole chunk fed at once had its rest copied once per member (~30 per MiB in CC)
            piece = view[at: at + INFLATE_SLICE]
            try:
                self._pending.append(self._member.decompress(piece))
            except inflate.error as e:
                raise CorruptError(f"broken gzip at byte {start + at}: {e}") from e
            if not self._member.eof:  # all of `piece` consumed; the member goes on
                at += len(piece)
                continue
            at += len(piece) - len(self._member.unused_data)
            self.whole = start + at
            self._ready.extend(memoryview(text) for text in self._pending if text)  # in order, not joined: no copy
            self._pending = []
            self._member = inflate.decompressobj(wbits=31)


def verify(stream: WarcStream) -> dict:
    """Read every record of `stream` with warcio, checking its length and WARC-Block-Digest.

    The block digest is hashed here rather than with warcio's check_digests, which also checks payload digests:
    the block (HTTP headers + payload, every byte of the record) is what a broken transfer would change."""
    from warcio.archiveiterator import ArchiveIterator

    records = verified = 0
    bad = []
    try:
        # no_record_parse: raw_stream is the whole block, which is what WARC-Block-Digest covers
        for record in ArchiveIterator(stream, no_record_parse=True, block_size=CHUNK):  # big reads: fewer calls
            if record.format != "warc":
                raise CorruptError(f"record {records} is not a WARC record (warcio sees format '{record.format}')")
            records += 1
            digest = record.rec_headers.get_header("WARC-Block-Digest")
            algo, _, want = (digest or "").partition(":")
            h = hashlib.new(algo.lower()) if algo.lower() in hashlib.algorithms_available else None
            got = 0
            while block := record.raw_stream.read(CHUNK):
                got += len(block)
                if h:
                    h.update(block)
            rid = record.rec_headers.get_header("WARC-Record-ID")
            if got != record.length:
                bad.append({"record": rid, "reason": f"block is {got} bytes, Content-Length says {record.length}"})
            elif h and (ours := _digest_text(h.digest(), want)) != want.upper():
                bad.append({"record": rid, "reason": f"WARC-Block-Digest {digest}, the block hashes to {ours}"})
            elif h:
                verified += 1
    except (TransientError, CorruptError, MissingError, StageError):
        raise
    except Exception as e:  # warcio raises many types (ArchiveLoadFailed, ValueError, ...) on malformed records
        raise CorruptError(f"warcio cannot read record {records}: {type(e).__name__}: {e}"[:300]) from e
    if bad:
        raise CorruptError(f"{len(bad)} record(s) fail their digest, e.g. {bad[0]['record']}", bad)
    return {"records": records, "digests_verified": verified}


def _digest_text(raw: bytes, like: str) -> str:
    """`raw` in the encoding of `like`: base32 as Common Crawl writes, or hex (base16) as some tools do."""
    return raw.hex().upper() if len(like) == 2 * len(raw) else base64.b32encode(raw).decode()


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while size > 0 and (chunk := f.read(min(CHUNK, size))):
            size -= len(chunk)
            yield chunk


# ---- one file -------------------------------------------------------------------------------------------------------
class Progress:
    """Files, bytes, rate and ETA, logged every PROGRESS_EVERY_S seconds and once per finished file."""

    def __init__(self, files: int):
        self.files, self.done, self.bytes = files, 0, 0
        self.sized, self.done_bytes = 0, 0  # finished files with bytes (not bad ones), and their bytes
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            if time.monotonic() - self.last >= PROGRESS_EVERY_S:
                self._log("")

    def file_done(self, rel: str, size: int, what: str) -> None:
        with self.lock:
            self.done += 1
            self.sized += size > 0
            self.done_bytes += size
            self._log(f"; {what} {rel}")
            progress(self.done, self.files, "files")

    def rate(self) -> float:
        return self.bytes / max(time.monotonic() - self.t0, 1e-9)

    def _log(self, suffix: str) -> None:
        self.last = time.monotonic()
        rate = self.rate()
        eta = "?"
        if self.sized and rate > 0:  # all files at the mean size of the finished ones, less what came
            left = self.done_bytes / self.sized * self.files - self.bytes
            eta = f"{max(left, 0) / rate:.0f} s"
        log.info("download: %d/%d files, %.1f MB, %.1f MB/s, ETA %s%s",
                 self.done, self.files, self.bytes / 1e6, rate / 1e6, eta, suffix)


def transfer(url: str, part: Path, cfg: Config, progress: Progress) -> dict:
    """One attempt: resume `part` from its size, stream the rest in, verify the whole file. Raises on failure."""
    end = int(cfg.sample_mb * 1e6) or None
    start = part.stat().st_size if part.exists() else 0
    ctx = contextlib.nullcontext(Body(iter(()), start)) if end is not None and start >= end else \
        open_bytes(url, start, end, cfg)
    with ctx as body, open(part, "r+b" if part.exists() else "wb") as f:
        keep = body.offset  # bytes of the .part that stay: all of them, or none when a server ignored our Range
        f.truncate(keep)
        f.seek(keep)

        def new_bytes() -> Iterator[bytes]:
            for chunk in body.chunks:
                f.write(chunk)
                progress.add(len(chunk))
                yield chunk

        stream = WarcStream(itertools.chain(_file_chunks(part, keep), new_bytes()))
        counts = verify(stream)
    if stream.whole < stream.size:
        if end is None:
            cut = f"the gzip member at byte {stream.whole} of {stream.size} is cut short"
            if stream.size > keep and not _is_local(url):
                # A response can end cleanly yet early (a Content-Length that lies): ask for the rest with a
                # Range request. A source that has no more answers 416, and then the file is truncated at the source.
                raise TransientError(f"{cut}; asking for the rest")
            # a local file, or a server that had nothing more (416): the source's file is cut short
            raise CorruptError(f"truncated: {cut}", at_source=True)
        with open(part, "r+b") as f:  # a sample: drop the member cut by the end of the range
            f.truncate(stream.whole)
    if not counts["records"]:
        raise CorruptError(f"no whole WARC record in the first {cfg.sample_mb} MB; raise sample_mb"
                           if end is not None else "no WARC records")
    sha = stream.sha256.hexdigest() if stream.whole == stream.size else sha256_file(part)
    return {"size": stream.whole, "sha256": sha, "resumed_from": start if keep else 0, **counts}


def fetch(rel: str, cfg: Config, warc_dir: Path, progress: Progress) -> dict:
    """Fetch one listing path: {'path', 'url', 'size', 'sha256', 'records', ...} or {'path', 'bad'|'transient'}."""
    url = f"{cfg.source.rstrip('/')}/{rel}"
    dest = warc_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # complete and verified by an earlier run; verified again from disk for the stats
        stream = WarcStream(_file_chunks(dest, dest.stat().st_size))
        try:
            counts = verify(stream)
            progress.file_done(rel, stream.size, "already present")
            return {"path": rel, "url": url, "size": stream.size, "sha256": stream.sha256.hexdigest(),
                    "fetched": False, "retries": 0, "resumed_from": 0, **counts}
        except CorruptError as e:  # damaged on disk since: fetch it again
            log.warning("%s on disk is damaged (%s); fetching it again", rel, e)
            dest.unlink()
    part = dest.with_name(dest.name + ".part")
    failures, last_corrupt, attempts = 0, None, 0
    while True:
        attempts += 1
        before = part.stat().st_size if part.exists() else 0
        try:
            result = transfer(url, part, cfg, progress)
            break
        except TransientError as e:
            if part.exists() and part.stat().st_size > before:
                failures = 0  # it made progress: only attempts that get nowhere use up the retries
            failures += 1
            if failures > cfg.retries:  # fatal in run(); the .part stays for the re-run to resume
                return {"path": rel, "transient": f"{rel}: {e}"}
            wait, what = backoff(failures - 1, cfg, e.retry_after), e
        except CorruptError as e:
            part.unlink(missing_ok=True)
            failures += 1
            # the same damage twice, or a local file (reading it again gives the same bytes): the source is bad
            if e.at_source or str(e) == last_corrupt or failures > cfg.retries or _is_local(url):
                log.warning("bad WARC %s: %s", rel, e)
                progress.file_done(rel, 0, "bad")
                return {"path": rel, "bad": str(e)[:300], "bad_records": e.bad_records[:20]}
            last_corrupt, wait, what = str(e), backoff(failures - 1, cfg), e
        except MissingError as e:
            part.unlink(missing_ok=True)
            log.warning("bad WARC %s: %s", rel, e)
            progress.file_done(rel, 0, "bad")
            return {"path": rel, "bad": f"fetch failed: {e}"[:300], "bad_records": []}
        log.warning("%s: %s; retry %d/%d in %.2f s", rel, what, failures, cfg.retries, wait)
        time.sleep(wait)
    part.replace(dest)
    progress.file_done(rel, result["size"], "fetched")
    return {"path": rel, "url": url, "fetched": True, "retries": attempts - 1, **result}
