"""DeepSpeed set-up shared by the training stages (pretrain, sft, reward_model, rl).

The model code (gpt.py) knows nothing of DeepSpeed; this file turns a stage's `TrainConfig` into a DeepSpeed
config (never a hand-kept JSON), builds the engine, sets the learning rate each step, and saves and resumes
checkpoints. One process is started in-process (world size 1, gloo on CPU via DS_ACCELERATOR=cpu); several
GPUs or nodes come from the `deepspeed` launcher, which sets RANK/WORLD_SIZE/MASTER_ADDR for us.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must happen before DeepSpeed picks its accelerator at import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

log = logging.getLogger("crawl2chat")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings every training stage shares. Stage Configs extend this."""

    steps: int = 1000               # optimizer steps (pretrain: 0 derives them from its token budget)
    micro_batch_size: int = 8       # sequences per device per forward pass
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 3e-4                # peak learning rate (AdamW)
    min_lr_frac: float = 0.1        # cosine decays to lr * min_lr_frac
    warmup_steps: int = 50
    weight_decay: float = 0.1       # on matrices only, not on norms or embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    zero_stage: int = 0             # DeepSpeed ZeRO 0-3; 1-2 shard optimizer state/grads across ranks
    precision: str = "auto"         # auto: bf16 on a GPU that has it, else fp32; or "bf16" / "fp32"
    seed: int = 1337
    checkpoint_every: int = 200     # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2

    def __post_init__(self):
        if self.steps < 0 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps must be >= 0, micro_batch_size and grad_accum at least 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, not {self.precision!r}")


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.precision == "bf16"


def ds_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def _init_single_process_env() -> None:
    """Without a launcher, act as rank 0 of 1 on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def make_engine(model: torch.nn.Module, cfg: TrainConfig, params=None):
    """A DeepSpeed engine around model with AdamW (weight decay on matrices, not on norm gains)."""
    _init_single_process_env()
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    decay_ids = {id(p) for p in decay}
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0}]
    # torch's AdamW rather than DeepSpeed's FusedAdam: same maths, fused on GPU, and no C++ build on CPU.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg))
    return engine


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_frac at step `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def local_grad_norm(engine) -> float | None:
    """Norm of the accumulated .grad tensors, before the optimizer step (ZeRO 0 keeps them on the params)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else None


def train_step(engine, micro_batches, loss_fn, cfg: TrainConfig, step: int, total: int) -> dict:
    """One optimizer step over cfg.grad_accum micro-batches; loss_fn(engine, batch) -> scalar loss."""
    lr = lr_at(step, total, cfg)
    set_lr(engine, lr)
    loss_sum, norm = 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        loss = loss_fn(engine, batch)
        engine.backward(loss)
        if i == cfg.grad_accum - 1:
            norm = local_grad_norm(engine)
        engine.step()
        loss_sum += loss.item()
    # DeepSpeed computes the global norm itself in its ZeRO and bf16 optimizers (set during step());
    # the plain fp32 path leaves it None, and then the .grad norm taken before the step is the same number.
    ds_norm = engine.get_global_grad_norm()
    norm = float(ds_norm) if ds_norm is not None else (norm or 0.0)
    return {"step": step + 1, "loss": loss_sum / cfg.grad_accum, "grad_norm": norm, "lr": lr}


def thin(history: list[dict], points: int = 100) -> list[dict]:
    """About `points` evenly spaced entries of a metrics history, always ending with the last one."""
    if not history:
        return []
    kept = history[:: max(1, len(history) // points)]
    return kept if kept[-1] is history[-1] else kept + history[-1:]


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """Engine, optimizer and our client state (loader position, RNG) at `step`; keeps the newest `keep`."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step:07d}", client_state={"step": step, **client_state})
    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume(engine, ckpt_dir: Path) -> tuple[int, dict]:
    """(step, client_state) from the newest checkpoint, or (0, {}) when there is none."""
    if not (ckpt_dir / "latest").exists():
        return 0, {}
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        return 0, {}
    log.info("resumed from %s at step %d", path, client_state["step"])
    return client_state["step"], client_state


def fit(engine, cfg: TrainConfig, total: int, loader, loss_fn, ckpt_dir: Path, tokens_per_step: int = 0,
        log_every: int = 10) -> list[dict]:
    """Train to `total` optimizer steps, resuming from the newest checkpoint in ckpt_dir if there is one.

    loader: an iterator of micro-batches with state_dict()/load_state_dict(), so a resumed run sees exactly
    the batches an uninterrupted one would. Returns the per-step metrics of the whole run (resumed ones too).
    """
    step, state = resume(engine, ckpt_dir)
    history: list[dict] = list(state.get("history", []))
    if state:
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
    while step < total:
        t0 = time.perf_counter()
        metrics = train_step(engine, [next(loader) for _ in range(cfg.grad_accum)], loss_fn, cfg, step, total)
        step = metrics["step"]
        metrics["tokens_per_s"] = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
        history.append(metrics)
        if step % log_every == 0 or step == total:
            log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.0f tok/s", step, total, metrics["loss"],
                     metrics["grad_norm"], metrics["lr"], metrics["tokens_per_s"])
        if step % cfg.checkpoint_every == 0 and step < total:
            save_checkpoint(engine, ckpt_dir, step, {"loader": loader.state_dict(), "rng": torch.get_rng_state(),
                                                     "history": history}, cfg.keep_checkpoints)
    return history
