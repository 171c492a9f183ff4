"""Sampling with a KV cache, for evaluation, RL rollouts and chat.

The prompt is run once (prefill) and every new token costs one forward pass over one position, instead of
recomputing the whole sequence per token. A batch holds several samples of the same prompt (a GRPO group),
so no padding or attention masks are needed.
"""

from __future__ import annotations

from typing import Iterator

import torch

from stages.lm.gpt import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


def _check_fits(model: GPT, prompt: list[int]) -> None:
    if len(prompt) > model.cfg.seq_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens, more than the model's context of "
                         f"{model.cfg.seq_len}: shorten it (or drop early turns of the conversation)")


@torch.no_grad()
def generate(model: GPT, prompt: list[int], num_samples: int = 1, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, stop_ids: tuple[int, ...] = (),
             generator: torch.Generator | None = None) -> list[list[int]]:
    """num_samples completions of one prompt. Each stops after a stop id (kept) or at max_new_tokens."""
    device = next(model.parameters()).device
    _check_fits(model, prompt)
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len - len(prompt))
    if max_new_tokens <= 0:
        return [[] for _ in range(num_samples)]
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, num_samples, len(prompt) + max_new_tokens, device, dtype)
    x = torch.tensor([prompt] * num_samples, device=device)  # (B, T_prompt)
    logits = model(x, cache=cache)[:, -1]                    # (B, V)
    out: list[list[int]] = [[] for _ in range(num_samples)]
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_ids or [-1], device=device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)
        for b in (~done).nonzero().flatten().tolist():
            out[b].append(int(nxt[b]))
        done |= torch.isin(nxt, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return out


@torch.no_grad()
def stream(model: GPT, prompt: list[int], max_new_tokens: int = 256, temperature: float = 0.8,
           top_k: int | None = 50, stop_ids: tuple[int, ...] = (), seed: int | None = None) -> Iterator[int]:
    """Yield one token id at a time (for the chat CLI); stops before yielding a stop id."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    _check_fits(model, prompt)
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len - len(prompt))
    if max_new_tokens <= 0:
        return
    cache = KVCache(model.cfg, 1, len(prompt) + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]
    for step in range(max_new_tokens):
        tok = int(sample_next(logits, temperature, top_k, gen)[0])
        if tok in stop_ids:
            return
        yield tok
        if step < max_new_tokens - 1:
            logits = model(torch.tensor([[tok]], device=device), cache=cache)[:, -1]
