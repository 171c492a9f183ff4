"""stages.download throughput against `curl` fetching the same files from the same local HTTP server.

What it measures: MB/s of download.run (requests, streaming into .part files, every gzip member decompressed once,
every record's WARC-Block-Digest checked with sha1, sha256 of every file) divided by the MB/s of
`curl --parallel --parallel-max WORKERS` writing the same files, both against one tests/ccserver.py server with no
faults, run in its own process (so that it does not share a GIL with our side). Both sides use the same number of
parallel connections (--workers). Rounds alternate, the side that goes first switches every round, and the ratio is
taken between the median throughputs. Every file is checked to be byte-identical on both sides. A third row times
download.run reading the same folder directly (no HTTP), which is the cost of verification on its own. A last line
gives verification's CPU cost alone (cc_fetch.verify on one thread, CPU seconds, so it does not depend on how busy the
machine is): on a shared machine the wall-clock rows measure the CPU this process gets as much as the code.

Data: a temporary Common-Crawl-layout mirror holding the 5 bundled WARCs of data/tiny-cc plus --copies copies of
the biggest one (zyte-aeb-part1.warc.gz, 4.3 MB, 121 records of ~180 kB each decompressed).

Goal: ratio >= 0.5: checking every record as it streams costs at most half of what a plain copy achieves on a
local link. On the real service a client gets tens of MB/s per connection, far below either side here.

    make setup && source .venv/bin/activate
    python bench/download.py
    python bench/download.py --copies 40 --workers 1
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ccserver import CCServer  # noqa: E402
from stages import cc_fetch, download  # noqa: E402
from stages.artifacts import Artifact  # noqa: E402

TINY = ROOT / "data" / "tiny-cc"
CRAWL = "CC-MAIN-2024-22"
BIG = f"crawl-data/{CRAWL}/segments/tiny-samples/warc/zyte-aeb-part1.warc.gz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=12, help="extra copies of the 4.3 MB WARC in the mirror")
    p.add_argument("--workers", type=int, default=4, help="parallel connections on both sides")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each runs every side once")
    p.add_argument("--goal", type=float, default=0.5)
    return p.parse_args(argv)


def build_mirror(root: Path, copies: int) -> list[str]:
    shutil.copytree(TINY, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    listing = root / "crawl-data" / CRAWL / "warc.paths.gz"
    paths = gzip.decompress(listing.read_bytes()).decode().split()
    for i in range(copies):
        copy = f"crawl-data/{CRAWL}/segments/bench/warc/copy-{i:03d}.warc.gz"
        (root / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / BIG, root / copy)
        paths.append(copy)
    listing.write_bytes(gzip.compress(("\n".join(paths) + "\n").encode()))
    return paths


def serve(root: str, queue) -> None:
    """The server process: answers until it is terminated."""
    with CCServer(Path(root)) as server:
        queue.put(server.url)
        while True:
            time.sleep(3600)


def ours(source: str, out: Path, workers: int) -> float:
    """Seconds for download.run to fetch and verify every file of the mirror."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = download.Config(source=source, crawl=CRAWL, num_files=0, workers=workers)
    t0 = time.perf_counter()
    stats = download.run(cfg, out=Artifact("download", "bench", out))
    seconds = time.perf_counter() - t0
    assert stats["files_ok"] == stats["files_requested"] and not stats["bad_files"], stats
    return seconds


def curl(url: str, paths: list[str], out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["curl", "--silent", "--no-progress-meter", "--show-error", "--fail", "--create-dirs",
           "--parallel", "--parallel-max", str(workers)]
    for p in paths:
        cmd += ["-o", str(out / "warc" / p), f"{url}/{p}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def verify_cpu(paths: list[Path]) -> float:
    """MB of .warc.gz per CPU-second that cc_fetch.verify checks on one thread (the files are read first)."""
    data = [p.read_bytes() for p in paths]
    t0 = time.process_time()
    for blob in data:
        chunks = (blob[i: i + cc_fetch.CHUNK] for i in range(0, len(blob), cc_fetch.CHUNK))
        counts = cc_fetch.verify(cc_fetch.WarcStream(chunks))
        assert counts["records"] > 0, counts
    return sum(map(len, data)) / 1e6 / (time.process_time() - t0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.disable(logging.WARNING)
    if shutil.which("curl") is None:
        print("ratio=nan (curl not found: install curl to compare; nothing measured)")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_download_") as tmp:
        tmp = Path(tmp)
        paths = build_mirror(tmp / "mirror", args.copies)
        total_mb = sum((tmp / "mirror" / p).stat().st_size for p in paths) / 1e6
        queue = multiprocessing.get_context("fork").Queue()
        server = multiprocessing.get_context("fork").Process(target=serve, args=(str(tmp / "mirror"), queue),
                                                             daemon=True)
        server.start()
        try:
            url = queue.get(timeout=30)
            sides = {
                "download": lambda: ours(url, tmp / "ours", args.workers),
                "curl": lambda: curl(url, paths, tmp / "curl", args.workers),
                "local": lambda: ours(str(tmp / "mirror"), tmp / "local", args.workers),
            }
            for run_side in sides.values():  # warm-up: page cache, imports, connections
                run_side()
            mbps: dict[str, list[float]] = {name: [] for name in sides}
            order = list(sides)
            for r in range(args.rounds):
                for name in (order if r % 2 == 0 else order[::-1]):
                    mbps[name].append(total_mb / sides[name]())
            cpu = statistics.median(verify_cpu([tmp / "mirror" / p for p in paths]) for _ in range(args.rounds))
            identical = sum(sha256(tmp / "ours" / "warc" / p) == sha256(tmp / "curl" / "warc" / p) for p in paths)
        finally:
            server.terminate()
            server.join()

    med = {name: statistics.median(v) for name, v in mbps.items()}
    ratio = med["download"] / med["curl"]
    print(f"ratio={ratio:.2f} (goal >= {args.goal:.2f})")
    print(f"data: {len(paths)} WARC files, {total_mb:.1f} MB; {args.workers} parallel connections per side; "
          f"{args.rounds} rounds")
    print(f"{'side':<9} {'median MB/s':>12} {'min':>8} {'max':>8}")
    for name, v in mbps.items():
        print(f"{name:<9} {med[name]:>12.1f} {min(v):>8.1f} {max(v):>8.1f}")
    print("download: HTTP + verification; curl: HTTP only; local: download.run on the folder (verification only)")
    print(f"verification alone: {cpu:.1f} MB/s of .warc.gz per CPU-second (one thread; median of {args.rounds})")
    print(f"files byte-identical on both sides: {identical}/{len(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
