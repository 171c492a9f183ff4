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
Both are printed for all pages and for two halves split by URL hash (sha1(url) even: half A, odd: half B). The
resiliparse options (stages/extract_steps.RESILIPARSE_OPTIONS) were chosen on half A only; half B shows whether the
choice carries over. A third, independent check never used for tuning: trafilatura's own evaluation set
(trafilatura-eval.part1: 300 pages, 2/3 German, with `with` / `without` snippets), scored as trafilatura's evaluation
does: a `with` snippet found is a true positive, missed a false negative; a `without` snippet found is a false
positive; P, R and F1 over all snippets. Trafilatura was developed against this set, so it is its home ground.

    python bench/extraction_quality.py        # ~5 s on 2 cores (trafilatura is most of it)
"""

from __future__ import annotations

import argparse
import hashlib
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


def warc_pages(warc: Path, labels: Path) -> list[tuple[str, str, dict]]:
    """[(url, html, label row)] for the WARC's response records whose URL has a row in the labels JSONL."""
    from datatrove.pipeline.readers.warc import process_record
    from warcio.archiveiterator import ArchiveIterator

    rows = {}
    for line in labels.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["url"]] = row
    pages = []
    with open(warc, "rb") as f:
        for record in ArchiveIterator(f):
            doc = process_record(record)
            if doc and doc["url"] in rows:
                pages.append((doc["url"], doc["text"], rows[doc["url"]]))
    return pages


def load_pages(data: Path) -> list[tuple[str, str, str]]:
    """[(url, html, expected_text)] for the Zyte WARC response records that have ground truth."""
    return [(url, html, row["expected_text"])
            for url, html, row in warc_pages(data / "zyte-aeb.part1.warc.gz",
                                             data / "zyte-aeb.part1.ground_truth.jsonl")]


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


def half(url: str) -> str:
    """'A' or 'B': a fixed split of the pages by URL hash (the resiliparse options were chosen on 'A')."""
    return "AB"[int(hashlib.sha1(url.encode()).hexdigest(), 16) % 2]


def load_snippet_pages(data: Path) -> list[tuple[str, str, dict]]:
    """[(url, html, annotation)] for trafilatura-eval.part1: annotation["with"] / ["without"] are snippet lists."""
    return warc_pages(data / "trafilatura-eval.part1.warc.gz", data / "trafilatura-eval.part1.annotations.jsonl")


def extract_all(extractor, htmls: list[str]) -> tuple[list[str], int, float]:
    """(texts, failures, seconds): a failed extraction counts as empty text, as the stage would drop the document."""
    texts, failed, started = [], 0, time.perf_counter()
    for html in htmls:
        try:
            texts.append(extractor.extract(html) or "")
        except Exception:
            failed, _ = failed + 1, texts.append("")
    return texts, failed, time.perf_counter() - started


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
    print(f"{len(pages)} Zyte pages with ground truth: {sum(half(u) == 'A' for u, _, _ in pages)} in half A (tuning), "
          f"{sum(half(u) == 'B' for u, _, _ in pages)} in half B")
    results = {}  # (extractor, part) -> (P, R, F1, 4sh P, 4sh R, 4sh F1, errors, empty, s)
    for name, extractor in extractors.items():
        texts, failed, seconds = extract_all(extractor, [html for _, html, _ in pages])
        for part in ("all", "A", "B"):
            chosen = [(expected, text) for (url, _, expected), text in zip(pages, texts) if part in ("all", half(url))]
            tokens = [token_scores(expected, text) for expected, text in chosen]
            shingles = [shingle_counts(expected, text) for expected, text in chosen]
            p, r, f1 = (statistics.mean(s[i] for s in tokens) for i in range(3))
            empty = sum(not text.strip() for _, text in chosen)
            results[name, part] = (p, r, f1, *shingle_scores(shingles), failed if part == "all" else 0, empty,
                                   seconds if part == "all" else 0.0)
    gaps = {part: results["resiliparse", part][2] - results["trafilatura", part][2] for part in ("all", "A", "B")}
    print(f"f1_gap={gaps['all']:+.3f} (goal >= -0.03)  [resiliparse - trafilatura, whitespace-token F1, macro over "
          f"pages; half A (tuning) {gaps['A']:+.3f}, half B {gaps['B']:+.3f}]")
    print(f"{'extractor':<12} {'pages':<6} {'tok P':>6} {'tok R':>6} {'tok F1':>6}   {'4sh P':>6} {'4sh R':>6}"
          f" {'4sh F1':>6}   {'errors':>6} {'empty':>5} {'s':>6}")
    for (name, part), (p, r, f1, sp, sr, sf1, failed, empty, seconds) in results.items():
        timing = f"{failed:6d} {empty:5d} {seconds:6.1f}" if part == "all" else f"{'':6} {empty:5d}"  # errors, s: all
        print(f"{name:<12} {part:<6} {p:6.3f} {r:6.3f} {f1:6.3f}   {sp:6.3f} {sr:6.3f} {sf1:6.3f}   {timing}")

    if not (args.data / "trafilatura-eval.part1.warc.gz").is_file():
        return
    snippet_pages = load_snippet_pages(args.data)
    print(f"\nheld out, never tuned on: trafilatura-eval.part1, {len(snippet_pages)} pages, "
          f"{sum(len(n['with']) for _, _, n in snippet_pages)} with / "
          f"{sum(len(n['without']) for _, _, n in snippet_pages)} without snippets")
    f1s = {}
    for name, extractor in extractors.items():
        texts, failed, seconds = extract_all(extractor, [html for _, html, _ in snippet_pages])
        tp = fn = fp = 0
        for (_, _, note), text in zip(snippet_pages, texts):
            text = " ".join(text.split())  # snippets are single-spaced; line breaks in the text must not hide them
            tp += sum(" ".join(w.split()) in text for w in note["with"])
            fn += sum(" ".join(w.split()) not in text for w in note["with"])
            fp += sum(" ".join(w.split()) in text for w in note["without"])
        p, r = tp / (tp + fp), tp / (tp + fn)
        f1s[name] = 2 * p * r / (p + r)
        print(f"{name:<12} snippet P {p:.3f} R {r:.3f} F1 {f1s[name]:.3f}   errors {failed}   {seconds:.1f} s")
    print(f"snippet_f1_gap={f1s['resiliparse'] - f1s['trafilatura']:+.3f}  [resiliparse - trafilatura]")


if __name__ == "__main__":
    main()
