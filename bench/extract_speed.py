"""Speed of the extract stage per core with each extractor, and the cost of the stage's own bookkeeping.

Data: every WARC in /work/shared/data/warc and /work/shared/data/extraction (6 distinct files: Common Crawl samples,
two wget crawls, the Zyte and trafilatura evaluation pages; 535 records, 459 HTML pages, about 1/3 English),
copied into a temporary download artifact; `--copies K` repeats the set K times under new file names (the copies are
exact duplicates, which exact dedup removes, so K > 1 understates the dedup stages' share of a real crawl).

Three sides, each a whole extract run with one task and one worker (datatrove then runs every task in this process,
one after the other, so wall time is time on one core plus the extractor's timeout sandbox process):
  ours  `stages.extract.run(Config(extractor=E, workers=1, tasks=1), download, out=...)`: all six pipelines (filter,
        exact_find, minhash_signature, minhash_buckets (14 one-bucket tasks), minhash_cluster, write), plus the Meters
        after every named step, the completion checks and the funnel read back from datatrove's stats files.
  bare  the same datatrove steps from `stages.extract.build_stages` (same readers, filters, writers and dedup), minus
        the Meter steps, each stage run by a plain `LocalPipelineExecutor(steps, tasks, workers=1)` in the same
        order, and nothing read back afterwards. This is the closest honest "plain datatrove" equivalent: the
        project's reader and filter subclasses (offline URL lists, offline language model, damaged-file handling)
        stay on both sides because plain datatrove would download its block lists and model at run time.
Printed: speedup = trafilatura `ours` CPU time / resiliparse `ours` CPU time (whole stage: the fixed per-task costs
of the dedup pipelines and the quality filters' word tokenization weigh in; the extractor step alone, timed by
datatrove, is printed beside it) and overhead = ours / bare - 1 in CPU time with resiliparse. Docs per CPU-second is docs per second per
core: one worker, and CPU time counts only work done, whatever else runs on the machine. Rounds are
interleaved and the order of the sides switches every round; medians are compared. One unmeasured warm-up run per
extractor loads the URL block lists (parsed once per process) and the language model first.

    python bench/extract_speed.py              # ~3 min on 2 cores at the default 5 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"  # /work/shared/data next to the checkout
SOURCES = ("warc", "extraction")  # folders of ROOT.parent / "shared" / "data" whose *.warc.gz are the input


@contextlib.contextmanager
def quiet():
    """datatrove adds a loguru handler on sys.stderr for every task; thousands of log lines would cost both sides
    terminal time and bury the result, so stderr points at /dev/null while a run is timed."""
    saved = sys.stderr
    with open(os.devnull, "w") as null:
        sys.stderr = null
        try:
            yield
        finally:
            sys.stderr = saved


def ours(extract, cfg, download, out: Path) -> dict:
    from stages.artifacts import Artifact

    return extract.run(cfg, download, out=Artifact("extract", out.name, out))


def bare(extract, cfg, download, out: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor

    for stage, (steps, n) in extract.build_stages(cfg, download.path / "warc", out).items():
        plain = [step for _, step in steps if not isinstance(step, extract.Meter)]
        LocalPipelineExecutor(plain, tasks=n or cfg.tasks, workers=1, logging_dir=str(out / "logs" / stage)).run()
    return {}


def step_seconds(out: Path) -> dict[str, float]:
    """{step: s} by datatrove's own timing of each step (its track_time; seconds on one core): every step of the
    filter stage (a filter's time is its own; the extractor's includes the sandbox round trip) and the MinHash
    signature step, whose time includes reading and exact-dedup filtering its input. Steps named alike add up."""
    seconds: dict[str, float] = {}
    wanted = {"filter": lambda name: "METER" not in name, "minhash_signature": lambda name: "MinHash" in name}
    for stage, keep in wanted.items():
        for step in json.loads((out / "logs" / stage / "stats" / "00000.json").read_text()):
            if keep(step["name"]) and isinstance(step.get("time_stats"), dict):
                name = step["name"].split(": ", 1)[-1]  # "🔻 - FILTER: 👯 Gopher Repetition" -> after ": "
                seconds[name] = seconds.get(name, 0.0) + step["time_stats"]["total"]
    return seconds


def timed(side, extract, cfg, download, scratch: Path) -> tuple[float, float, float, dict, dict]:
    """(wall s, CPU s of this process and its finished children, s inside the extractor step, stats, step_seconds) of
    one run into a fresh folder. The extractor's time is datatrove's own timing of that step (its track_time around
    each document, sandbox round trip included), from the filter stage's stats file."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    # every run starts without the words of pages an earlier run tokenized, as a worker meeting new pages would
    # (spaCy's own vocabulary stays, as it would in a long-running worker)
    extract.shared_tokenizer("en").forget_pieces()
    before, started = os.times(), time.perf_counter()
    with quiet():
        stats = side(extract, cfg, download, out)
    wall, after = time.perf_counter() - started, os.times()
    cpu = sum(after[i] - before[i] for i in range(4))  # user + system, self and children (the extractor sandbox)
    steps = step_seconds(out)
    # the extractor step is named like "⛏ Trafilatura"
    extractor = sum(t for name, t in steps.items() if "⛏" in name)
    shutil.rmtree(out)
    return wall, cpu, extractor, stats, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with warc/ and extraction/ (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=1, help="repeat the WARC set this many times")
    args = parser.parse_args()
    warcs = sorted(w for folder in SOURCES for w in (args.data / folder).rglob("*.warc.gz"))
    if not warcs:
        print(f"extract_speed: no *.warc.gz under {args.data}/{{{','.join(SOURCES)}}}: this bench needs the shared data "
              f"folder (/work/shared/data) or --data DIR; nothing measured")
        return
    from stages import extract
    from stages.artifacts import Artifact

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "download" / "warc").mkdir(parents=True)
        for copy in range(args.copies):
            for w in warcs:
                shutil.copy(w, scratch / "download" / "warc" / f"{copy}-{w.name}")
        download = Artifact("download", "x", scratch / "download")
        configs = {e: extract.Config(extractor=e, workers=1, tasks=1) for e in extract.EXTRACTORS}
        runs = [("resiliparse", "ours", ours), ("resiliparse", "bare", bare), ("trafilatura", "ours", ours)]
        documents, pages = {}, 0
        for e, cfg in configs.items():  # warm-up: block lists, language model, spaCy, imports
            stats = timed(ours, extract, cfg, download, scratch)[3]
            documents[e], pages = stats["documents"], stats["funnel"][0]["docs_out"]
        print(f"{len(warcs) * args.copies} WARC files, {pages} HTML pages; kept: "
              + ", ".join(f"{e} {n}" for e, n in documents.items()))
        times: dict[tuple[str, str], list[tuple[float, float, float]]] = {(e, s): [] for e, s, _ in runs}
        steps: dict[str, list[dict[str, float]]] = {e: [] for e in configs}  # the `ours` runs' step_seconds
        for r in range(args.rounds):
            for e, s, side in runs if r % 2 == 0 else runs[::-1]:
                wall, cpu, extractor, _, seconds = timed(side, extract, configs[e], download, scratch)
                times[e, s].append((wall, cpu, extractor))
                if s == "ours":
                    steps[e].append(seconds)
                print(f"round {r}: {e:<11} {s:<4} {wall:6.2f} s wall {cpu:6.2f} CPU-s {extractor:6.2f} s extracting",
                      flush=True)

    def median(e, s, i=0):
        return statistics.median(t[i] for t in times[e, s])

    # CPU seconds are the headline: other jobs on a shared machine stretch wall time (one round measured 12.4 s wall
    # for 6.5 CPU-s), not the work done.
    speedup = median("trafilatura", "ours", 1) / median("resiliparse", "ours", 1)
    overhead = median("resiliparse", "ours", 1) / median("resiliparse", "bare", 1) - 1
    per_round = [o[1] / b[1] - 1 for o, b in zip(times["resiliparse", "ours"], times["resiliparse", "bare"])]
    speedups = [t[1] / r[1] for t, r in zip(times["trafilatura", "ours"], times["resiliparse", "ours"])]
    print(f"speedup={speedup:.2f} (goal >= 4)  [trafilatura / resiliparse, whole extract stage, median CPU-s; "
          f"per round {' '.join(f'{x:.2f}' for x in speedups)}; "
          f"extractor step alone: {median('trafilatura', 'ours', 2) / median('resiliparse', 'ours', 2):.2f}]")
    print(f"overhead={overhead:+.3f} (goal < 0.05)  [ours / bare datatrove - 1, resiliparse, median CPU-s; "
          f"median of per-round ratios {statistics.median(per_round):+.3f}; wall "
          f"{median('resiliparse', 'ours') / median('resiliparse', 'bare') - 1:+.3f}]")
    print(f"{'extractor':<12} {'side':<5} {'wall s':>7} {'CPU s':>7} {'extract s':>9} {'docs/CPU-s':>10}"
          f" {'extract docs/s':>14} {'kept':>5}")
    for e, s, _ in runs:
        wall, cpu, ex = median(e, s), median(e, s, 1), median(e, s, 2)
        print(f"{e:<12} {s:<5} {wall:7.2f} {cpu:7.2f} {ex:9.2f} {pages / cpu:10.1f} {pages / ex:14.1f}"
              f" {documents[e]:5d}")
    # Where the time goes: a step's cost is the same whichever extractor ran before it, give or take the text it gets,
    # so everything but the extractor line is what the faster extractor cannot make faster.
    names = list(dict.fromkeys(name for e in steps for run in steps[e] for name in run))
    print(f"{'step (median s, ours)':<28}" + "".join(f" {e:>12}" for e in steps))
    for name in names:
        print(f"{name:<28}" + "".join(f" {statistics.median(run.get(name, 0.0) for run in steps[e]):12.2f}"
                                      for e in steps))


if __name__ == "__main__":
    main()
