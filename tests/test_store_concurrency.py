"""Several runs on one store (stages/artifacts.py ArtifactStore.building and commit): two builds of one recipe at
once build it once; a builder killed with SIGKILL is taken over; distinct recipes never wait on each other; and a
commit killed between any two of its steps leaves either no artifact (the next run resumes and commits) or a
complete one that `verify` passes, never half of one. The builds run as separate processes (tests/slow_stage.py),
as two `crawl2chat run` would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import SCRIPT, slurm_cluster  # noqa: F401  (a fixture)

from stages.artifacts import COMMIT_STEPS, KILL_ENV, ArtifactStore, plan_version

REPO = Path(__file__).resolve().parent.parent
BUILD = """
import sys
from stages.artifacts import ArtifactStore
from stages.common import build
import slow_stage
result = build(slow_stage, slow_stage.Config(tag=sys.argv[2], seconds=float(sys.argv[3])), [], ArtifactStore(sys.argv[1]))
print("reused" if result.reused else "built", result.artifact.version, flush=True)
"""


def start(root: Path, log: Path, tag: str = "a", seconds: float = 2.0, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "SLOW_STAGE_LOG": str(log), **env}
    return subprocess.Popen([sys.executable, "-c", BUILD, str(root), tag, str(seconds)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out.split()


def events(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_runs_of_one_recipe_build_it_once(tmp_path):
    log = tmp_path / "log"
    first = start(tmp_path / "store", log)
    wait_for(lambda: events(log))  # the first is building
    second = start(tmp_path / "store", log)
    (a, va), (b, vb) = finish(first), finish(second)
    assert (a, b) == ("built", "reused") and va == vb
    assert events(log) == ["start a", "end a"]  # run once: the second waited, then reused it
    store = ArtifactStore(tmp_path / "store")
    assert store.versions("slow") == [va] and store.verify("slow", va) == []


def test_a_killed_builder_is_taken_over(tmp_path):
    log = tmp_path / "log"
    first = start(tmp_path / "store", log, seconds=60)
    wait_for(lambda: any((tmp_path / "store" / "slow" / ".staging").glob("*/part-1.txt")))  # mid-way
    second = start(tmp_path / "store", log, seconds=1)
    time.sleep(1)
    assert second.poll() is None  # waiting on the live builder
    first.send_signal(signal.SIGKILL)  # the kernel drops its lock
    first.wait(timeout=30)
    built, version = finish(second)
    assert built == "built" and events(log) == ["start a", "start a resumed", "end a"]  # resumed its staging
    assert ArtifactStore(tmp_path / "store").verify("slow", version) == []


def test_distinct_recipes_do_not_wait_on_each_other(tmp_path):
    log = tmp_path / "log"
    runs = [start(tmp_path / "store", log, tag=tag, seconds=3) for tag in ("a", "b")]
    assert [finish(r)[0] for r in runs] == ["built", "built"]
    seen = events(log)
    assert set(seen[:2]) == {"start a", "start b"}, seen  # both started before either ended


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_commit_killed_at_any_step_leaves_nothing_or_everything(tmp_path, step):
    log = tmp_path / "log"
    killed = start(tmp_path / "store", log, seconds=0.2, **{KILL_ENV: step})
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    store = ArtifactStore(tmp_path / "store")
    version = plan_version("slow", 1, {"tag": "a"}, [])
    if store.is_committed("slow", version):
        assert step == "renamed"  # only once the rename happened
        assert store.verify("slow", version) == []  # complete: every file, its manifest and its marker
    else:
        assert step != "renamed"
        built, again = finish(start(tmp_path / "store", log, seconds=0.2))  # the next run resumes and commits
        assert built == "built" and again == version and store.verify("slow", version) == []
        assert events(log)[-2] == "start a resumed"


def test_commit_makes_everything_durable_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A SIGKILL cannot lose what the page cache holds, a power loss can: commit fsyncs every file, the manifest
    and the marker and their directories before the rename, and the parent directory after it."""
    import slow_stage
    from stages import artifacts
    from stages.common import build

    monkeypatch.setenv("SLOW_STAGE_LOG", str(tmp_path / "log"))
    done = []
    real_fsync, real_replace, real_write = artifacts.fsync_path, os.replace, artifacts._write_durably
    monkeypatch.setattr(artifacts, "fsync_path", lambda p: (done.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(artifacts, "_write_durably", lambda p, t: (done.append(("write", p.name)), real_write(p, t)))
    monkeypatch.setattr(artifacts.os, "replace", lambda a, b: (done.append(("rename", Path(b).name)), real_replace(a, b)))
    version = build(slow_stage, slow_stage.Config(seconds=0), [], ArtifactStore(tmp_path / "store")).artifact.version
    rename = done.index(("rename", version))
    before, after = done[:rename], done[rename + 1:]
    assert {("fsync", f"part-{i}.txt") for i in range(4)} <= set(before)
    assert before.index(("write", "manifest.json")) < before.index(("write", "COMMITTED"))
    assert ("fsync", version) in before  # the staging directory's entries
    assert ("fsync", "slow") in after  # the directory the rename changed


def test_two_machines_on_one_shared_folder_build_once(slurm_cluster, tmp_path):  # noqa: F811
    """The same, from two "machines": each build runs on its own node of the local cluster (network namespaces
    with their own hostnames and addresses). They share one kernel, so this checks the lock across hosts' names
    and processes, not NFS's own locking."""
    log = tmp_path / "log"
    runs = []
    for node in slurm_cluster.nodes:
        runs.append(subprocess.Popen(["bash", str(SCRIPT), "exec", node, "env", f"PYTHONPATH={REPO}:{REPO / 'tests'}",
                                      f"SLOW_STAGE_LOG={log}", sys.executable, "-c", BUILD, str(tmp_path / "store"),
                                      "a", "3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        wait_for(lambda: events(log))  # node1 is building before node2 asks
    results = sorted(finish(r)[0] for r in runs)
    assert results == ["built", "reused"] and events(log) == ["start a", "end a"]
    locks = list((tmp_path / "store" / "slow" / ".staging").glob("*.lock"))
    assert len(locks) == 1 and locks[0].read_text().split()[0] in slurm_cluster.nodes  # the last holder: a node
