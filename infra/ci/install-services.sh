#!/usr/bin/env bash
# Debian packages that tests/test_server.py (PostgreSQL), tests/test_ui.py (headless Chromium driven
# through ChromeDriver) and tests/test_cluster.py (a two-node Slurm and ssh cluster in network namespaces,
# infra/cluster/local_cluster.sh) need. `make test` (and so CI) calls it first, so those tests run instead of
# skipping; on a developer machine it installs only what is missing (as root, or through sudo).
# Measured on the dev machine: chromium + chromium-driver 59 s with apt-get update; postgresql ~15 s more.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# Debian keeps initdb and pg_ctl under /usr/lib/postgresql/<major>/bin, off PATH
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql)
# The local cluster: Slurm's daemons and client tools (sbatch, srun, squeue, sinfo), munge that authenticates
# them, an sshd per node with pdsh on top (DeepSpeed's multi-node launcher), ip for the namespaces. sshd and the
# daemons live in /usr/sbin, off a user's PATH, hence the paths. The packages' own services are not used: the
# tests start their own daemons on their own configuration (where systemd runs, Debian starts and enables
# those services on install, sshd on port 22 included; the tests neither need nor touch them).
# Without their recommends: slurm-wlm-plugins would bring HDF5 and InfluxDB libraries, openssh-server systemd's
# PAM module and logind, none of which the local cluster uses (its plugins are all in slurm-wlm-basic-plugins).
cluster=()
[ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1 || cluster+=(slurm-wlm)
[ -x /usr/sbin/munged ] || cluster+=(munge)
[ -x /usr/sbin/sshd ] || cluster+=(openssh-server)
command -v ssh >/dev/null 2>&1 || cluster+=(openssh-client)
command -v pdsh >/dev/null 2>&1 || cluster+=(pdsh)
command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || cluster+=(iproute2)

if [ ${#need[@]} -eq 0 ] && [ ${#cluster[@]} -eq 0 ]; then
    echo "install-services: chromium, chromium-driver, postgresql and the cluster's packages are already installed"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-services: not root and no sudo; tests that need ${need[*]} ${cluster[*]} will skip" >&2
        exit 0
    fi
    sudo="sudo"
fi
echo "install-services: apt-get install ${need[*]} ${cluster[*]}"
$sudo apt-get update -qq
# The tests start their own PostgreSQL cluster on a free port; the package's own cluster is not used.
if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ${#cluster[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${cluster[@]}" >/dev/null
fi
