"""Main-text quality of the two extractors of stages/extract.py against the Zyte article-extraction benchmark.

Data: /work/shared/data/extraction/zyte-aeb.part1.warc.gz (120 article pages as WARC response records) and
zyte-aeb.part1.ground_truth.jsonl (`expected_text`, the article body, per `url`). Every response record is decoded
with datatrove's own `process_record` (what the stage's reader does) and given to each extractor's `.extract(html)`,
built exactly as stages/extract.py builds it: its `Resiliparse` class, and datatrove's `Trafilatura` with
favour_precision=True (FineWeb's settings). Calling `.extract` directly skips datatrove's per-document timeout
sandbox, which changes speed, not text.

Two scores, both macro-averaged over pages (a failed or empty extraction counts as empty text):
  tokens   bag of whitespace tokens with counts (multiset): tp = shared tokens, P = tp / predicted, R = tp / expected,
           F1 per page, then the mean of each. The headline `f1_gap` uses this F1.
  shingles the benchmark's own scorer (scrapinghub/article-extraction-benchmark evaluate.py): `\\w+` tokens joined
           into 4-gram shingles with counts, P and R averaged over pages, F1 = harmonic mean of the averages.

    python bench/extraction_quality.py        # ~5 s on 2 cores (trafilatura is most of it)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "extraction"  # /work/shared/data/extraction next to the checkout
WORD = re.compile(r"\w+")  # the benchmark's tokenizer


def load_pages(data: Path) -> list[tuple[str, str, str]]:
    """[(url, html, expected_text)] for the WARC response records that have ground truth."""
    from datatrove.pipeline.readers.warc import process_record
    from warcio.archiveiterator import ArchiveIterator

    truth = {}
    for line in (data / "zyte-aeb.part1.ground_truth.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        truth[row["url"]] = row["expected_text"]
    pages = []
    with open(data / "zyte-aeb.part1.warc.gz", "rb") as f:
        for record in ArchiveIterator(f):
            doc = process_record(record)
            if doc and doc["url"] in truth:
                pages.append((doc["url"], doc["text"], truth[doc["url"]]))
    return pages


def token_scores(expected: str, predicted: str) -> tuple[float, float, float]:
    """(P, R, F1) over bags of whitespace tokens. Both empty: perfect; one empty: 0 for what has no denominator."""
    want, got = Counter(expected.split()), Counter(predicted.split())
    tp = sum((want & got).values())
    n_want, n_got = sum(want.values()), sum(got.values())
    if n_want == n_got == 0:
        return 1.0, 1.0, 1.0
    p = tp / n_got if n_got else 0.0
    r = tp / n_want if n_want else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def shingle_counts(expected: str, predicted: str, n: int = 4) -> tuple[float, float, float]:
    """The benchmark's string_shingle_matching: (tp, fp, fn) over n-gram shingles, normalised to sum to 1."""
    def shingles(text: str) -> Counter:
        tokens = WORD.findall(text or "")
        return Counter(tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1)) if tokens[i:i + n])

    want, got = shingles(expected), shingles(predicted)
    tp = sum((want & got).values())
    fp, fn = sum((got - want).values()), sum((want - got).values())
    s = tp + fp + fn
    return (tp / s, fp / s, fn / s) if s else (0.0, 0.0, 0.0)


def shingle_scores(counts: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The benchmark's metrics_from_tp_fp_fns: mean P over pages that predicted something, mean R over pages with
    truth, F1 of the two means."""
    def score(tp, miss_a, miss_b):
        return 1.0 if miss_a == miss_b == 0 else (0.0 if tp == miss_a == 0 else tp / (tp + miss_a))

    p = statistics.mean(score(tp, fp, fn) for tp, fp, fn in counts if tp + fp > 0)
    r = statistics.mean(score(tp, fn, fp) for tp, fp, fn in counts if tp + fn > 0)
    return p, r, 2 * p * r / (p + r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with zyte-aeb.part1.* (default: %(default)s)")
    args = parser.parse_args()
    if not (args.data / "zyte-aeb.part1.warc.gz").is_file():
        print(f"extraction_quality: no {args.data}/zyte-aeb.part1.warc.gz: this bench needs the shared data folder "
              f"(/work/shared/data/extraction) or --data DIR; nothing measured")
        return
    from datatrove.pipeline.extractors import Trafilatura
    from stages.extract import Config, Resiliparse

    cfg = Config()  # the stage's defaults; only extract_timeout_s matters to the extractors' construction
    extractors = {"resiliparse": Resiliparse(timeout=cfg.extract_timeout_s),
                  "trafilatura": Trafilatura(favour_precision=True, timeout=cfg.extract_timeout_s)}
    pages = load_pages(args.data)
    print(f"{len(pages)} pages with ground truth")
    results = {}
    for name, extractor in extractors.items():
        tokens, shingles, failed, empty = [], [], 0, 0
        started = time.perf_counter()
        for url, html, expected in pages:
            try:
                text = extractor.extract(html) or ""
            except Exception:  # counted as an empty extraction, as the stage would drop the document
                failed, text = failed + 1, ""
            empty += not text.strip()
            tokens.append(token_scores(expected, text))
            shingles.append(shingle_counts(expected, text))
        seconds = time.perf_counter() - started
        p, r, f1 = (statistics.mean(s[i] for s in tokens) for i in range(3))
        results[name] = (p, r, f1, *shingle_scores(shingles), failed, empty, seconds)
    gap = results["resiliparse"][2] - results["trafilatura"][2]
    print(f"f1_gap={gap:+.3f} (goal >= -0.03)  [resiliparse - trafilatura, whitespace-token F1, macro over pages]")
    print(f"{'extractor':<12} {'tok P':>6} {'tok R':>6} {'tok F1':>6}   {'4sh P':>6} {'4sh R':>6} {'4sh F1':>6}"
          f"   {'errors':>6} {'empty':>5} {'s':>6}")
    for name, (p, r, f1, sp, sr, sf1, failed, empty, seconds) in results.items():
        print(f"{name:<12} {p:6.3f} {r:6.3f} {f1:6.3f}   {sp:6.3f} {sr:6.3f} {sf1:6.3f}   {failed:6d} {empty:5d}"
              f" {seconds:6.1f}")


if __name__ == "__main__":
    main()
