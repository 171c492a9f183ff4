"""The local two-node cluster (infra/cluster/local_cluster.sh, fixture in tests/cluster.py) behaves like two machines:
a Slurm job spans both nodes and srun reaches both, an array's tasks spread over them, each node reaches the
other over ssh and pdsh, and `down` leaves nothing behind. ~15 s; skips without root or the Debian packages
(`bash infra/ci/install-services.sh`)."""

import os
import subprocess
import sys
from pathlib import Path

from cluster import SCRIPT, slurm_cluster  # noqa: F401  (a fixture)


def sbatch(cluster, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], env={**os.environ, **cluster.env}, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return out.strip().split(";")[0]  # "id" or "id;cluster"


def test_job_spans_both_nodes(slurm_cluster, tmp_path):
    # The batch step runs on c2c-node1 and its srun starts one task per node: node2's slurmd connects back to
    # srun's I/O ports on node1's address
    job = sbatch(slurm_cluster, "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/out", "--wrap",
                 "srun hostname")
    assert slurm_cluster.wait_for_jobs([job], timeout=30) == {job: "COMPLETED"}
    assert sorted((tmp_path / "out").read_text().split()) == ["c2c-node1", "c2c-node2"]


def test_array_tasks_land_on_both_nodes(slurm_cluster, tmp_path):
    # Each task takes a whole node (2 CPUs) for 2 s, so two run at a time, one per node
    job = sbatch(slurm_cluster, "--array=0-3", "--cpus-per-task=2", f"--output={tmp_path}/task_%a", "--wrap",
                 "hostname; sleep 2")
    states = slurm_cluster.wait_for_jobs([job], timeout=45)
    assert states == {f"{job}_{i}": "COMPLETED" for i in range(4)}
    hosts = [(tmp_path / f"task_{i}").read_text().strip() for i in range(4)]
    assert set(hosts) == {"c2c-node1", "c2c-node2"}, hosts


def test_ssh_and_pdsh_between_nodes(slurm_cluster):
    ssh = slurm_cluster.run_on("c2c-node1", ["ssh", "c2c-node2", "hostname"])
    assert (ssh.returncode, ssh.stdout.strip()) == (0, "c2c-node2"), ssh.stderr
    # By address too, and the checkout's venv runs there (same filesystem)
    py = slurm_cluster.run_on("c2c-node1", ["ssh", "10.77.0.12", sys.executable, "-c",
                                            "'import socket; print(socket.gethostname())'"])
    assert (py.returncode, py.stdout.strip()) == (0, "c2c-node2"), py.stderr
    pdsh = slurm_cluster.run_on("c2c-node1", ["pdsh", "-S", "-R", "ssh", "-w", "c2c-node1,c2c-node2", "hostname"])
    assert pdsh.returncode == 0, pdsh.stderr
    assert sorted(pdsh.stdout.splitlines()) == ["c2c-node1: c2c-node1", "c2c-node2: c2c-node2"]


def test_down_leaves_nothing(slurm_cluster):
    state = str(slurm_cluster.state_dir)
    slurm_cluster.down()  # the fixture's own `down` after this test finds nothing to do
    left = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if state in cmdline and any(d in cmdline for d in ("slurmd", "slurmctld", "sshd", "munged")):
            left.append(cmdline)
    assert not left
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not any(node in namespaces for node in slurm_cluster.nodes)
    assert subprocess.run(["ip", "link", "show", "c2c-br0"], capture_output=True).returncode != 0
    assert not any(Path("/etc/netns", node).exists() for node in slurm_cluster.nodes)
    assert subprocess.run(["bash", str(SCRIPT), "down", state], capture_output=True).returncode == 0  # idempotent
