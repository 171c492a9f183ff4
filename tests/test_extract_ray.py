"""stages.extract with executor="ray" (datatrove's RayPipelineExecutor) gives the same documents, exclusions and funnel
as the local executor, on three small WARCs where both dedups fire: on a local Ray instance, and on a two-node Ray
cluster in the local Slurm cluster's nodes (tests/cluster.py; skips without root or its Debian packages) with the
driver on the head node, where the tasks run on both nodes.

Skipped when Ray is not installed (`pip install ray`): Ray is an optional extra, only the cluster path needs it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster import slurm_cluster  # noqa: F401  (a fixture)
from extract_fixture import (TASKS, assert_same_output, download_artifact, local_run,  # noqa: F401  (fixtures)
                             run_extract)

try:
    import ray
except ImportError:  # not installed, or installed but broken
    pytest.skip("Ray is not importable: `pip install ray` to test extract's executor='ray'", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")  # datatrove vs tldextract 5


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray instance with 2 CPUs, shut down after the module. `memory` is Ray's logical reservation, not a
    limit: datatrove asks 2 GB per task by default, which a small CI box might not have to offer, leaving the tasks
    unscheduled; these tasks use a few hundred MB."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the Ray project (no network here)
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, _memory=8 << 30, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def test_ray_executor_matches_local(download_artifact, local_run, local_ray, tmp_path):
    on_ray, ray_out = run_extract(tmp_path, download_artifact, "ray", executor="ray")
    assert_same_output(on_ray, ray_out, local_run)
    for stage in TASKS:
        executor = json.loads((ray_out / "logs" / stage / "executor.json").read_text())
        assert "ray_remote_kwargs" in executor, stage  # every stage ran as Ray tasks (RayPipelineExecutor)


REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.prefix) / "bin" / "ray"
HEAD = "10.77.0.11"  # c2c-node1 in the local cluster (tests/cluster.py); c2c-node2 is 10.77.0.12
# Each node offers 1 CPU and 2 GB to Ray tasks, and each datatrove task asks for 1 CPU and 1 GB: one task per node
# at a time, so a pipeline's two tasks land on different nodes. 300 MB of object store: the tasks pass only stats.
NODE = ["--num-cpus=1", f"--memory={2 << 30}", f"--object-store-memory={300 << 20}", "--disable-usage-stats"]
DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
import ray._private.state
from extract_fixture import run_extract
from stages.artifacts import Artifact
stats, _ = run_extract(Path(sys.argv[1]), Artifact("download", "handmade", Path(sys.argv[2])), "ray", executor="ray",
                       slurm_cpus_per_task=1, slurm_mem_per_cpu_gb=1)
workers = [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "RankWorker"]  # one per task
print("RESULT", json.dumps({"stats": stats, "nodes": [a["Address"]["IPAddress"] for a in workers]}))
"""


@pytest.fixture
def ray_on_two_nodes(slurm_cluster):
    """A Ray cluster on the local cluster's nodes: the head (GCS, raylet) in c2c-node1, a worker raylet in c2c-node2.
    Stopped on both nodes after the test (and `down` would end whatever is left in the namespaces)."""
    temp = tempfile.mkdtemp(prefix="c2c-ray-", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    # Ray >= 2.5x authenticates its RPCs with a token: one for the head, the worker and the driver, given here rather
    # than read from ~/.ray/auth_token, which a local ray.init() may have written for a cluster of its own
    env = {**os.environ, **slurm_cluster.env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    try:
        for node, cmd in (("c2c-node1", ["--head", f"--node-ip-address={HEAD}", "--port=6379",
                                         "--include-dashboard=false", f"--temp-dir={temp}"]),
                          ("c2c-node2", [f"--address={HEAD}:6379", "--node-ip-address=10.77.0.12"])):
            started = slurm_cluster.run_on(node, [str(RAY), "start", *cmd, *NODE], env=env, timeout=120)
            assert started.returncode == 0, f"ray start on {node}:\n{started.stdout}\n{started.stderr}"
        yield {**env, "RAY_ADDRESS": f"{HEAD}:6379"}
    finally:
        stop_ray(slurm_cluster.nodes)
        shutil.rmtree(temp, ignore_errors=True)


def stop_ray(nodes) -> None:
    """End the Ray processes of the nodes' namespaces only. Not `ray stop`: it matches processes by name across the
    machine (the nodes share its PID namespace), so it would also end the local_ray fixture's instance and any other
    Ray on the machine. slurmd, sshd and munged have no "ray" in their command lines; Ray's workers, raylet and GCS
    do (the venv's ray package, ray::, or the c2c-ray- temp dir)."""
    def ray_pids() -> list[int]:
        found = []
        for node in nodes:
            for pid in subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split():
                try:
                    if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes().lower():
                        found.append(int(pid))
                except OSError:  # gone meanwhile
                    continue
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ray_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while ray_pids() and time.monotonic() < deadline:
            time.sleep(0.2)


def test_ray_on_two_nodes_matches_local(slurm_cluster, ray_on_two_nodes, download_artifact, local_run, tmp_path):
    # The stage's driver runs in c2c-node1 as on a cluster's head node, its outputs on the shared filesystem
    cmd = [sys.executable, "-c", DRIVER, str(tmp_path), str(download_artifact.path)]
    driver = slurm_cluster.run_on("c2c-node1", cmd, env=ray_on_two_nodes, cwd=REPO, timeout=300)
    assert driver.returncode == 0, driver.stderr[-5000:]
    result = json.loads(driver.stdout.split("RESULT ", 1)[1])
    assert_same_output(result["stats"], tmp_path / "ray", local_run)
    assert len(result["nodes"]) == sum(TASKS.values())  # one Ray actor per datatrove task
    assert sorted(set(result["nodes"])) == [HEAD, "10.77.0.12"], result["nodes"]
