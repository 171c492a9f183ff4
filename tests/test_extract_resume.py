"""Resume of stages.extract after a hard kill: `python -m stages.extract` is SIGKILLed in the middle of its first
datatrove pipeline; the re-run skips the tasks that had finished (datatrove's completion markers under
logs/<stage>/completions in the staging directory) and commits the same documents and stats as a run that was never
interrupted. Built from the bundled data/tiny-cc WARCs, no network."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages import download
from stages.artifacts import Artifact, ArtifactStore
from stages.common import build

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny-cc"
COMMAND = ["--input", "download/latest", "--set", "workers=1"]  # one worker: tasks finish one after another
KILL_AFTER_S = 120  # give up waiting for the first completion marker (the whole stage takes ~30 s on 2 cores)
# datatrove (0.10) still reads tldextract 5's deprecated registered_domain
pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")


def child_env() -> dict:
    """This environment without what would make the child join a Prefect run or a torch.distributed job."""
    launch = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "CRAWL2CHAT_NPROC", "CRAWL2CHAT_HOSTFILE",
              "CRAWL2CHAT_LAUNCHER"}
    return {k: v for k, v in os.environ.items()
            if k not in launch and not k.startswith(("PREFECT_", "MASTER_"))}


@pytest.fixture
def started():
    """The stage processes a test started; any still running at the end (a failed assertion) are killed, group and
    all, so that they do not hold the shared cores after the test."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def extract(root: Path, started: list) -> subprocess.Popen:
    # A session of its own, so the kill below reaches the stage's helper processes too (datatrove's multiprocess
    # manager, the extractor's sandbox), as losing the machine or the OOM killer taking the job would.
    proc = subprocess.Popen([sys.executable, "-m", "stages.extract", "--root", str(root), *COMMAND], cwd=REPO,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    started.append(proc)
    return proc


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    return output


def committed(root: Path) -> Artifact:
    store = ArtifactStore(root)
    return store.get(*store.resolve("extract/latest"))


def test_killed_extract_resumes_only_unfinished_tasks_and_matches_an_uninterrupted_run(tmp_path, started):
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    store = ArtifactStore(root_a)
    made = build(download, download.Config(source=str(TINY), num_files=0), [], store)
    store.set_alias("download", "latest", made.artifact.version)
    assert made.stats["files_ok"] >= 2, made.stats  # a kill between two tasks needs at least two WARCs (tasks)
    shutil.copytree(root_a, root_b)  # the same download artifact (same version) in a second store

    # B runs while A runs: the two overlap on the 2 cores, which keeps the test's wall time near one run's.
    uninterrupted, interrupted = extract(root_a, started), extract(root_b, started)
    staging = root_b / "extract" / ".staging"
    deadline = time.monotonic() + KILL_AFTER_S
    while not (markers := sorted(staging.glob("*/logs/*/completions/*"))):
        assert interrupted.poll() is None, "the stage ended before any datatrove task finished"
        assert time.monotonic() < deadline, f"no completion marker under {staging} after {KILL_AFTER_S} s"
        time.sleep(0.05)  # the filter stage's tasks take seconds each: 50 ms polls catch the first marker early
    os.killpg(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    assert interrupted.returncode == -signal.SIGKILL
    version = markers[0].relative_to(staging).parts[0]  # .staging/<version>/logs/<stage>/completions/<rank>
    assert not ArtifactStore(root_b).is_committed("extract", version), \
        "the killed run committed its artifact: the kill came too late to test resuming"
    # Marker and stats times of the tasks that finished before the kill (more may have finished since the first),
    # by path inside the artifact: the commit moves the staging directory into place.
    finished = {}
    for marker in (staging / version).glob("logs/*/completions/*"):
        stats_file = marker.parent.parent / "stats" / f"{marker.name}.json"  # datatrove: stats/00000.json per task
        finished.update({p.relative_to(staging / version): p.stat().st_mtime_ns for p in (marker, stats_file)})

    output_b = finish(extract(root_b, started))
    output_a = finish(uninterrupted)

    # Only the unfinished tasks ran again: datatrove said so, and the finished tasks' markers and stats are untouched.
    assert "already completed tasks" in output_b, output_b[-3000:]
    assert "already completed tasks" not in output_a
    assert finished
    for path, mtime in finished.items():
        assert (committed(root_b).path / path).stat().st_mtime_ns == mtime, f"{path} was rewritten: its task ran twice"

    # The same documents, row for row in the same order: docs/<rank>.parquet holds task <rank>'s documents in the
    # order its WARC file has them, and read_table reads the files in name order.
    docs_a, docs_b = committed(root_a).path / "docs", committed(root_b).path / "docs"
    assert sorted(p.name for p in docs_a.glob("*.parquet")) == sorted(p.name for p in docs_b.glob("*.parquet"))
    table_a, table_b = pq.read_table(docs_a), pq.read_table(docs_b)
    assert table_a.num_rows > 0
    assert table_a.equals(table_b), "the resumed run's documents differ from the uninterrupted run's"

    # The same funnel (and every other stat), though the resumed run's tasks ran in two processes.
    stats_a, stats_b = committed(root_a).manifest()["stats"], committed(root_b).manifest()["stats"]
    assert stats_a["funnel"] == stats_b["funnel"]
    assert stats_a == stats_b
