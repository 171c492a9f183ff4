"""stages.extract with executor="slurm" (datatrove's Slurm job arrays) on the local two-node cluster (tests/cluster.py):
the tasks run on both nodes and give the local executor's documents, exclusions and funnel; a cancelled task fails the
stage with a StageError and a re-run submits only the unfinished tasks. And, without a cluster, wait_for_slurm retries
a failing squeue instead of reading its empty output as "the jobs have left the queue".

The cluster tests skip without root or Slurm (`bash infra/ci/install-services.sh`)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from cluster import slurm_cluster  # noqa: F401  (a fixture)
from extract_fixture import (TASKS, assert_same_output, download_artifact, local_run,  # noqa: F401  (fixtures)
                             run_extract)

from stages import extract_executors
from stages.common import StageError

pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")  # datatrove vs tldextract 5
FAILED = subprocess.CompletedProcess([], 1, "", "squeue: error: Unable to contact slurm controller (connect failure)")


class FakeArray:
    """What wait_for_slurm reads of a submitted SlurmPipelineExecutor: its job id, name and unfinished ranks."""

    def __init__(self, job_id: str, done=lambda: False):
        self.job_id, self.job_name, self.done = job_id, f"extract-{job_id}", done

    def get_incomplete_ranks(self) -> list[int]:
        return [] if self.done() else [0]


def fake_slurm(monkeypatch, answers: list[subprocess.CompletedProcess]) -> list[list[str]]:
    """subprocess.run in extract_executors answers squeue with `answers` in turn (scancel with success); no sleeping.
    Returns the commands run."""
    calls = []

    def run(argv, **kw):
        calls.append(argv)
        if argv[0] == "scancel":
            return subprocess.CompletedProcess(argv, 0, "", "")
        return answers[sum(1 for c in calls if c[0] == "squeue") - 1]

    monkeypatch.setattr(extract_executors.subprocess, "run", run)
    monkeypatch.setattr(extract_executors, "SLURM_POLL_S", 0)
    return calls


def test_failing_squeue_is_retried(monkeypatch):
    # slurmctld unreachable twice, then the array runs, then it has finished (its completion markers are there).
    # Before the fix, the first failure's empty output read as "left the queue unfinished": a StageError.
    answers = [FAILED, FAILED, subprocess.CompletedProcess([], 0, "7 None\n7 None\n", ""),
               subprocess.CompletedProcess([], 0, "", "")]
    calls = fake_slurm(monkeypatch, answers)
    extract_executors.wait_for_slurm([FakeArray("7", done=lambda: len(calls) == len(answers))], Path("logs"))
    assert len(calls) == 4


def test_squeue_failing_on_and_on_is_a_stage_error(monkeypatch):
    fake_slurm(monkeypatch, [FAILED] * extract_executors.SQUEUE_TRIES)
    with pytest.raises(StageError, match="squeue failed 10 times in a row .*Unable to contact slurm controller"):
        extract_executors.wait_for_slurm([FakeArray("7")], Path("logs"))


def test_a_chain_that_cannot_finish_is_cancelled(monkeypatch):
    # Job 5 (the first array) ended with a task unfinished, so 6 can never start (afterok) and 7 waits on 6 forever
    # ("Dependency", not "...NeverSatisfied"): the stage must see it from 5 and 6, not wait on 7. A job is taken
    # as gone unfinished only when two polls in a row say so (its markers may show late on shared storage).
    queue = subprocess.CompletedProcess([], 0, "6 Dependency\n7 Dependency\n", "")
    never = subprocess.CompletedProcess([], 0, "6 DependencyNeverSatisfied\n7 Dependency\n", "")
    calls = fake_slurm(monkeypatch, [queue, never])
    with pytest.raises(StageError, match=r"extract-5 \(5\), extract-6 \(6\) cannot finish.*cancelled .*\(6, 7\)"):
        extract_executors.wait_for_slurm([FakeArray("5"), FakeArray("6"), FakeArray("7")], Path("logs"))
    assert calls[-1] == ["scancel", "6", "7"]


SLURM = dict(executor="slurm", slurm_partition="debug", slurm_time="5:00",  # a hung task is killed after 5 min
             # a whole node per task (2 CPUs), so that the two tasks of an array run on different nodes; the nodes
             # offer RealMemory=4000 MB, below the default 4 GB per CPU
             slurm_cpus_per_task=2, slurm_mem_per_cpu_gb=1)


@pytest.fixture
def on_cluster(slurm_cluster, monkeypatch):
    """The test process as a login node of the local cluster: Slurm's commands on PATH and SLURM_CONF, both passed
    on to the jobs by sbatch; squeue polled every second instead of every 30."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(extract_executors, "SLURM_POLL_S", 1)
    return slurm_cluster


def task_nodes(logs: Path) -> dict[str, list[str]]:
    """{pipeline: [node of each array task]}, from scontrol: datatrove's Slurm logs, slurm_logs/<job>_<task>.out,
    name the tasks (slurmctld remembers finished jobs for MinJobAge, 300 s)."""
    found = {}
    for stage in TASKS:
        found[stage] = []
        for log in sorted((logs / stage / "slurm_logs").glob("*.out")):
            job, task = log.stem.split("_")
            out = subprocess.run(["scontrol", "-o", "show", "job", f"{job}_{task}"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            found[stage].append(fields["BatchHost"])
    return found


def test_slurm_executor_matches_local_on_both_nodes(on_cluster, download_artifact, local_run, tmp_path):
    stats, out = run_extract(tmp_path, download_artifact, "slurm", **SLURM)
    assert_same_output(stats, out, local_run)
    nodes = task_nodes(out / "logs")
    assert {stage: len(hosts) for stage, hosts in nodes.items()} == TASKS  # every task ran as a Slurm array task
    assert sorted(nodes["filter"]) == ["c2c-node1", "c2c-node2"], nodes


def cancel_when_filtered(logs: Path, stage: str, rank: int, timeout: float = 120) -> tuple[list[str], threading.Thread]:
    """From a thread, once a filter task has finished: `scancel` task `rank` of `stage`'s array (pending on its
    dependency, or running). Returns [that array task, its state then] (filled in by the thread) and the thread."""
    cancelled = []

    def cancel():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not cancelled:
            if any((logs / "filter" / "completions").glob("*")):
                queued = subprocess.run(["squeue", "--me", "-h", "-r", "-n", f"extract-{stage}", "-o", "%i %T"],
                                        capture_output=True, text=True, timeout=30).stdout
                for task, state in (line.split() for line in queued.splitlines()):
                    if task.endswith(f"_{rank}"):
                        subprocess.run(["scancel", task], check=True, timeout=30)
                        cancelled.extend([task, state])
            time.sleep(0.2)

    thread = threading.Thread(target=cancel, name="canceller", daemon=True)
    thread.start()
    return cancelled, thread


def test_cancelled_task_fails_the_stage_and_a_rerun_finishes_the_rest(on_cluster, download_artifact, local_run,
                                                                      tmp_path):
    logs = tmp_path / "slurm" / "logs"
    cancelled, canceller = cancel_when_filtered(logs, "minhash_signature", rank=1)
    with pytest.raises(StageError, match=r"array extract-minhash_(signature|index) \(\d+\).* cannot finish"):
        run_extract(tmp_path, download_artifact, "slurm", **SLURM)
    canceller.join(timeout=5)
    assert cancelled and cancelled[1] in ("PENDING", "RUNNING"), cancelled
    # as the error says: the stage may stop while task 0 of minhash_signature still runs; a re-run before it ends
    # would submit it again
    deadline = time.monotonic() + 120
    while subprocess.run(["squeue", "--me", "-h"], capture_output=True, text=True, timeout=30).stdout.strip():
        assert time.monotonic() < deadline, "the cancelled chain's jobs did not leave the queue in 120 s"
        time.sleep(0.5)
    assert sorted(p.name for p in (logs / "minhash_signature" / "completions").iterdir()) == ["00000"]
    assert not (logs / "minhash_index" / "completions").exists()
    launched = {stage: (logs / stage / "ranks_to_run.json").stat().st_mtime_ns for stage in ("filter", "exact_find")}

    stats, out = run_extract(tmp_path, download_artifact, "slurm", **SLURM)  # the same command again
    assert_same_output(stats, out, local_run)
    # only the unfinished tasks were submitted: none of the finished pipelines, one task of minhash_signature
    assert {stage: (logs / stage / "ranks_to_run.json").stat().st_mtime_ns for stage in launched} == launched
    assert (logs / "minhash_signature" / "ranks_to_run.json").read_text() == "[1]"
