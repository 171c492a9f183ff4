"""The extract stage's WARC reader: datatrove's WarcReader made safe for damaged and hostile input.

Common Crawl writes a .warc.gz as one gzip member per record. SafeWarcReader inflates the members itself, one at a
time, never holding more than member_cap(max_record_bytes) inflated bytes, and hands each member to warcio as a small
uncompressed WARC. That gives three things warcio's own streaming does not:
  - bounded memory: a member that inflates past the cap (a gzip bomb, whatever its Content-Length claims) is drained
    in INFLATE_STEP pieces that are thrown away, so the bomb costs time (~1 s per GiB inflated with ISA-L, ~7 s with zlib), not memory. The
    reader's own buffers per task stay under
        2 x member_cap + 1.5 x READ_CHUNK + INFLATE_STEP = 2 x max_record_bytes + 2.6 MiB  (22.6 MiB at the default)
    (a member's pieces and their join, the compressed input, one inflated piece), plus the one page it hands on;
  - exact offsets: each document's `warc_offset` is its member's byte offset in the .warc.gz, where
    `warcio extract FILE OFFSET` or an HTTP range request finds the record;
  - recovery: after damage (garbage between members, a cut or corrupt member, a record that is not a WARC, a
    Content-Length longer than its member) reading resumes at the next gzip member header, so the records after
    the damage are kept. The file is named in the task's stats once, with its first error.

Every record that does not become a document is counted under one reason, so that the funnel's read_warc row
accounts for all of them: dropped_<reason> for records that are not pages (warcinfo, request, metadata: "not_page")
and skipped_<reason> for pages skipped on purpose or by damage (SKIP_REASONS).
"""

from __future__ import annotations

import io
import re
import zlib
from typing import Iterator, NamedTuple

from datatrove.pipeline.readers import WarcReader
from warcio.archiveiterator import ArchiveIterator

try:
    from isal import isal_zlib as inflate  # ISA-L: the same bytes as zlib, ~7x faster on a bomb's zeros (a project dep)
    INFLATE_ERRORS: tuple = (zlib.error, inflate.IsalError)
except ImportError:
    inflate, INFLATE_ERRORS = zlib, (zlib.error,)

UNREADABLE = "unreadable:"  # prefix of the reader's per-file stat that names a WARC it could not read to the end
CRAWL_IN_PATH = re.compile(r"crawl-data/(CC-MAIN-\d{4}-\d{2})/")  # Common Crawl's layout: crawl-data/CC-MAIN-2024-22
GZIP_MAGIC = b"\x1f\x8b\x08"  # RFC 1952: ID1 ID2 and CM=8 (deflate), the start of every gzip member
HTML_TYPES = ("text/html", "application/xhtml+xml")
READ_CHUNK = 1 << 20  # compressed bytes read from the file at a time
INFLATE_STEP = 1 << 20  # most inflated bytes one zlib call returns (zlib's max_length), so a bomb comes in pieces
HEADER_ROOM = 64 << 10  # WARC headers of a Common Crawl record are ~1 KiB; 64 KiB leaves room for long URIs
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
SKIP_REASONS = {  # skipped_<key> counters of the reader, and what each means (the funnel's read_warc reasons)
    "non_html": "a response whose payload is not HTML (payload type or sniffed MIME type)",
    "undecodable": "an HTML payload that decodes neither as UTF-8 nor as the charset cchardet detects",
    "oversized": "a record whose Content-Length is over max_record_bytes (inflated in pieces and dropped, never held)",
    "gzip_bomb": "a gzip member that inflates past max_record_bytes while its record claims to fit",
    "cut_short": "a record whose Content-Length runs past the end of its gzip member (damage)",
    "bad_record": "a record warcio parsed but whose headers or payload could not be read",
    "empty": "an HTML page with no characters",
}


def member_cap(max_record_bytes: int) -> int:
    """Most inflated bytes one gzip member may have: one record of max_record_bytes plus its WARC headers."""
    return max_record_bytes + HEADER_ROOM


class Member(NamedTuple):
    """One gzip member of a .warc.gz, as gzip_members yields it: `data` (its inflated bytes) or else one reason."""
    offset: int  # byte offset of the member in the file
    data: bytes | None = None
    skipped: str = ""  # "oversized" | "gzip_bomb": inflated past the cap, drained and dropped
    length: int = 0  # with `skipped`: the Content-Length the record claims, or else the inflated size
    damage: str = ""  # what is wrong with the bytes at `offset` (reading resumes at the next member header)


class SafeWarcReader(WarcReader):
    """WarcReader over the gzip members of each file (see the module docstring). It adds to each document: `warc`, the
    path inside the download artifact (not datatrove's absolute path, so the output does not depend on where the stage
    ran), `warc_offset` and `crawl`, from the file's warcinfo record (isPartOf) or else its crawl-data/CC-MAIN-… path.
    """

    def __init__(self, data_folder: str, max_record_bytes: int = 10 << 20):
        super().__init__(data_folder, glob_pattern="**/*.warc.gz", recursive=True)
        self.add_file_path = False  # WarcReader does not pass this on to BaseDiskReader
        self.max_record_bytes = max_record_bytes

    def read_file(self, filepath: str):
        found = CRAWL_IN_PATH.search(filepath)
        crawl = found.group(1) if found else ""
        named = False  # the file is named in the stats once, with its first damage
        # The raw bytes (compression=None): gzip_members inflates them one member at a time.
        with self.data_folder.open(filepath, "rb", compression=None) as f:
            for member in gzip_members(f, member_cap(self.max_record_bytes)):
                with self.track_time():
                    docs, damage = [], member.damage
                    if member.skipped:
                        self.count(f"skipped_{member.skipped}", member.length)
                    elif not damage:
                        try:
                            docs, crawl = self.parse_member(member, filepath, crawl)
                        except Exception as e:  # warcio errors and parse_member's checks: damage inside the member
                            damage = f"{type(e).__name__}: {e}"
                    if damage:
                        self.stat_update("damaged_spans")
                        if not named:
                            self.stat_update("unreadable_files")
                            self.stat_update(f"{UNREADABLE}warc/{filepath}: at byte {member.offset}: {damage}"[:300])
                        named = True
                yield from docs

    def count(self, reason: str | None, length: int) -> None:
        """One WARC record read (its Content-Length into record_bytes), and why it is not a document, if it is not."""
        self.stat_update("records")
        self.stat_update("record_bytes", value=length)
        if reason:
            self.stat_update(reason)

    def parse_member(self, member: Member, filepath: str, crawl: str) -> tuple[list, str]:
        """The documents of one inflated gzip member (one record in Common Crawl's files), and the crawl name after it.
        warcio is lenient with damage, so the two checks below turn it into errors, as a gzip reader would raise."""
        docs = []
        for record in ArchiveIterator(io.BytesIO(member.data)):
            if record.format != "warc":  # warcio parses anything that is not a WARC as a (garbage) ARC record
                raise ValueError("not a WARC record")
            length = int(record.rec_headers.get_header("Content-Length") or 0)
            page, reason = None, "dropped_not_page"
            if length > self.max_record_bytes:
                reason = "skipped_oversized"
            else:
                try:
                    page, why = html_or_reason(record)
                    reason = f"skipped_{why}" if why else reason
                except Exception:  # one odd record (bad headers, encoding) must not cost the file
                    reason = "skipped_bad_record"
                if record.rec_type == "warcinfo":
                    crawl = warcinfo_crawl(record.raw_stream.read()) or crawl
            while record.raw_stream.read(INFLATE_STEP):  # to the record's end, so that the check below is true
                pass
            if getattr(record.raw_stream, "limit", 0):  # bytes the header promised and the member lacks
                self.count("skipped_cut_short", length)
                raise EOFError(f"record Content-Length {length} runs past the end of its gzip member")
            doc = self.get_document_from_dict(page, filepath, member.offset) if page else None
            self.count(None if doc else ("skipped_empty" if page else reason), length)
            if doc:
                doc.metadata.update(warc=f"warc/{filepath}", warc_offset=member.offset, crawl=crawl)
                docs.append(doc)
        return docs, crawl


def gzip_members(f, cap: int) -> Iterator[Member]:
    """The gzip members of the binary file `f`, in order: inflated, or skipped when they inflate past `cap` bytes, or
    one Member with `damage` per damaged span, then the next member after it. Memory: the member's pieces and their
    join (2 x cap at most), plus READ_CHUNK * 1.5 of compressed input and one INFLATE_STEP piece."""
    pos, buf = 0, f.read(READ_CHUNK)  # pos: the file offset of buf[0]
    while buf:
        start = pos
        if not buf.startswith(GZIP_MAGIC):
            if len(buf) < len(GZIP_MAGIC) and (more := f.read(READ_CHUNK)):  # a header split across two reads
                buf += more
                continue
            yield Member(start, damage="bytes that are not a gzip member")
            pos, buf = seek_magic(f, start + 1)
            continue
        inflater, parts, size, head = inflate.decompressobj(31), [], 0, b""  # wbits 31: one gzip member, then eof
        try:
            while not inflater.eof:
                if not buf:
                    buf = f.read(READ_CHUNK)
                    if not buf:
                        raise EOFError("the file ends inside this gzip member")
                piece = inflater.decompress(buf, INFLATE_STEP)
                rest = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                pos, buf = pos + len(buf) - len(rest), rest
                size += len(piece)
                if len(head) < HEADER_ROOM:  # the WARC headers, to tell a bomb from an honest oversized record
                    head += piece[:HEADER_ROOM - len(head)]
                if size <= cap:
                    parts.append(piece)
                elif parts:  # past the cap: from here on the pieces are counted and dropped
                    parts = []
        except (*INFLATE_ERRORS, EOFError) as e:
            yield Member(start, damage=f"{type(e).__name__}: {e}")
            pos, buf = seek_magic(f, start + 1)
            continue
        if size <= cap:
            yield Member(start, data=b"".join(parts))
        else:
            claimed = CONTENT_LENGTH.search(head.split(b"\r\n\r\n", 1)[0])
            claimed = int(claimed.group(1)) if claimed else None
            if claimed is not None and claimed <= cap - HEADER_ROOM:  # the record says it fits; its member does not
                yield Member(start, skipped="gzip_bomb", length=claimed)
            else:
                yield Member(start, skipped="oversized", length=size if claimed is None else claimed)
        if len(buf) < READ_CHUNK // 2:  # keep half a chunk ahead, so that a member header is never split
            buf += f.read(READ_CHUNK)


def seek_magic(f, offset: int) -> tuple[int, bytes]:
    """(offset, bytes from there) of the next gzip member header at or after `offset`; (offset, b"") at the end."""
    f.seek(offset)
    tail = b""
    while chunk := f.read(READ_CHUNK):
        data = tail + chunk
        at = data.find(GZIP_MAGIC)
        if at >= 0:
            return offset - len(tail) + at, data[at:]
        offset += len(chunk)
        tail = data[-2:]  # a header split across two reads
    return offset, b""


def html_or_reason(record) -> tuple[dict | None, str | None]:
    """datatrove's process_record (readers/warc.py), with the reason it drops a response: ({text, id, url, date}, None),
    (None, "non_html" | "undecodable"), or (None, None) for records that are not pages (warcinfo, request, ...)."""
    import cchardet
    import magic

    if record.rec_type not in ("response", "conversion"):  # WET files hold "conversion" records
        return None, None
    plain_ok = record.rec_type == "conversion"
    mime = record.rec_headers.get("WARC-Identified-Payload-Type", None)
    if mime is not None and mime not in HTML_TYPES and not (plain_ok and mime == "text/plain"):
        return None, "non_html"
    content = record.content_stream().read()  # at most max_record_bytes, checked by the caller
    if mime is None:  # older crawls have no payload type: sniff it as datatrove does
        mime = magic.from_buffer(content, mime=True)
        if mime not in HTML_TYPES and not (plain_ok and mime == "text/plain"):
            return None, "non_html"
    try:
        html = content.decode("utf-8")
    except UnicodeDecodeError:
        detected = cchardet.detect(content)["encoding"]
        try:
            html = content.decode(detected) if detected and detected.lower() not in ("utf-8", "utf8") else None
        except (UnicodeDecodeError, LookupError):
            html = None
        if html is None:
            return None, "undecodable"
    h = record.rec_headers
    return {"text": html, "id": h["WARC-Record-ID"], "url": h.get("WARC-Target-URI", None),
            "date": h.get("WARC-Date", None)}, None


def warcinfo_crawl(block: bytes) -> str:
    """'CC-MAIN-2024-22' from a warcinfo block of `key: value` lines (Common Crawl writes `isPartOf: CC-MAIN-…`)."""
    for line in block.decode("utf-8", "replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "isPartOf":
            return value.strip()
    return ""
