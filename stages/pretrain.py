"""Pre-train a decoder-only transformer on token shards with DeepSpeed -> base model (safetensors).

    python -m stages.pretrain --root artifacts --input tokenize_shards --input train_tokenizer \
        --set depth=2 --set seq_len=128 --set steps=200          # a tiny CPU run in a few minutes

Inputs: token shards (tokenize_shards) and the tokenizer they were made with (train_tokenizer); the shards'
recorded tokenizer hash must match. One dial, `depth`, sizes the model (stages/lm/gpt.py); `steps=0` derives
the step count from a Chinchilla budget of `tokens_per_param` tokens per parameter. A crash resumes from the
newest checkpoint in the staging directory and repeats the uninterrupted run's losses exactly. The artifact keeps
`metrics.jsonl` (every step's loss, lr, grad norm, tokens/s, MFU on a known GPU) and TensorBoard events
(`tensorboard --logdir <artifact>/tensorboard`). Reports val loss, bits per byte (tokenizer-independent), the
unigram entropy of the same val tokens (what a model that only learned token frequencies would score), and
samples from fixed prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from stages.artifacts import Artifact, sha256_file
from stages.common import main
from stages.lm import trainer
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import save_model
from stages.lm.data import ShardIndex, TokenLoader, check_tokenizer, eval_batches
from stages.lm.engine import generate
from stages.lm.gpt import GPT, GPTConfig

NAME = "pretrain"
CODE_VERSION = 3  # 2: metrics.jsonl + tensorboard/ in the artifact, lr schedules, exact resume. 3: global batch

log = logging.getLogger("crawl2chat")

# bf16 dense peak FLOP/s per device used for MFU, by device name substring (NVIDIA data sheets: H100 SXM
# 989 TFLOP/s; H200 is the same GH100 compute with more memory; A100 312 TFLOP/s). The PCIe H100 is slower
# (756 TFLOP/s), so its MFU reads low by that ratio.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    """This device's bf16 peak FLOP/s, or None off a GPU or on one not in PEAK_FLOPS."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@dataclass(frozen=True)
class Config(trainer.TrainConfig):
    depth: int = 20               # layers; width = depth * aspect_ratio (nanochat d20: about 560M parameters)
    aspect_ratio: int = 64
    head_dim: int = 128
    kv_ratio: int = 1             # query heads per K/V head (>1: grouped-query attention)
    seq_len: int = 2048
    steps: int = 0                # 0: tokens_per_param * parameters / tokens per step
    tokens_per_param: float = 20  # Chinchilla-optimal budget (Hoffmann et al. 2022)
    lr: float = 0.0               # 0: 3e-4 scaled by (768 / width) ** 0.5, as muP-style width scaling
    batch_size: int = 256         # sequences per optimizer step, all ranks: 524,288 tokens at seq_len 2048 (nanochat d20)
    eval_sequences: int = 1600    # val windows (seq_len tokens each) for the final val loss
    sample_prompts: tuple[str, ...] = ("The capital of France is", "Once upon a time", "In this article we")
    sample_tokens: int = 32
    compile: bool = False         # torch.compile the model for training (CUDA only, see run())

    def __post_init__(self):
        super().__post_init__()
        if self.depth < 1 or self.seq_len < 8:
            raise ValueError("depth must be at least 1 and seq_len at least 8")
        if self.eval_sequences < 1:
            raise ValueError("eval_sequences must be at least 1")

    def peak_lr(self) -> float:
        return self.lr or 3e-4 * (768 / (self.depth * self.aspect_ratio)) ** 0.5


def token_bytes(tok: ChatTokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens), to turn nats/token into bits/byte."""
    out = torch.zeros(tok.vocab_size, dtype=torch.float64)
    for i in range(tok.vocab_size):
        if tok.sp.is_control(i) or tok.sp.is_unknown(i) or tok.sp.is_unused(i):
            continue
        if tok.sp.is_byte(i):
            out[i] = 1
        else:
            out[i] = len(tok.sp.id_to_piece(i).replace("\u2581", " ").encode())
    for special in (tok.end, *tok.role.values()):  # user-defined chat symbols are not text
        out[special] = 0
    return out


@torch.no_grad()
def evaluate_lm(model: GPT, index_path, seq_len: int, batch_size: int, max_windows: int,
                tbytes: torch.Tensor) -> dict:
    """Val loss (nats/token), bits per byte, and the unigram entropy of the same target tokens: the loss of
    the best model that ignores context, so val_loss below it means the model learned more than frequencies.
    The first max_windows val windows, batch_size at a time (a speed choice: the result does not depend on it)."""
    model.eval()
    dev = next(model.parameters()).device
    nats, tokens, nbytes, windows = 0.0, 0, 0.0, 0
    counts = torch.zeros(model.cfg.vocab_size, dtype=torch.float64)
    for x, y in eval_batches(index_path, seq_len, batch_size, max_batches=math.ceil(max_windows / batch_size)):
        x, y = x[:max_windows - windows].to(dev), y[:max_windows - windows].to(dev)  # (B, T) each
        windows += len(x)
        loss = model(x, y, reduction="none").double()
        nats += loss.sum().item()
        tokens += y.numel()
        nbytes += tbytes[y.flatten().cpu()].sum().item()
        counts += torch.bincount(y.flatten().cpu(), minlength=model.cfg.vocab_size).double()
    model.train()
    p = counts[counts > 0] / tokens
    return {"val_loss": nats / tokens, "val_bpb": nats / (math.log(2) * max(nbytes, 1.0)), "val_tokens": tokens,
            "unigram_entropy": float(-(p * p.log()).sum())}


def run(cfg: Config, shards: Artifact, tokenizer: Artifact, *, out: Artifact) -> dict:
    index = ShardIndex.load(shards.path)
    tok_file = tokenizer.path / "tokenizer.model"
    check_tokenizer(index, sha256_file(tok_file))
    tok = ChatTokenizer(tok_file)
    torch.manual_seed(cfg.seed)
    model_cfg = GPTConfig.from_depth(cfg.depth, index.vocab_size, cfg.seq_len, cfg.aspect_ratio, cfg.head_dim,
                                     cfg.kv_ratio)
    model = GPT(model_cfg)
    # counted now: under ZeRO-3, DeepSpeed's initialize leaves each rank only its shard of every parameter
    params, flops_per_token = model.num_params(), model.flops_per_token()
    tcfg = trainer.plan_batch(dataclasses.replace(cfg, lr=cfg.peak_lr()), model)
    rank, world = trainer.rank_world()
    tokens_per_step = cfg.batch_size * cfg.seq_len  # all ranks together
    total = cfg.steps or max(1, int(cfg.tokens_per_param * params / tokens_per_step))
    engine = trainer.make_engine(model, tcfg, log_dir=out.path / "tensorboard", job_name=NAME)
    if cfg.compile and torch.cuda.is_available():
        engine.compile()  # compiles engine.module in place (nn.Module.compile), so DeepSpeed's hooks still run
    elif cfg.compile:
        # Inductor on CPU needs a C++ toolchain and spends tens of seconds compiling, more than a whole CPU
        # smoke run takes; the CPU path exists to test the pipeline, not to be fast.
        log.info("compile=true ignored: torch.compile is applied on CUDA only, this run is on CPU")
    loader = TokenLoader(shards.path, "train", cfg.seq_len, tcfg.micro_batch_size, seed=cfg.seed,
                         rank=rank, world_size=world, device=engine.device, grad_accum=tcfg.grad_accum)

    def loss_fn(eng, batch):
        x, y = batch
        return eng(x, y)

    t0 = time.perf_counter()
    peak = peak_flops()
    history = trainer.fit(engine, tcfg, total, loader, loss_fn, out.path / "checkpoints", tokens_per_step,
                          flops_per_token=flops_per_token, peak_flops=peak * world if peak else None)
    elapsed = time.perf_counter() - t0
    model = engine.module
    # evaluation and sampling run eager: their shapes (eval batches, one token at a time with a KV cache)
    # would each cost a recompile of the compiled training forward
    with torch.compiler.set_stance("force_eager"):
        ev = evaluate_lm(model, shards.path, cfg.seq_len, tcfg.micro_batch_size, cfg.eval_sequences,
                         token_bytes(tok))
        samples = {}
        model.eval()
        for prompt in cfg.sample_prompts:
            ids = generate(model, [tok.bos] + tok.encode(prompt), max_new_tokens=cfg.sample_tokens,
                           temperature=0, stop_ids=(tok.eos,))[0]
            samples[prompt] = tok.decode(ids)
    mean_tps = float(np.mean([h["tokens_per_s"] for h in history[-20:]])) if history else 0.0
    stats = {
        "params": params,
        "flops_per_token": flops_per_token,
        "model": model_cfg.to_dict(),
        "steps": total,
        "batch": {"sequences": cfg.batch_size, "world_size": world, "micro_batch_size": tcfg.micro_batch_size,
                  "grad_accum": tcfg.grad_accum},
        "tokens_trained": total * tokens_per_step,
        "train_loss": history[-1]["loss"] if history else None,
        **ev,
        "learned_beyond_unigram": ev["val_loss"] < ev["unigram_entropy"],
        "tokens_per_s": mean_tps,
        "mfu": mean_tps * flops_per_token / (peak * world) if peak else None,
        "train_seconds": elapsed,
        "curve": trainer.thin(history),
        "samples": samples,
        "tokenizer_sha256": index.tokenizer_sha256,
    }
    with trainer.whole_params(model):  # ZeRO-3 holds shards; every rank gathers, rank 0 writes
        if rank == 0:
            save_model(model, out.path, tok_file, {"stage": NAME, "tokenizer_sha256": index.tokenizer_sha256,
                                                    "val_loss": ev["val_loss"]})
    if rank == 0:  # the weights above are the result; metrics.jsonl and tensorboard/ stay as the loss curve
        shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
    return stats


if __name__ == "__main__":
    main(sys.modules[__name__])
