"""The `slurm_cluster` fixture: a two-node Slurm and ssh cluster on this machine (infra/cluster/local_cluster.sh),
up for a test module and always taken down after it.

    from cluster import slurm_cluster  # noqa: F401  (a fixture)

    def test_x(slurm_cluster, tmp_path):
        env = {**os.environ, **slurm_cluster.env}                  # SLURM_CONF, PATH with STATE_DIR/bin first
        job = subprocess.check_output(["sbatch", "--parsable", "--nodes=2", "--wrap", "srun hostname"], env=env)
        slurm_cluster.wait_for_jobs([job.strip()], timeout=30)    # -> {"1": "COMPLETED"}
        slurm_cluster.run_on("c2c-node1", ["pdsh", "-R", "ssh", "-w", "c2c-node2", "hostname"])

Skips when not root or when Debian's Slurm, munge, sshd, pdsh or iproute2 are missing
(`bash infra/ci/install-services.sh` installs them).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "infra" / "cluster" / "local_cluster.sh"
LOCK = "/tmp/crawl2chat-local-cluster.lock"
NEEDS = ("ip", "unshare", "munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol",
         "scancel", "/usr/sbin/sshd", "ssh-keygen", "pdsh")


@dataclass
class LocalCluster:
    state_dir: Path
    nodes: tuple[str, ...] = ("c2c-node1", "c2c-node2")
    addresses: tuple[str, ...] = ("10.77.0.11", "10.77.0.12")
    env: dict[str, str] = field(init=False)

    def __post_init__(self):
        # What a process needs to use the cluster: Slurm's commands find it through SLURM_CONF; ssh (and so
        # pdsh -R ssh and DeepSpeed's launcher) is STATE_DIR/bin/ssh, which knows the key and the node names.
        self.env = {"SLURM_CONF": str(self.state_dir / "slurm.conf"),
                    "PATH": f"{self.state_dir / 'bin'}:{os.environ['PATH']}"}

    def run_on(self, node: str, cmd: list[str] | str, **kw) -> subprocess.CompletedProcess:
        """Run cmd (a list, or a string for sh -c) on node: in its network namespace, under its hostname, with
        self.env on top of os.environ. Captures text output and times out after 60 s unless told otherwise."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        kw = {"env": {**os.environ, **self.env}, "capture_output": True, "text": True, "timeout": 60, **kw}
        return subprocess.run(["bash", str(SCRIPT), "exec", node, *cmd], **kw)

    def wait_for_jobs(self, job_ids: list[str], timeout: float = 60) -> dict[str, str]:
        """Poll until no job of job_ids (an array's tasks included) is pending or running; returns
        {job id: state} from `scontrol show job` (no accounting database here, so no sacct)."""
        env = {**os.environ, **self.env}
        deadline = time.monotonic() + timeout
        while True:
            queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], env=env,
                                    capture_output=True, text=True, timeout=30).stdout.split()
            if not queued:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {queued} still queued after {timeout} s")
            time.sleep(0.5)
        states = {}
        for job_id in job_ids:
            out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True,
                                 text=True, timeout=30).stdout
            for line in out.splitlines():  # one line per array task
                fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
                task = fields.get("ArrayTaskId")
                key = f"{fields['ArrayJobId']}_{task}" if task else fields["JobId"]
                states[key] = fields["JobState"]
        return states

    def down(self) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), "down", str(self.state_dir)], capture_output=True, text=True,
                              timeout=60, check=True)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local cluster needs root (network namespaces, daemons as root)")
    missing = [c for c in NEEDS if shutil.which(c) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: run `bash infra/ci/install-services.sh`")
    # root without CAP_NET_ADMIN/CAP_SYS_ADMIN (an unprivileged container) cannot make namespaces: skip, not fail
    probe = subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine cannot create network namespaces ({probe.stderr.strip()}): the local cluster "
                    f"needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (a privileged container)")
    # One such cluster per machine (its namespace names are fixed): a second pytest run waits here for the first
    lock = open(LOCK, "w")
    deadline = time.monotonic() + 1800
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                pytest.fail(f"another test run has held the local cluster ({LOCK}) for 30 minutes")
            time.sleep(1)
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up", str(cluster.state_dir)], capture_output=True, text=True,
                            timeout=120)
        assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield cluster
    finally:
        cluster.down()
        lock.close()  # releases the flock
