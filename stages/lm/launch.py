"""Run a training stage in several processes (GPUs, nodes) through the `deepspeed` launcher or Slurm's srun.

stages.common.build stays the one place that plans a version and commits it; only the middle step, the stage's
run() into the staging directory, moves into N child processes:

    parent (build):   plan version -> write job.json -> launcher -> N x `python -m stages.lm.launch job.json`
                      -> read rank 0's stats.json -> commit
    child (rank r):   rebuild Config and inputs from job.json, check they give the planned version, run the
                      stage into the staging directory; rank 0 writes stats.json (the stage writes its outputs
                      on rank 0 only)

Launch settings come from the environment, never from a stage Config: how many processes train an artifact
does not change its version, and one preset runs on a laptop and on a cluster unchanged. That holds because a
training stage's batch_size counts all ranks: each rank trains batch_size / world sequences a step, cut into
micro batches with gradient accumulation (trainer.plan_batch), so 1 process and N ranks train on the same
sequences every step and reach the same model up to float rounding (tests/test_launch.py; two nodes:
tests/test_multinode.py).

    CRAWL2CHAT_NPROC=2      processes per node (GPUs per node; CPU processes with DS_ACCELERATOR=cpu).
                            Unset: 1 without a hostfile (in-process, as before), every slot of the hostfile with one,
                            the allocation's tasks per node under srun.
    CRAWL2CHAT_HOSTFILE=H   a DeepSpeed hostfile (`host slots=8` per line): nodes reached over ssh by pdsh
    CRAWL2CHAT_LAUNCHER     deepspeed (default) or srun: inside a Slurm allocation, one task per GPU on every
                            node of the allocation (see infra/slurm/pretrain.sbatch)
    CRAWL2CHAT_MASTER_ADDR  address of rank 0 (default: 127.0.0.1 on one node; first host otherwise)
    CRAWL2CHAT_MASTER_PORT  rendezvous port (default: a free local port on one node, 29500 across nodes)

    CRAWL2CHAT_NPROC=2 python -m stages.pretrain --root artifacts --input tokenize_shards \
        --input train_tokenizer --set depth=1 --set steps=20     # two CPU ranks on one machine

Several nodes need the artifact store (or, for a remote root, CRAWL2CHAT_CACHE) on a filesystem every node
mounts: the children read the inputs and write the staging directory and its DeepSpeed checkpoints there.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.artifacts import Artifact, plan_version
from stages.common import StageError, config_dict, recipe_dict

log = logging.getLogger("crawl2chat")

# Stages whose run() splits its data by RANK/WORLD_SIZE and writes its outputs on rank 0 only. Others would
# train every rank on the same batches and write the same files from every rank at once, so they keep
# running in-process until they do. rl: each rank samples its own prompts (grpo/ppo) or pairs (dpo).
RANK_AWARE = frozenset({"pretrain", "sft", "reward_model", "rl"})
LAUNCHERS = ("deepspeed", "srun")
DEFAULT_PORT = 29500  # torch.distributed's usual port; only used across nodes, where a free local one won't do
JOB, STATS = "job.json", "stats.json"
CHILD_MODULE = "stages.lm.launch"  # this file, run by every rank as `python -m`
IN_RANK_ENV = "CRAWL2CHAT_IN_LAUNCHED_RANK"  # set by child_main: this process is one rank of a launched job
# Variables (names or prefixes) the ranks on other nodes need from the parent's environment. DeepSpeed's pdsh
# launcher passes on only PYTHON*, UCX*, MLFLOW*, MV2* (and NCCL* on CUDA): over ssh a rank otherwise has the
# login environment, so a CPU rank would not know DS_ACCELERATOR and would take every core (OMP_NUM_THREADS).
# PATH: the parent's tools, as srun and the one-node launcher give them (the venv's ninja first: trainer.py says
# why).
FORWARD_ENV = ("CRAWL2CHAT_", "DS_ACCELERATOR", "OMP_NUM_THREADS", "GLOO_", "NCCL_", "TORCH_", "PATH")


@dataclass(frozen=True)
class Launch:
    """How many processes run a training stage, and how they are started. Read by from_env()."""

    nproc: int | None = None         # processes per node; None: 1 without a hostfile, its slots with one
    hostfile: str | None = None      # DeepSpeed hostfile: "host slots=N" lines, nodes reached over ssh (pdsh)
    launcher: str = "deepspeed"      # or "srun": one task per process on every node of the Slurm allocation
    master_addr: str | None = None   # rank 0's address; None: 127.0.0.1 on one node, else the first host
    master_port: int | None = None   # None: a free port on one node, DEFAULT_PORT across nodes

    def __post_init__(self):
        if self.nproc is not None and self.nproc < 1:
            raise ValueError(f"CRAWL2CHAT_NPROC must be at least 1, not {self.nproc}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"CRAWL2CHAT_LAUNCHER must be one of {', '.join(LAUNCHERS)}, not {self.launcher!r}")
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            raise ValueError(f"CRAWL2CHAT_HOSTFILE {self.hostfile} does not exist: write one like "
                             f"infra/hostfile.example or unset it for one node")
        if self.hostfile is not None and self.launcher == "srun":
            raise ValueError("CRAWL2CHAT_HOSTFILE and CRAWL2CHAT_LAUNCHER=srun exclude each other: srun takes "
                             "the nodes of the Slurm allocation; unset one of them")

    @property
    def distributed(self) -> bool:
        """False: run in-process with one rank, exactly as without this module."""
        return (self.nproc or 1) > 1 or self.hostfile is not None or self.launcher == "srun"

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] = os.environ) -> "Launch":
        def number(name: str) -> int | None:
            raw = env.get(name, "").strip()
            if not raw:
                return None
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a whole number") from None

        try:
            return cls(nproc=number("CRAWL2CHAT_NPROC"),
                       hostfile=env.get("CRAWL2CHAT_HOSTFILE") or None,
                       launcher=env.get("CRAWL2CHAT_LAUNCHER") or "deepspeed",
                       master_addr=env.get("CRAWL2CHAT_MASTER_ADDR") or None,
                       master_port=number("CRAWL2CHAT_MASTER_PORT"))
        except ValueError as e:  # build's callers report StageErrors as one line, not a traceback
            raise StageError(str(e)) from None


def wants_launch(stage: types.ModuleType, cfg: Any, settings: Launch) -> bool:
    """Whether build should hand this stage to run_stage instead of calling stage.run in-process."""
    # Not "RANK" in os.environ: a stage trained in-process sets RANK=0 for DeepSpeed (trainer.make_engine) and
    # leaves it, so every later build in that process (a flow's next stage) would silently stay in-process.
    if not settings.distributed or os.environ.get(IN_RANK_ENV):  # already one rank of a launched job: stay put
        return False
    if stage.NAME not in RANK_AWARE:
        if "TrainConfig" in {c.__name__ for c in type(cfg).__mro__}:
            log.warning("%s runs in one process: it does not split its data by rank yet", stage.NAME)
        return False
    return True


# ---- parent side ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(settings: Launch, job: Path) -> tuple[list[str], dict[str, str]]:
    """The command that starts every rank of `python -m stages.lm.launch job`, and the extra environment."""
    env: dict[str, str] = {}
    if settings.launcher == "srun":
        if "SLURM_JOB_ID" not in os.environ:
            raise ValueError("CRAWL2CHAT_LAUNCHER=srun outside a Slurm allocation: submit "
                             "infra/slurm/pretrain.sbatch, or unset it")
        # One task per process on every node; the children map SLURM_PROCID etc. to RANK etc. (_env_from_slurm).
        # Unset, the processes per node are the allocation's tasks per node (sbatch --ntasks-per-node), else
        # its GPUs per node (0 on a CPU allocation: then 1).
        per_node = (settings.nproc or int(os.environ.get("SLURM_NTASKS_PER_NODE") or 0)
                    or int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) or 1)
        first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()[0]
        env.update(MASTER_ADDR=settings.master_addr or first, MASTER_PORT=str(settings.master_port or DEFAULT_PORT))
        cmd = ["srun", f"--nodes={os.environ['SLURM_JOB_NUM_NODES']}", f"--ntasks-per-node={per_node}"]
        # Slurm 22.05-23.02's srun does not take the job's --cpus-per-task (measured: 1 CPU a task on 22.05.8),
        # and with core binding each rank would get one core: pass it on.
        if os.environ.get("SLURM_CPUS_PER_TASK"):
            cmd.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
        # --kill-on-bad-exit: one failed rank ends the step instead of leaving the rest waiting in a collective.
        cmd += ["--kill-on-bad-exit=1", sys.executable, "-u", "-m", CHILD_MODULE, str(job)]
        return cmd, env
    # The deepspeed launcher (deepspeed/launcher/runner.py): --module runs `python -m`; --no_local_rank leaves
    # out the --local_rank=N argument (LOCAL_RANK is in the environment). Without a hostfile it starts
    # --num_gpus processes on this machine whatever the accelerator, so on CPU it is N gloo ranks.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--module", "--no_local_rank"]
    if settings.hostfile:
        cmd += ["--hostfile", settings.hostfile, "--master_port", str(settings.master_port or DEFAULT_PORT)]
        if settings.master_addr:
            cmd += ["--master_addr", settings.master_addr]
        if settings.nproc:
            cmd += ["--num_gpus", str(settings.nproc)]
    else:
        # The runner ignores --num_gpus when CUDA_VISIBLE_DEVICES is set unless given as --include instead.
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if visible:
            if settings.nproc > len(visible):
                raise ValueError(f"CRAWL2CHAT_NPROC={settings.nproc} but CUDA_VISIBLE_DEVICES lists only "
                                 f"{len(visible)} GPUs: lower CRAWL2CHAT_NPROC or widen CUDA_VISIBLE_DEVICES")
            cmd += ["--include", "localhost:" + ",".join(visible[:settings.nproc])]
        else:
            cmd += ["--num_gpus", str(settings.nproc)]
        cmd += ["--master_port", str(settings.master_port or _free_port())]
    return cmd + [CHILD_MODULE, str(job)], env


def node_env_file(work: Path, env: typing.Mapping[str, str]) -> Path:
    """The environment for the ranks on every node of a hostfile launch, as a DeepSpeed env file; returns it.

    DeepSpeed's runner exports, besides its own prefixes, the NAME=value lines of ~/.deepspeed_env and
    ./.deepspeed_env (DS_ENV_FILE renames them). This file holds those lines, then the FORWARD_ENV variables of
    `env` (DS_ACCELERATOR only when the user set it: trainer.ACCELERATOR_FROM_USER); the parent points DS_ENV_FILE at it (an absolute path, so both of the runner's look-ups read it).
    The runner puts each value in double quotes on the remote command line: values with characters the shell
    would still expand there are left out, with a warning."""
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    lines = []
    for folder in dict.fromkeys([Path.home(), Path.cwd()]):  # the user's own files, as the runner reads them
        if (folder / name).is_file():
            lines += [line for line in (folder / name).read_text().splitlines() if "=" in line]
    from stages.lm.trainer import ACCELERATOR_FROM_USER  # DeepSpeed's import is not for every stage's build

    for key, value in env.items():
        if not key.startswith(FORWARD_ENV) or (key == "DS_ACCELERATOR" and not ACCELERATOR_FROM_USER):
            continue
        if any(c in value for c in '"$`\\\n'):
            log.warning("%s is not passed on to the other nodes: its value has characters the remote shell "
                        "would expand; set it in their login environment", key)
            continue
        lines.append(f"{key}={value}")
    path = work / "deepspeed_env"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def remove_shm_buffers(master_port: str) -> list[Path]:
    """Unlink the shared-memory buffers that DeepSpeed's CPU all-reduce op left for a run; returns them.

    With every rank on one machine, each rank's deepspeed.initialize creates a 66 MB POSIX shared-memory segment,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (deepspeed/ops/csrc/cpu/comm/
    shm.cpp), and nothing ever unlinks it (DeepSpeed 0.19). The port is fresh per launch, so every CPU launch
    leaked world x 66 MB of RAM: a day of test runs filled 19 GB of /dev/shm, and the swapless machine stalled.
    Called once the ranks are gone; a GPU launch creates none, and neither do ranks on several nodes or under
    srun: the op makes its segment only when the deepspeed launcher's LOCAL_SIZE equals the world size (every
    CPU rank still builds or loads the op, though)."""
    buffers = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"))
    for buffer in buffers:
        buffer.unlink(missing_ok=True)
    return buffers


def launch_dir(out: Artifact) -> Path:
    """Next to the staging directory, never inside it (everything there becomes part of the artifact)."""
    return out.path.with_name(out.path.name + ".launch")


def importable_name(stage: types.ModuleType) -> str:
    """The name the ranks import the stage by; under `python -m stages.pretrain` its __name__ is "__main__"."""
    name = stage.__spec__.name if stage.__spec__ is not None else stage.__name__
    if name == "__main__":
        raise StageError(f"{stage.__file__} was run as a script: run it as `python -m stages.{stage.NAME}` so the "
                         f"launched ranks can import it")
    return name


def run_stage(stage: types.ModuleType, cfg: Any, inputs: list[Artifact], out: Artifact, settings: Launch) -> dict:
    """stage.run(cfg, *inputs, out=out) in the processes `settings` asks for; rank 0's stats."""
    work = launch_dir(out)
    shutil.rmtree(work, ignore_errors=True)  # a crashed attempt's stats must not pass for this one's
    work.mkdir(parents=True)
    job = {"stage_module": importable_name(stage), "config": config_dict(cfg),
           "inputs": [{"stage": a.stage, "version": a.version, "path": str(a.path)} for a in inputs],
           "out": {"stage": out.stage, "version": out.version, "path": str(out.path)},
           "stats": str(work / STATS)}
    (work / JOB).write_text(json.dumps(job, indent=2, default=str))
    from stages.lm.trainer import clear_stale_build_locks  # DeepSpeed's import is not for every stage's build
    clear_stale_build_locks()  # before any rank starts: a killed build's lock would hang them all, silently
    cmd, extra_env = launcher_command(settings, work / JOB)
    env = {**os.environ, **extra_env}
    if "DS_ACCELERATOR" not in env:  # the runner picks its accelerator at import, before our code runs
        import torch
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    if settings.hostfile:  # ranks on other nodes start from ssh's login environment
        env["DS_ENV_FILE"] = str(node_env_file(work, env))
    log.info("%s: launching %s", out.ref, " ".join(cmd))
    # The ranks' output goes through this process's logger line by line, so a flow run's logs (Prefect captures
    # the crawl2chat logger) show what the launcher and DeepSpeed print, not only the terminal that started it.
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        try:
            for line in proc.stdout:
                if log.isEnabledFor(logging.INFO):
                    log.info("%s", line.rstrip())
                else:  # nobody configured logging (a library call): keep the ranks' output on the terminal
                    sys.stderr.write(line)
        except BaseException:
            # Interrupted here (Ctrl-C, a timeout, a cancelled flow run): leaving the `with` waits for the
            # launcher, and its ranks may never end (deepspeed's local runner passes no signal on), so end the
            # whole tree: SIGTERM, then SIGKILL after 30 s.
            from deepspeed.launcher.launch import terminate_process_tree
            terminate_process_tree(proc.pid)
            raise
        finally:
            port = extra_env.get("MASTER_PORT") or ("--master_port" in cmd and cmd[cmd.index("--master_port") + 1])
            if port:
                remove_shm_buffers(port)
    rc = proc.returncode
    if rc != 0 or not (work / STATS).exists():
        raise StageError(f"{out.ref}: the launched ranks failed (exit code {rc}; their output is above). "
                         f"Fix the cause and run it again: it resumes from the newest checkpoint in {out.path}")
    stats = json.loads((work / STATS).read_text())
    shutil.rmtree(work)
    return stats


# ---- child side -----------------------------------------------------------------------------------------------
def _env_from_slurm() -> None:
    """Under srun there is no launcher to set torch.distributed's variables: derive them from Slurm's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                      WORLD_SIZE=os.environ["SLURM_NTASKS"])
    if "SLURM_NTASKS_PER_NODE" in os.environ:  # set because launcher_command passes --ntasks-per-node
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["SLURM_NTASKS_PER_NODE"]


def config_from_dict(cls: type, values: dict) -> Any:
    """The inverse of dataclasses.asdict for a flat stage Config: JSON lists back to the tuples they were."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            raise ValueError(f"job config lacks {f.name}: the parent ran other code than this child")
        value, hint = values[f.name], hints[f.name]
        kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if isinstance(value, list) and any(typing.get_origin(k) is tuple for k in kinds):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def child_main(job_path: str) -> None:
    os.environ[IN_RANK_ENV] = "1"
    _env_from_slurm()  # a no-op when the deepspeed launcher already set RANK
    job = json.loads(Path(job_path).read_text())
    stage = importlib.import_module(job["stage_module"])
    cfg = config_from_dict(stage.Config, job["config"])
    inputs = [Artifact(a["stage"], a["version"], Path(a["path"])) for a in job["inputs"]]
    out = Artifact(job["out"]["stage"], job["out"]["version"], Path(job["out"]["path"]))
    host = socket.gethostname()
    version = plan_version(stage.NAME, stage.CODE_VERSION, recipe_dict(cfg), inputs)  # as build planned it
    if version != out.version:  # a different checkout on this node, or a config that did not survive JSON
        raise SystemExit(f"rank {os.environ.get('RANK')} on {host}: job {job_path} plans {out.ref} but this node's "
                         f"code and config give version {version}: run every node from the same checkout")
    import torch  # here: build imports this module for every stage, data stages too
    import torch.distributed as dist

    log.info("rank %s of %s on %s: local rank %s, %d torch threads, %s", os.environ.get("RANK"),
             os.environ.get("WORLD_SIZE"), host, os.environ.get("LOCAL_RANK"), torch.get_num_threads(), out.ref)
    stats = stage.run(cfg, *inputs, out=out)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if int(os.environ.get("RANK", 0)) == 0:
        tmp = Path(job["stats"] + ".tmp")
        tmp.write_text(json.dumps({**stats, "world_size": world}, default=str))
        os.replace(tmp, job["stats"])  # whole or absent: the parent never reads half a file
    if dist.is_initialized():
        dist.barrier()  # rank 0's files are written before any rank exits and the launcher reports success
        dist.destroy_process_group()


if __name__ == "__main__":
    _env_from_slurm()  # first, so the log lines below carry the rank under srun too
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {os.environ.get('RANK', '?')} %(message)s")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m stages.lm.launch JOB.json  (written by stages.lm.launch.run_stage)")
    child_main(sys.argv[1])
