"""A Llama-style decoder-only transformer in plain PyTorch: RMSNorm, RoPE, SwiGLU, grouped-query attention, SDPA.

No parallelism or DeepSpeed in here (torchtitan's rule): the training stages wrap this module. SDPA picks flash
attention on a GPU in bf16 and the math kernel on a CPU. The layout matches Hugging Face's LlamaForCausalLM
(same weights, same RoPE convention), so export is a renaming of tensors.

One dial, `depth`, sizes the model as nanochat does: width = depth * aspect_ratio, heads = width / head_dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    seq_len: int = 2048       # context length in tokens; RoPE tables are built for this length
    n_layer: int = 20
    n_embd: int = 1280
    n_head: int = 10
    n_kv_head: int = 10       # < n_head gives grouped-query attention (fewer K/V heads shared by query groups)
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = 8/3 * width (Llama), rounded up to a multiple of 64
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("the head dimension must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return 64 * math.ceil(self.n_embd * self.mlp_ratio / 64)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, seq_len: int, aspect_ratio: int = 64, head_dim: int = 128,
                   kv_ratio: int = 1) -> "GPTConfig":
        """nanochat's dial: depth 20 -> width 1280, 10 heads of 128 (about 560M parameters with a 65k vocab)."""
        n_embd = depth * aspect_ratio
        n_head = max(1, n_embd // head_dim)
        return cls(vocab_size=vocab_size, seq_len=seq_len, n_layer=depth, n_embd=n_embd, n_head=n_head,
                   n_kv_head=max(1, n_head // kv_ratio))

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in fp32 for stability under bf16, as Llama does
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(cfg: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim), halves duplicated: Hugging Face Llama's rotate_half layout."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    freqs = torch.outer(torch.arange(cfg.seq_len, device=device).float(), inv_freq)  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D); cos, sin: (T, D)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class KVCache:
    """Pre-allocated keys and values for every layer: (n_layer, B, n_kv_head, max_len, head_dim) each."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, self.cfg.n_head, hd).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.cfg.n_kv_head, hd).transpose(1, 2)   # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.cfg.n_kv_head, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            prefix = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, prefix + T, D)
        else:
            prefix = 0
        if prefix == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token may attend to everything cached
        else:  # a chunk after a cached prefix: causal within the chunk, full over the prefix
            mask = torch.ones(T, prefix + T, dtype=torch.bool, device=x.device).tril(diagonal=prefix)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.cfg.n_kv_head != self.cfg.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2's scaled init of the projections into the residual stream: keeps its variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def hidden(self, idx, cache: KVCache | None = None):
        """Final normed hidden states (B, T, C) for token ids idx (B, T)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context of {self.cfg.seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(x)

    def forward(self, idx, targets=None, cache: KVCache | None = None, reduction: str = "mean"):
        """Logits (B, T, V), or the cross-entropy against targets (B, T) where -1 marks ignored positions."""
        logits = self.lm_head(self.hidden(idx, cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                               reduction=reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * matmul params + attention (PaLM appendix B / nanochat)."""
        n = self.num_params() - self.embed_tokens.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.n_embd * self.cfg.seq_len


class RewardModel(nn.Module):
    """A GPT trunk with a scalar head read at each sequence's last token (DeepSpeed-Chat, InstructGPT)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.reward_head = nn.Linear(gpt.cfg.n_embd, 1)
        nn.init.zeros_(self.reward_head.weight)
        nn.init.zeros_(self.reward_head.bias)

    def forward(self, idx, lengths):
        """idx (B, T) right-padded, lengths (B,) -> rewards (B,)."""
        h = self.gpt.hidden(idx)                                  # (B, T, C)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        return self.reward_head(last).squeeze(-1).float()
