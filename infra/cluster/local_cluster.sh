#!/usr/bin/env bash
# A two-node Slurm (and ssh) cluster on this one machine, for tests of the multi-node paths (issue 13):
#
#   bash infra/cluster/local_cluster.sh up STATE_DIR       # start it; prints how long it took (~2 s)
#   export SLURM_CONF=STATE_DIR/slurm.conf PATH=STATE_DIR/bin:$PATH
#   sbatch --nodes=2 --wrap 'srun hostname'; squeue; sinfo  # from the root namespace, as on a login node
#   bash infra/cluster/local_cluster.sh exec c2c-node1 ssh c2c-node2 hostname    # prints c2c-node2
#   bash infra/cluster/local_cluster.sh down STATE_DIR     # stop everything; safe to repeat
#
# What it builds. A bridge c2c-br0 (10.77.0.1/24 in the root namespace, c2c-host to the nodes) and two "nodes",
# c2c-node1 (10.77.0.11) and c2c-node2 (10.77.0.12): each a network namespace joined to the bridge by a veth pair.
# Why namespaces: every process of a node runs in its network namespace and in a UTS namespace whose hostname is the
# node's name, so each node has its own address, ports and hostname, as two machines would (two slurmd, two sshd
# on port 22, a job that sees which node it is on); they share the filesystem (this checkout, its .venv and
# STATE_DIR are "on a shared filesystem"). Daemons:
#   slurmctld  on c2c-node1, the head node that is also a compute node as on a small cluster: nothing listens in
#              the root namespace, its default ports cannot clash with a system Slurm, and `down` finds every
#              process of the cluster, a killed run's included, as the processes of the two namespaces
#   munged     one for the machine, on c2c-node1 too, its socket under STATE_DIR: a unix socket on the shared
#              filesystem reaches every namespace, the root one included (a system munge is left alone)
#   slurmd     one per node (Debian's slurmd is not built for several slurmd per host; a namespace each is)
#   sshd       one per node on port 22 of its address, root login with a key under STATE_DIR, so pdsh -R ssh
#              and DeepSpeed's launcher reach the other node; STATE_DIR/bin/ssh uses STATE_DIR/ssh_config
# All configuration, state, logs and pid files live under STATE_DIR; node names resolve inside the namespaces
# through /etc/netns/<node>/hosts (`ip netns exec` mounts it over /etc/hosts), the machine's /etc/hosts is not
# touched. The namespaces have no default route: their traffic stays on 10.77.0.0/24 and loopback.
#
# Needs root and Debian's slurm-wlm, munge, openssh-server, pdsh and iproute2 (`bash infra/ci/install-services.sh`).
# One such cluster per machine (the namespace names are fixed). On a real cluster none of this is needed: the
# nodes, their munge and their Slurm are the site's.
set -euo pipefail

NODES=(c2c-node1 c2c-node2)
ADDRS=(10.77.0.11 10.77.0.12)
BRIDGE=c2c-br0
BRIDGE_ADDR=10.77.0.1
SCRIPT=$(realpath "$0")
UP_TIMEOUT=60                   # seconds `up` waits for both nodes idle and both sshd answering

say() { echo "local_cluster: $*"; }
die() { echo "local_cluster: $*" >&2; exit 1; }

# on_node NODE CMD...: run CMD in NODE's network namespace with NODE as its hostname (ip, unshare and sh each
# exec the next: CMD keeps the pid)
on_node() {
    local node=$1; shift
    exec ip netns exec "$node" unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

# start NAME NODE CMD...: start a foreground daemon on NODE, detached from this shell (so from a test's captured
# output too), its output in log/NAME.out
start() {
    local name=$1 node=$2; shift 2
    setsid bash "$SCRIPT" exec "$node" "$@" </dev/null >>"$S/log/$name.out" 2>&1 &
}

# wait_for SECONDS WHAT CMD...: poll CMD until it succeeds; on timeout print the logs' tails and fail
wait_for() {
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            for f in "$S"/log/*; do echo "--- $f"; tail -n 15 "$f"; done >&2
            die "timed out waiting for $what (logs above, all under $S/log)"
        fi
        sleep 0.2
    done
}

# Processes naming STATE_DIR outside the namespaces (a daemon whose namespace went first), but not this script
# nor its callers, whose command lines may name STATE_DIR too
state_pids() {
    local p
    for p in /proc/[0-9]*; do
        case " $ANCESTORS " in *" ${p#/proc/} "*) continue ;; esac
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -qF -- "$S/" && echo "${p#/proc/}"
    done
    return 0
}

down() {
    local node pids p=$$
    ANCESTORS=""
    while [ "${p:-1}" -gt 1 ]; do
        ANCESTORS+=" $p"
        p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null)
    done
    # Every process in a node's namespace: daemons, slurmstepd and jobs, ssh sessions, whatever a test started
    for node in "${NODES[@]}"; do
        ip netns pids "$node" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
    done
    state_pids | xargs -r kill -TERM 2>/dev/null || true
    local deadline=$((SECONDS + 5))   # slurmd and munged exit within a second of TERM
    while :; do
        pids=$( { for node in "${NODES[@]}"; do ip netns pids "$node" 2>/dev/null; done; state_pids; } | sort -u)
        [ -z "$pids" ] && break
        if [ $SECONDS -ge $deadline ]; then
            echo "$pids" | xargs -r kill -KILL 2>/dev/null || true
            sleep 0.2
            break
        fi
        sleep 0.1
    done
    for node in "${NODES[@]}"; do
        ip netns del "$node" 2>/dev/null || true       # also deletes the veth pair
        ip link del "$node-v" 2>/dev/null || true
        rm -rf "/etc/netns/$node"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$S"/run/*.pid
}

write_configs() {
    local i
    # munge: a fresh key; munged refuses a key others can read, and directories others can write
    install -d -m 711 "$S/munge"
    dd if=/dev/urandom of="$S/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$S/munge/munge.key"

    # ssh: a client key authorized on every node, one host key for both nodes
    install -d -m 700 "$S/ssh"
    ssh-keygen -q -t ed25519 -N '' -C c2c-local-cluster -f "$S/ssh/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C c2c-local-cluster -f "$S/ssh/host_ed25519_key"
    cp "$S/ssh/id_ed25519.pub" "$S/ssh/authorized_keys"
    {
        for i in "${!NODES[@]}"; do printf 'Host %s\n    HostName %s\n' "${NODES[$i]}" "${ADDRS[$i]}"; done
        cat <<EOF
Host *
    User root
    IdentityFile $S/ssh/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR
EOF
    } >"$S/ssh_config"
    # sshd_config for both nodes; each sshd adds -o ListenAddress=its address. StrictModes off: STATE_DIR may
    # lie under /tmp, whose mode sshd's check rejects. No PAM: a root key login needs none.
    cat >"$S/sshd_config" <<EOF
Port 22
HostKey $S/ssh/host_ed25519_key
AuthorizedKeysFile $S/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
X11Forwarding no
PrintMotd no
Subsystem sftp internal-sftp
EOF
    install -d "$S/bin"
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s/ssh_config "$@"\n' "$S" >"$S/bin/ssh"
    chmod 755 "$S/bin/ssh"

    cat >"$S/slurm.conf" <<EOF
# Written by infra/cluster/local_cluster.sh; regenerated by every \`up\`.
ClusterName=c2c
SlurmctldHost=c2c-node1(10.77.0.11)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$S/slurm/ctld
SlurmdSpoolDir=$S/slurm/spool-%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
# No cgroups: linuxproc tracks a job's processes by parentage, task/none binds nothing (cgroup.conf says v1
# but constrains nothing; 22.05 has no CgroupPlugin=disabled).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Fast for tests: schedule every second, nodes idle as soon as they register, jobs killed 2 s after TERM
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
MessageTimeout=5
SlurmdTimeout=30
KillWait=2
# Both nodes claim both cores of this machine: oversubscribed, fine for tests
NodeName=c2c-node1 NodeAddr=10.77.0.11 CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=c2c-node2 NodeAddr=10.77.0.12 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=c2c-node1,c2c-node2 Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$S/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
}

make_network() {
    local i j node
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for i in "${!NODES[@]}"; do
        node=${NODES[$i]}
        ip netns add "$node"
        ip link add "$node-v" type veth peer name eth0 netns "$node"
        ip link set "$node-v" master "$BRIDGE" up
        ip -n "$node" addr add "${ADDRS[$i]}/24" dev eth0
        ip -n "$node" link set eth0 up
        ip -n "$node" link set lo up
        mkdir -p "/etc/netns/$node"
        {
            echo "127.0.0.1 localhost"
            echo "$BRIDGE_ADDR c2c-host"
            for j in "${!NODES[@]}"; do echo "${ADDRS[$j]} ${NODES[$j]}"; done
        } >"/etc/netns/$node/hosts"
        # No DNS server: a name not in hosts fails at once instead of being looked up anywhere
        echo "nameserver 127.0.0.1" >"/etc/netns/$node/resolv.conf"
    done
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, daemons running as root)"
    local c
    for c in ip unshare munged slurmctld slurmd sinfo /usr/sbin/sshd ssh-keygen pdsh; do
        command -v "$c" >/dev/null || die "$c is missing: run bash infra/ci/install-services.sh"
    done
    local t0=$SECONDS start_ns i node
    start_ns=$(date +%s%N)
    down                                       # a half-started cluster from before
    rm -rf "$S/munge" "$S/ssh" "$S/slurm" "$S/log" "$S/run" "$S/bin"
    mkdir -p "$S/log" "$S/run" "$S/slurm/ctld" "${NODES[@]/#/$S/slurm/spool-}"
    write_configs
    make_network
    mkdir -p /run/sshd                         # sshd's privilege-separation directory

    # --force: start even over the stale socket of a killed run, or with STATE_DIR under a world-writable /tmp
    start munged c2c-node1 munged --foreground --force --socket="$S/munge/munge.socket" \
        --key-file="$S/munge/munge.key" --pid-file="$S/run/munged.pid" --log-file="$S/log/munged.log" \
        --seed-file="$S/munge/munged.seed" --origin=127.0.0.1
    wait_for 10 munged sh -c "munge -S $S/munge/munge.socket -n | unmunge -S $S/munge/munge.socket"

    start slurmctld c2c-node1 slurmctld -D -f "$S/slurm.conf"
    for i in "${!NODES[@]}"; do
        node=${NODES[$i]}
        start "slurmd-$node" "$node" slurmd -D -f "$S/slurm.conf"
        start "sshd-$node" "$node" /usr/sbin/sshd -D -f "$S/sshd_config" -o "PidFile=$S/run/sshd-$node.pid" \
            -o "ListenAddress=${ADDRS[$i]}" -E "$S/log/sshd-$node.log"
    done

    export SLURM_CONF=$S/slurm.conf
    local left=$((UP_TIMEOUT - (SECONDS - t0)))
    wait_for $left "both nodes idle in sinfo" \
        sh -c '[ "$(sinfo -h -N -o "%N %t" | sort | tr "\n" " ")" = "c2c-node1 idle c2c-node2 idle " ]'
    for node in "${NODES[@]}"; do
        left=$((UP_TIMEOUT - (SECONDS - t0)))
        wait_for $((left > 1 ? left : 1)) "sshd on $node" "$S/bin/ssh" "$node" true
    done
    say "up in $(( ($(date +%s%N) - start_ns) / 1000000 )) ms: SLURM_CONF=$S/slurm.conf PATH=$S/bin:\$PATH"
}

case "${1:-}" in
    up|down)
        [ $# -eq 2 ] || die "usage: $0 up|down STATE_DIR"
        S=$(realpath -m "$2")
        "$1"
        [ "$1" = up ] || say "down: no process, namespace or link of the cluster left"
        ;;
    exec)
        [ $# -ge 3 ] || die "usage: $0 exec NODE CMD..."
        node=$2; shift 2
        case $node in c2c-*) ;; *) node=c2c-$node ;; esac      # node1 or c2c-node1
        [ -e "/run/netns/$node" ] || die "no node $node (is the cluster up?)"
        on_node "$node" "$@"
        ;;
    *)
        die "usage: $0 up STATE_DIR | down STATE_DIR | exec NODE CMD..."
        ;;
esac
