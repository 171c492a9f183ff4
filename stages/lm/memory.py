"""A preflight estimate of one rank's GPU memory for training, so a batch that cannot fit fails before step 1.

trainer.plan_batch uses it to pick the largest micro batch that fits (the global batch, the recipe, is kept: more
gradient accumulation makes up for a smaller micro batch). It is an estimate, written down from what the model
keeps for its backward pass, not a measurement; it errs on the large side, and plan_batch leaves a tenth of the
device free on top (CUDA context, NCCL buffers, allocator fragmentation). Plain PyTorch, no DeepSpeed.

Per rank, in bytes, with P parameters (T of them trainable), W ranks and ZeRO stage z:
  weights            2P (bf16) or 4P (fp32)                                  / W with z = 3
  gradients          bf16: 2T + 4T (DeepSpeed accumulates bf16 gradients in fp32); fp32: 4T     / W with z >= 2
  optimizer          bf16: 12T (fp32 master copy + AdamW's two moments); fp32: 8T (two moments)  / W with z >= 1
  activations        per token and layer, kept for backward (no activation checkpointing), elements:
                       attention: norm input, its fp32 copy (2), its output; q, k, v; q, k after RoPE (2);
                       SDPA's output (flash attention keeps no (T, T) matrix)          = 10 x width
                       MLP: norm input, fp32 copy (2), output; gate, up, silu(gate), silu x up = 4 x width + 4 x hidden
                     x 2 bytes (bf16) or 4 (fp32)
  logits             per token and vocabulary entry: the logits, their fp32 copy for the loss and its gradient:
                     2 + 4 + 4 bytes (bf16), 4 + 4 (fp32)
That is the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3) plus Korthikanti et al. 2022's
per-layer activations for this block. For nanochat's d20 (564M parameters with a 65536-token vocabulary, 2048
context, bf16, ZeRO 0) a micro batch of 32 sequences, the d20 preset's old per-rank batch, comes to ~128 GiB, which
neither an 80 GB H100 (~71 GiB after the tenth left free) nor an H200 (~126 GiB) holds; 16 sequences need ~69 GiB,
so on 8 GPUs either gets micro batch 16 with 2 accumulated micro batches for the batch of 256
(tests/test_batch_plan.py). The estimate has not been checked against a GPU's peak memory yet (issue 20).
"""

from __future__ import annotations

import torch

from stages.lm.gpt import GPTConfig

FREE_FRACTION = 0.10  # of the device left free: CUDA context (~0.5 GB), NCCL buffers, allocator fragmentation


def gpt_config(model: torch.nn.Module) -> GPTConfig | None:
    """The GPTConfig of the transformer inside model (a GPT, a RewardModel, a policy with a value head)."""
    return next((m.cfg for m in model.modules() if isinstance(getattr(m, "cfg", None), GPTConfig)), None)


def training_bytes(model: torch.nn.Module, sequences: int, zero_stage: int, world: int, bf16: bool) -> float:
    """One rank's estimated peak memory training `model` on micro batches of `sequences` full-length sequences."""
    cfg = gpt_config(model)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} holds no GPT: no memory estimate for it")
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = (2 if bf16 else 4) * params / (world if zero_stage == 3 else 1)
    grads = (6 if bf16 else 4) * trainable / (world if zero_stage >= 2 else 1)
    optimizer = (12 if bf16 else 8) * trainable / (world if zero_stage >= 1 else 1)
    tokens = sequences * cfg.seq_len
    per_token_layer = (14 * cfg.n_embd + 4 * cfg.mlp_hidden) * (2 if bf16 else 4)
    activations = tokens * cfg.n_layer * per_token_layer
    logits = tokens * cfg.vocab_size * (10 if bf16 else 8)
    return weights + grads + optimizer + activations + logits


def budget_bytes(device: torch.device | None = None) -> float:
    """What training may use of this rank's GPU: its total memory less FREE_FRACTION."""
    _, total = torch.cuda.mem_get_info(device)
    return total * (1 - FREE_FRACTION)
