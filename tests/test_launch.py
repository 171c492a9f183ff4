"""Training stages in several processes (stages/lm/launch.py): pretrain on 2 CPU ranks with ZeRO 1 and 2.

The 2-rank runs go through stages.common.build with CRAWL2CHAT_NPROC=2, so the deepspeed launcher starts two
gloo ranks (DS_ACCELERATOR=cpu) and the parent commits. The first two steps are then recomputed in this process
by hand, with plain PyTorch: rank 0's first loss is the fresh model's loss on rank 0's own batch, and its second
loss is that of a model updated with the average gradient of both ranks' (disjoint) batches. So the test fails if
a rank read the wrong data, if rank 1 did not contribute, or if ZeRO averaged or clipped wrongly. And the same
recipe trained by one process gives the same version and the same losses.
"""

import dataclasses
import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

from docs_fixture import build_shards
from stages import pretrain
from stages.artifacts import Artifact, ArtifactStore
from stages.common import StageError, build, config_dict
from stages.lm import launch, trainer
from stages.lm.checkpoint import load_model
from stages.lm.data import TokenLoader
from stages.lm.gpt import GPT, GPTConfig

# depth 1, width 32, one head of 32, a 64-token context; in 10 steps at lr 3e-3 the loss falls from about
# ln(640) = 6.46 to about 5.9. eval_sequences and samples kept small: the run is about process start-up anyway.
# A batch of 16 sequences a step: 8 on each of the two ranks.
CFG = pretrain.Config(depth=1, aspect_ratio=32, head_dim=32, seq_len=64, steps=10, lr=3e-3, warmup_steps=2,
                      batch_size=16, eval_sequences=32, sample_prompts=("Once upon a time",), sample_tokens=4,
                      checkpoint_every=1000, precision="fp32")
VOCAB = 640
WORLD = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    store, _, tok, shards = build_shards(tmp_path_factory.mktemp("launch"), VOCAB)
    return {"store": store, "tok": tok.artifact, "shards": shards.artifact}


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("CRAWL2CHAT_NPROC", str(WORLD))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's torch threads: 2 ranks on 2 shared cores
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CRAWL2CHAT_HOSTFILE", "CRAWL2CHAT_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)


def first_two_losses(cfg: pretrain.Config, shards, vocab_size: int) -> tuple[float, float]:
    """The batch's loss (both ranks' mean) at steps 1 and 2 of a WORLD-rank data-parallel run, recomputed in one
    process from each rank's own batches."""
    torch.manual_seed(cfg.seed)  # as pretrain.run: the same initial weights on every rank
    model = GPT(GPTConfig.from_depth(cfg.depth, vocab_size, cfg.seq_len, cfg.aspect_ratio, cfg.head_dim,
                                     cfg.kv_ratio))
    micro = cfg.batch_size // WORLD
    loaders = [TokenLoader(shards.path, "train", cfg.seq_len, micro, seed=cfg.seed, rank=r, world_size=WORLD)
               for r in range(WORLD)]
    batches = [next(loader) for loader in loaders]
    assert not any(torch.equal(batches[0][0][i], batches[1][0][j])
                   for i in range(micro) for j in range(micro))  # disjoint windows
    losses = [model(x, y) for x, y in batches]
    # DeepSpeed all-reduces the mean of the ranks' gradients: the gradient of the mean loss
    torch.stack(losses).mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=trainer.lr_at(0, cfg.steps, cfg), betas=cfg.betas)
    opt.step()
    with torch.no_grad():
        second = torch.stack([model(*next(loader)) for loader in loaders]).mean()
    return torch.stack(losses).mean().item(), second.item()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_pretrain_on_two_ranks(world, two_ranks, zero_stage):
    cfg = dataclasses.replace(CFG, zero_stage=zero_stage)
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    res = build(pretrain, cfg, [world["shards"], world["tok"]], world["store"])
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before  # 66 MB a rank, else leaked
    s = res.stats
    assert not res.reused and s["world_size"] == WORLD
    assert s["tokens_trained"] == cfg.steps * cfg.batch_size * cfg.seq_len
    assert s["batch"] == {"sequences": 16, "world_size": WORLD, "micro_batch_size": 8, "grad_accum": 1}
    losses = [h["loss"] for h in s["curve"]]
    assert len(losses) == cfg.steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses  # 6.48 -> 5.90 measured
    expected = first_two_losses(cfg, world["shards"], VOCAB)
    assert losses[:2] == pytest.approx(expected, abs=1e-4), (losses[:2], expected)
    model, meta, _ = load_model(res.artifact.path)  # rank 0 wrote the weights; the launch files are gone
    assert meta["val_loss"] == s["val_loss"] and model.cfg.n_layer == 1
    assert not launch.launch_dir(res.artifact).exists() and not (res.artifact.path / "checkpoints").exists()


def test_rank_count_does_not_change_the_version(world, two_ranks, monkeypatch):
    """An artifact made by 2 ranks is the same recipe as a 1-rank one: reused, not rebuilt."""
    first = build(pretrain, dataclasses.replace(CFG, zero_stage=1), [world["shards"], world["tok"]], world["store"])
    monkeypatch.delenv("CRAWL2CHAT_NPROC")
    again = build(pretrain, dataclasses.replace(CFG, zero_stage=1), [world["shards"], world["tok"]], world["store"])
    assert again.reused and again.artifact.version == first.artifact.version


def metrics(artifact) -> list[dict]:
    return [json.loads(line) for line in (artifact.path / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_the_model_one_process_trains(world, two_ranks, tmp_path, monkeypatch):
    """One version, one model: 2 ranks x 8 sequences and 1 process x 2 accumulated micro batches of 8 train on the
    same 16 windows a step, so their losses agree to float rounding (the gradients are summed in another order:
    measured differences ~1e-7, asserted below 1e-6) and so do the final val losses."""
    cfg = dataclasses.replace(CFG, zero_stage=1, seed=11)
    two = build(pretrain, cfg, [world["shards"], world["tok"]], world["store"])
    monkeypatch.delenv("CRAWL2CHAT_NPROC")
    # another store, the same input artifacts: a fresh build, not a reuse of the 2-rank one
    one = build(pretrain, dataclasses.replace(cfg, micro_batch_size=8), [world["shards"], world["tok"]],
                ArtifactStore(tmp_path / "one"))
    assert one.artifact.version == two.artifact.version and not one.reused
    assert one.stats["batch"] == {"sequences": 16, "world_size": 1, "micro_batch_size": 8, "grad_accum": 2}
    a, b = metrics(two.artifact), metrics(one.artifact)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, cfg.steps + 1))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-6, [(x["loss"], y["loss"]) for x, y in zip(a, b)]
    assert abs(one.stats["val_loss"] - two.stats["val_loss"]) < 1e-6


def test_failed_ranks_commit_nothing(world, two_ranks):
    """A stage error inside the ranks reaches the caller as a StageError, and nothing is committed."""
    before = world["store"].versions("pretrain")
    with pytest.raises(StageError, match="launched ranks failed"):  # the ranks find no index.json in a tokenizer
        build(pretrain, CFG, [world["tok"], world["tok"]], world["store"])
    assert world["store"].versions("pretrain") == before


def test_settings_from_environment(tmp_path):
    assert not launch.Launch.from_env({}).distributed
    assert launch.Launch.from_env({"CRAWL2CHAT_NPROC": "4"}).nproc == 4
    with pytest.raises(StageError, match="whole number"):
        launch.Launch.from_env({"CRAWL2CHAT_NPROC": "two"})
    with pytest.raises(StageError, match="hostfile.example"):
        launch.Launch.from_env({"CRAWL2CHAT_HOSTFILE": str(tmp_path / "missing")})
    with pytest.raises(StageError, match="one of deepspeed, srun"):
        launch.Launch.from_env({"CRAWL2CHAT_LAUNCHER": "mpirun"})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    settings = launch.Launch.from_env({"CRAWL2CHAT_HOSTFILE": str(hostfile), "CRAWL2CHAT_MASTER_ADDR": "10.0.0.1"})
    cmd, env = launch.launcher_command(settings, tmp_path / "job.json")
    assert settings.distributed and env == {}
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile) and "--num_gpus" not in cmd  # every slot
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and cmd[cmd.index("--master_port") + 1] == "29500"
    assert cmd[-2:] == ["stages.lm.launch", str(tmp_path / "job.json")]


def test_slurm_task_becomes_a_rank(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(var, "unset")  # recorded first, so the undo also removes what _env_from_slurm sets
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    launch._env_from_slurm()
    assert [os.environ[v] for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")] == ["5", "1", "8", "4"]


def test_config_survives_the_job_file():
    """Tuples come back as tuples, so the child plans the parent's version (child_main checks it)."""
    cfg = dataclasses.replace(CFG, betas=(0.8, 0.9), sample_prompts=("a", "b"))
    again = launch.config_from_dict(pretrain.Config, config_dict(cfg))
    assert again == cfg and isinstance(again.sample_prompts, tuple)


def test_ranks_import_the_stage_by_its_module_name():
    """Under `python -m stages.pretrain` the stage module is __main__; the ranks must import stages.pretrain."""
    as_main = types.ModuleType("__main__")
    as_main.__spec__ = pretrain.__spec__
    assert launch.importable_name(as_main) == launch.importable_name(pretrain) == "stages.pretrain"
    script = types.ModuleType("__main__")
    script.__file__, script.NAME = "stages/pretrain.py", "pretrain"
    with pytest.raises(StageError, match="python -m stages.pretrain"):
        launch.importable_name(script)


def test_stale_build_locks_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    """A lock whose builder was killed goes; one a live builder holds open stays (torch's own FileBaton)."""
    from torch.utils.file_baton import FileBaton

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "killed_op").mkdir()
    (tmp_path / "killed_op" / "lock").touch()
    (tmp_path / "live_op").mkdir()
    live = FileBaton(str(tmp_path / "live_op" / "lock"))
    assert live.try_acquire()
    try:
        assert trainer.clear_stale_build_locks() == [tmp_path / "killed_op" / "lock"]
        assert (tmp_path / "live_op" / "lock").exists()
    finally:
        live.release()


@pytest.mark.timeout(600)  # the hang this guards against is silent and endless
def test_ranks_start_after_a_killed_build(world, two_ranks, tmp_path, monkeypatch):
    """A build of DeepSpeed's shared-memory op that was killed mid-way (its lock left behind) hung every later
    launch forever; it hung CI for 90 minutes. The extension folder here is a copy, so the user's is untouched."""
    import shutil

    from torch.utils.cpp_extension import get_default_build_root

    op = tmp_path / "torch_extensions" / "deepspeed_shm_comm"  # under TORCH_EXTENSIONS_DIR, op folders sit at the top
    built = sorted(Path(get_default_build_root()).glob("*/deepspeed_shm_comm"))
    if built:  # a copy of what is built: no ~27 s rebuild
        shutil.copytree(built[0], op, ignore=shutil.ignore_patterns("lock"))
    op.mkdir(parents=True, exist_ok=True)
    (op / "lock").touch()  # what a killed build leaves
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(op.parent))
    res = build(pretrain, dataclasses.replace(CFG, steps=2, seed=7), [world["shards"], world["tok"]], world["store"])
    assert res.stats["world_size"] == WORLD and not (op / "lock").exists()


def test_an_interrupted_parent_ends_the_ranks(world, tmp_path, monkeypatch):
    """Ctrl-C or a timeout in the parent must not leave ranks behind: deepspeed's local runner passes no signal
    on to its launcher, so run_stage ends the whole process tree."""
    import logging
    import sys

    import psutil  # deepspeed's dependency

    pid_file = tmp_path / "rank.pid"
    tree = ("import subprocess, sys, time; "
            f"r = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(r.pid)); print('ready', flush=True); time.sleep(600)")
    monkeypatch.setattr(launch, "launcher_command", lambda settings, job: ([sys.executable, "-c", tree], {}))

    def interrupt_on_ready(fmt, *args):
        if args and args[0] == "ready":
            raise KeyboardInterrupt

    monkeypatch.setattr(launch.log, "info", interrupt_on_ready)
    monkeypatch.setattr(launch.log, "isEnabledFor", lambda level: level == logging.INFO)
    out = Artifact("pretrain", "0" * 12, tmp_path / "staging")
    with pytest.raises(KeyboardInterrupt):
        launch.run_stage(pretrain, CFG, [], out, launch.Launch(nproc=2))
    rank = int(pid_file.read_text())
    assert not psutil.pid_exists(rank) or psutil.Process(rank).status() == psutil.STATUS_ZOMBIE


def test_the_other_nodes_get_the_runs_environment(tmp_path, monkeypatch):
    """A hostfile launch's env file: the user's ~/.deepspeed_env lines, then the forwarded variables; a value the
    remote shell would expand is left out; DS_ACCELERATOR only when the user chose it (else GPU nodes launched from
    a machine without a GPU would be told to run on their CPUs)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("NCCL_IB_HCA=mlx5\nnot a line\n")
    monkeypatch.chdir(tmp_path)
    env = {"OMP_NUM_THREADS": "4", "GLOO_SOCKET_IFNAME": "eth0", "CRAWL2CHAT_X": "a$b", "HOME": "/h",
           "DS_ACCELERATOR": "cpu", "PATH": "/venv/bin:/usr/bin"}
    monkeypatch.setattr(trainer, "ACCELERATOR_FROM_USER", False)
    lines = launch.node_env_file(tmp_path, env).read_text().splitlines()
    assert lines == ["NCCL_IB_HCA=mlx5", "OMP_NUM_THREADS=4", "GLOO_SOCKET_IFNAME=eth0", "PATH=/venv/bin:/usr/bin"]
    monkeypatch.setattr(trainer, "ACCELERATOR_FROM_USER", True)
    assert "DS_ACCELERATOR=cpu" in launch.node_env_file(tmp_path, env).read_text().splitlines()
