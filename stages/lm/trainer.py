"""DeepSpeed set-up shared by the training stages (pretrain, sft, reward_model, rl).

The model code (gpt.py) knows nothing of DeepSpeed; this file turns a stage's `TrainConfig` into a DeepSpeed
config (never a hand-kept JSON), builds the engine, sets the learning rate each step, and saves and resumes
checkpoints. One process is started in-process (world size 1, gloo on CPU via DS_ACCELERATOR=cpu); several
GPUs or nodes come from the `deepspeed` launcher, which sets RANK/WORLD_SIZE/MASTER_ADDR for us.

Resume is exact: a checkpoint holds the engine (weights, optimizer moments, ZeRO partitions), the loader's
position and the torch RNG, so the steps after a resume repeat an uninterrupted run's losses bit for bit. Every
step's metrics are appended to `metrics.jsonl` next to the checkpoints (the loss curve; a resume cuts it back
to the checkpoint's step) and, when a log directory is given, to TensorBoard through DeepSpeed's monitor (a
resume purges the crashed attempt's events past the checkpoint there, as SummaryWriter(purge_step=) does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# Whether DS_ACCELERATOR is the user's (or a launcher's) choice rather than the default below: launch.py passes it
# on to the ranks of other nodes only then, so GPU nodes launched from a machine without one still pick CUDA.
ACCELERATOR_FROM_USER = "DS_ACCELERATOR" in os.environ
if not torch.cuda.is_available():  # must happen before DeepSpeed picks its accelerator at import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# DeepSpeed JIT-builds its ops (on CPU, the shm all-reduce of every deepspeed.initialize) with the first `ninja` on
# PATH, and two ninja versions do not trust each other's build log: the venv's (pip, a DeepSpeed dependency) and a
# system one (Debian's 1.11 against pip's 1.13 here) each rebuilt the op where the other built it last, 35-70 s a
# time, whenever one run had the venv activated (sbatch scripts, a shell) and another not (`make test`). The venv's
# bin goes first, as `activate` would put it, so every process of a run, launched ranks included (they inherit
# PATH, and stages/lm/launch.py forwards it over ssh), builds with the same ninja.
_VENV_BIN = os.path.dirname(sys.executable)
if os.path.exists(os.path.join(_VENV_BIN, "ninja")) and os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")

import deepspeed  # noqa: E402
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from stages.common import StageError, progress, runtime  # noqa: E402
from stages.lm import memory  # noqa: E402

log = logging.getLogger("crawl2chat")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings every training stage shares. Stage Configs extend this."""

    steps: int = 1000               # optimizer steps (pretrain: 0 derives them from its token budget)
    batch_size: int = 8             # sequences (examples) per optimizer step, all ranks together: the recipe's batch
    # How the batch is cut up is a speed choice, so it stays out of the version (runtime): every step trains on
    # the same batch_size sequences whatever the ranks (world) and micro batch. plan_batch fills both before
    # training: grad_accum = batch_size / (micro_batch_size x world).
    micro_batch_size: int = runtime(0)  # sequences per rank per forward pass; 0: the whole per-rank batch on a CPU,
                                        # on a GPU the largest divisor of it that fits memory (stages/lm/memory.py)
    grad_accum: int = runtime(0)        # derived by plan_batch; setting it is an error (set batch_size)
    lr: float = 3e-4                # peak learning rate (AdamW)
    schedule: str = "cosine"        # after warm-up: "cosine" decay, or "wsd" (warmup-stable-decay, see lr_at)
    min_lr_frac: float = 0.1        # the schedule ends at lr * min_lr_frac
    decay_frac: float = 0.2         # wsd: the last 20% of steps decay linearly (MiniCPM, nanochat's warmdown)
    warmup_steps: int = 50
    weight_decay: float = 0.1       # on weight matrices (embeddings too), not on norm gains or biases
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    zero_stage: int = 0             # DeepSpeed ZeRO 0-3; 1-2 shard optimizer state/grads across ranks
    precision: str = "auto"         # auto: bf16 on a GPU that has it, else fp32; or "bf16" / "fp32"
    seed: int = 1337
    checkpoint_every: int = 200     # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2
    tensorboard: bool = True        # loss/lr/grad_norm events under <out>/tensorboard (when a stage passes a dir)

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.micro_batch_size < 0:
            raise ValueError("steps must be >= 0, batch_size at least 1 and micro_batch_size >= 0 (0: automatic)")
        if self.warmup_steps < 0 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("warmup_steps must be >= 0, checkpoint_every and keep_checkpoints at least 1")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be cosine or wsd, not {self.schedule!r}")
        if not 0 <= self.decay_frac <= 1 or not 0 <= self.min_lr_frac <= 1:
            raise ValueError("decay_frac and min_lr_frac must be between 0 and 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")

    def resolved(self):
        """This config with its hardware-dependent choices made, as the version must record them:
        stages.common.build calls it before planning the version, so an fp32 CPU build is never reused for a
        bf16 GPU request. Launched ranks get the resolved config, so they train in the precision the parent
        planned whatever their own hardware would pick."""
        return dataclasses.replace(self, precision=resolve_precision(self.precision))


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks), as the launcher set them (stages/lm/launch.py); 0 and 1 when
    a stage runs in-process. Stages split their data by these and write their outputs on rank 0."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_precision(precision: str) -> str:
    """"auto" -> what this machine trains in: bf16 on a GPU that has it, else fp32; others unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def use_bf16(cfg: TrainConfig) -> bool:
    return resolve_precision(cfg.precision) == "bf16"


def plan_batch(cfg: TrainConfig, model: torch.nn.Module | None = None, seqs_per_example: int = 1) -> TrainConfig:
    """cfg with micro_batch_size and grad_accum for this world, keeping batch_size (the recipe) exact.

    micro_batch_size=0 picks: on a GPU, the largest divisor of the per-rank batch whose estimated memory (weights,
    gradients, optimizer state after ZeRO's partitioning, activations and logits of one micro batch:
    memory.training_bytes) fits the device; elsewhere the whole per-rank batch. A micro batch given explicitly is
    checked the same way on a GPU. Fails before step 1 with the setting to change. seqs_per_example: sequences a
    model sees per example (2 for a preference pair). Each rank plans for itself: ranks on GPUs of different sizes
    would pick different micro batches, so keep a job's GPUs alike or set micro_batch_size."""
    _, world = rank_world()
    if cfg.grad_accum:
        raise StageError(f"grad_accum={cfg.grad_accum} is derived, not set: set batch_size (sequences per optimizer "
                         f"step, all ranks together) and leave grad_accum at 0")
    if cfg.batch_size % world:
        raise StageError(f"batch_size={cfg.batch_size} does not split over {world} ranks: set batch_size to a "
                         f"multiple of {world}, or run on a number of ranks that divides it")
    per_rank = cfg.batch_size // world
    if cfg.micro_batch_size and per_rank % cfg.micro_batch_size:
        raise StageError(f"micro_batch_size={cfg.micro_batch_size} does not divide the {per_rank} sequences each of "
                         f"{world} rank(s) trains per step (batch_size={cfg.batch_size}): pick a divisor of "
                         f"{per_rank}, or 0 to choose automatically")
    on_gpu = torch.cuda.is_available() and model is not None and memory.gpt_config(model) is not None
    if not on_gpu:  # CPU runs are smoke runs and tests: no estimate, the whole per-rank batch at once
        micro = cfg.micro_batch_size or per_rank
        return dataclasses.replace(cfg, micro_batch_size=micro, grad_accum=per_rank // micro)

    budget = memory.budget_bytes(device())

    def need(micro: int) -> float:
        return memory.training_bytes(model, micro * seqs_per_example, cfg.zero_stage, world, use_bf16(cfg))

    if cfg.micro_batch_size:
        micro = cfg.micro_batch_size
        if need(micro) > budget:
            raise StageError(f"micro_batch_size={micro} needs about {need(micro) / 2**30:.0f} GiB per GPU by the "
                             f"preflight estimate, more than the {budget / 2**30:.0f} GiB this GPU offers: lower "
                             f"micro_batch_size, or set it to 0 to pick the largest that fits")
    else:
        divisors = [d for d in range(per_rank, 0, -1) if per_rank % d == 0]
        micro = next((d for d in divisors if need(d) <= budget), 0)
        if not micro:
            raise StageError(f"not even one sequence per micro batch fits this GPU: about {need(1) / 2**30:.0f} GiB "
                             f"per GPU by the preflight estimate against {budget / 2**30:.0f} GiB. Shard the "
                             f"weights and optimizer state over the ranks (zero_stage=3), use more GPUs, or lower "
                             f"seq_len or depth")
    log.info("preflight: micro batch %d x %d accumulation x %d rank(s) = batch %d; about %.1f of %.1f GiB per GPU",
             micro, per_rank // micro, world, cfg.batch_size, need(micro) / 2**30, budget / 2**30)
    return dataclasses.replace(cfg, micro_batch_size=micro, grad_accum=per_rank // micro)


def ds_config(cfg: TrainConfig, log_dir: Path | None = None, job_name: str = "train") -> dict:
    """The DeepSpeed config, generated from cfg (never a hand-kept JSON). log_dir: TensorBoard's root."""
    if not cfg.micro_batch_size or not cfg.grad_accum:
        raise ValueError("the batch is not planned: pass the config through trainer.plan_batch first")
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if log_dir is not None and cfg.tensorboard:
        # events land in log_dir/job_name (rank 0 only); needs the `tensorboard` package
        config["tensorboard"] = {"enabled": True, "output_path": str(log_dir), "job_name": job_name}
    return config


def _init_single_process_env() -> None:
    """Without a launcher, act as rank 0 of 1 on a free local port. A launcher's variables are kept; any that
    are missing get single-process defaults (DeepSpeed would otherwise fall back to MPI discovery)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


def clear_stale_build_locks() -> list[Path]:
    """Remove the lock files that killed builds of torch JIT extensions left behind; returns them.

    DeepSpeed JIT-builds its C++ ops through torch.utils.cpp_extension (on CPU its shared-memory all-reduce,
    deepspeed_shm_comm, in every deepspeed.initialize; ~27 s each time the venv's path changes). Torch guards a
    build with a bare lock file (torch/utils/file_baton.py) that only the building process removes: one killed
    mid-build (SIGKILL, OOM, a CI or session teardown) leaves it, and every later build waits on it forever,
    printing nothing. That hung a CI run for 90 minutes. A live builder keeps the lock file open until it
    removes it, so a lock that no process has open is stale. Call this where no rank of ours can be building
    yet (the launcher's parent before it starts the ranks, or a single in-process rank): two cleaners at once
    could remove a lock that a third process has just taken.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = get_default_build_root()  # its <python>_<accelerator>/ subfolders hold the op folders
    locks = [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]
    if not locks or not Path("/proc/self/fd").is_dir():  # Linux only: elsewhere nothing is removed
        return []
    open_files = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's process (its builds use its own cache folder)
            continue
        for fd in fds:
            try:
                open_files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    stale = [lock for lock in locks if os.path.realpath(lock) not in open_files]
    for lock in stale:
        log.warning("removing %s: a build of that torch extension was killed and left its lock, on which every "
                    "later build would wait forever", lock)
        lock.unlink(missing_ok=True)
    return stale


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# Objects besides tensors and plain containers that DeepSpeed pickles into its checkpoints (found by loading
# ZeRO 0-3 checkpoints with weights_only=True): its loss scalers (kept in ZeRO 1-2 optimizer state even in
# fp32), the ZeRO stage enum and the fragment_address dataclass of its parameter-slice maps. Each is rebuilt
# from plain fields; none runs code when unpickled.
SAFE_CHECKPOINT_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch.save/torch.load checkpoint engine, loading with weights_only=True.

    DeepSpeed 0.19's TorchCheckpointEngine loads with torch.load(weights_only=False): a swapped-in checkpoint
    file could run any code on resume. Every file of engine.load_checkpoint (model states, ZeRO optimizer
    partitions) goes through the engine's checkpoint_engine.load, so replacing that one method makes all of
    them safe, and DeepSpeed keeps doing what it does well: ZeRO 0-3 partitioned save/load, `latest` tags,
    elastic and universal checkpoints. (Our own safetensors + torch.save(optimizer) format would cover ZeRO 0
    only; ZeRO 1-3 optimizer state is partitioned per rank in DeepSpeed's own layout.) The final weights of a
    stage are safetensors (stages/lm/checkpoint.py); these .pt files only live in staging during training.
    """

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


def make_engine(model: torch.nn.Module, cfg: TrainConfig, params=None, log_dir: Path | None = None,
                job_name: str = "train"):
    """A DeepSpeed engine around model with AdamW (weight decay on matrices, not on norm gains).

    log_dir: enables DeepSpeed's TensorBoard monitor writing under log_dir/job_name.
    """
    if os.environ.get("WORLD_SIZE", "1") == "1":  # the only rank: no other one of ours can be building now
        clear_stale_build_locks()
    _init_single_process_env()
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    decay_ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]
    # torch's AdamW rather than DeepSpeed's FusedAdam: same maths, fused on GPU, and no C++ build on CPU.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, log_dir, job_name))
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise StageError(f"DeepSpeed chose {type(engine.checkpoint_engine).__name__} for checkpoints; only its "
                         f"TorchCheckpointEngine is made weights_only-safe here: remove checkpoint engine "
                         f"settings (nebula, datastates, fast/decoupled writers) from the DeepSpeed config")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    return engine


def whole_params(model: torch.nn.Module):
    """A context in which every parameter is whole: ZeRO-3 gathers each rank's 1/world shards (a collective,
    so every rank must enter it); for ZeRO 0-2 it does nothing."""
    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of the 0-based optimizer `step` of `total`: linear warm-up over warmup_steps, then
    cosine: cosine decay from lr to lr * min_lr_frac at step `total`;
    wsd (warmup-stable-decay, MiniCPM 2024 / nanochat): lr held constant, then over the last
    round(decay_frac * total) steps a linear decay to lr * min_lr_frac at step `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_frac * total)
        if step < total - decay_steps:
            return cfg.lr
        remaining = max(0, total - step) / max(1, decay_steps)  # 1 at the decay's start, 0 at `total`
        return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * remaining)
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def local_grad_norm(engine) -> float | None:
    """Norm of the accumulated .grad tensors, before the optimizer step (ZeRO 0 keeps them on the params)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else None


def train_step(engine, micro_batches, loss_fn, cfg: TrainConfig, step: int, total: int, count_fn=None) -> dict:
    """One optimizer step over cfg.grad_accum micro-batches; loss_fn(engine, batch) -> scalar loss.

    DeepSpeed divides each micro batch's loss by grad_accum and averages the ranks' gradients, so the step trains
    on the mean of the micro batches' losses: the batch's mean when every micro batch weighs the same (pretrain's
    full windows, preference pairs). Where they do not, pass count_fn(batch) -> the units a micro batch's loss is
    averaged over (sft: its assistant tokens): loss_fn then returns the SUM over its units, and each is scaled so
    that the step's gradient is that of the mean over every unit of the whole batch, however the batch is cut
    into ranks and micro batches (one version, one model)."""
    lr = lr_at(step, total, cfg)
    set_lr(engine, lr)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    scale = None
    if count_fn is not None:
        units = torch.tensor(float(sum(count_fn(b) for b in micro_batches)), dtype=torch.float64, device=engine.device)
        if world > 1:
            torch.distributed.all_reduce(units)
        scale = cfg.grad_accum * world / max(units.item(), 1.0)  # undoes DeepSpeed's / grad_accum and / world
    loss_sum, norm = 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        loss = loss_fn(engine, batch)
        if scale is not None:
            loss = loss * scale
        engine.backward(loss)
        if i == cfg.grad_accum - 1:
            norm = local_grad_norm(engine)
        engine.step()
        loss_sum += loss.item()
    # DeepSpeed computes the global norm itself in its ZeRO and bf16 optimizers (set during step());
    # the plain fp32 path leaves it None, and then the .grad norm taken before the step is the same number.
    ds_norm = engine.get_global_grad_norm()
    norm = float(ds_norm) if ds_norm is not None else (norm or 0.0)
    loss = loss_sum / cfg.grad_accum
    if world > 1:  # the whole batch's loss, as one rank would log it, not this rank's share of the batch
        summed = torch.tensor(loss, dtype=torch.float64, device=engine.device)
        torch.distributed.all_reduce(summed)
        loss = summed.item() / world
    return {"step": step + 1, "loss": loss, "grad_norm": norm, "lr": lr}


def thin(history: list[dict], points: int = 100) -> list[dict]:
    """About `points` evenly spaced entries of a metrics history, always ending with the last one."""
    if not history:
        return []
    kept = history[:: max(1, len(history) // points)]
    return kept if kept[-1] is history[-1] else kept + history[-1:]


def rng_state() -> dict:
    """torch's CPU and (when present) CUDA generator states: plain uint8 tensors, weights_only-loadable."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Engine, optimizer and our client state (loader position, RNG) at `step`; keeps the newest `keep`.

    DeepSpeed writes the `latest` file after all of a tag's files, so a crash mid-save resumes from the
    previous tag."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step:07d}", client_state={"step": step, **client_state})
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume(engine, ckpt_dir: Path) -> tuple[int, dict]:
    """(step, client_state) from the newest checkpoint, or (0, {}) when there is none."""
    if not (ckpt_dir / "latest").exists():
        return 0, {}
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir))
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file is not what we wrote
        raise StageError(f"a checkpoint in {ckpt_dir} holds objects other than tensors and plain data, so it was "
                         f"refused rather than unpickled ({str(e).splitlines()[-1].strip()}). Delete {ckpt_dir} "
                         f"to train from scratch, or restore the checkpoint from a trusted copy") from None
    if path is None:
        return 0, {}
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state["step"], client_state


def read_metrics(path: Path, upto: int) -> list[dict]:
    """The metrics.jsonl entries of steps 1..upto (a crashed run may have logged steps past its checkpoint)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)  # atomic: a crash here leaves the old or the new file, never half of one


def _purge_tensorboard_after(engine, step: int) -> None:
    """A crashed attempt logged steps past its checkpoint to TensorBoard too; the resumed run logs them again.
    TensorBoard drops earlier events of steps >= S when it reads a SessionLog START at step S, which is what
    SummaryWriter(purge_step=S) writes first. DeepSpeed's monitor makes its own writer, so the same event goes
    into that writer's file here, before the resumed run's first step is logged."""
    writer = getattr(getattr(engine.monitor, "tb_monitor", None), "summary_writer", None)
    if writer is None:
        return
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    writer.file_writer.add_event(Event(step=step + 1, session_log=SessionLog(status=SessionLog.START)))


# Test hook: SIGKILL this process right after the optimizer step whose number the variable holds (metrics and
# any checkpoint of that step written). A hard kill, like a preempted node: no exception, no clean-up, no flush.
KILL_ENV = "CRAWL2CHAT_SIGKILL_AFTER_STEP"


def fit(engine, cfg: TrainConfig, total: int, loader, loss_fn, ckpt_dir: Path, tokens_per_step: int = 0,
        log_every: int = 10, flops_per_token: float = 0.0, peak_flops: float | None = None,
        count_fn=None) -> list[dict]:
    """Train to `total` optimizer steps, resuming from the newest checkpoint in ckpt_dir if there is one.

    loader: an iterator of micro-batches with state_dict()/load_state_dict(), so a resumed run sees exactly
    the batches an uninterrupted one would. Every step's metrics are appended to ckpt_dir.parent/metrics.jsonl
    (rank 0). tokens_per_step counts all ranks; with flops_per_token and peak_flops (all ranks' peak FLOP/s
    together) each step also reports its model FLOPs utilisation. Returns the per-step metrics of the whole
    run (resumed ones too).
    """
    rank, _ = rank_world()
    step, state = resume(engine, ckpt_dir)
    if state:
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
    metrics_path = ckpt_dir.parent / "metrics.jsonl"
    history = read_metrics(metrics_path, upto=step)
    if step and rank == 0:
        _purge_tensorboard_after(engine, step)
    kill_after = int(os.environ.get(KILL_ENV, -1))
    if rank == 0:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        _write_metrics(metrics_path, history)
    with open(metrics_path, "a") if rank == 0 else open(os.devnull, "w") as metrics_file:
        while step < total:
            t0 = time.perf_counter()
            metrics = train_step(engine, [next(loader) for _ in range(cfg.grad_accum)], loss_fn, cfg, step, total,
                                 count_fn=count_fn)
            step = metrics["step"]
            if tokens_per_step:  # only pretrain's steps have a fixed token count; the others log no tok/s
                metrics["tokens_per_s"] = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
            if tokens_per_step and flops_per_token and peak_flops:
                metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token / peak_flops
            history.append(metrics)
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()  # to the OS: a killed process loses nothing it logged
            if engine.monitor.enabled:  # TensorBoard through DeepSpeed's monitor (rank 0 writes)
                engine.monitor.write_events([(f"Train/{k}", metrics[k], step)
                                             for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
                                             if k in metrics])
            progress(step, total, "steps")
            if step % log_every == 0 or step == total:
                log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e%s%s", step, total, metrics["loss"],
                         metrics["grad_norm"], metrics["lr"],
                         f" {metrics['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in metrics else "",
                         f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else "")
            if step % cfg.checkpoint_every == 0 and step < total:
                save_checkpoint(engine, ckpt_dir, step, {"loader": loader.state_dict(), "rng": rng_state()},
                                cfg.keep_checkpoints)
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0 and history:
        save_loss_curve(history, ckpt_dir.parent / "loss_curve.png")
    return history


def save_loss_curve(history: list[dict], path: Path) -> None:
    """Training loss per optimizer step as a PNG (the image the Prefect UI shows for a training stage)."""
    import matplotlib
    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([m["step"] for m in history], [m["loss"] for m in history], linewidth=1)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss per step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
