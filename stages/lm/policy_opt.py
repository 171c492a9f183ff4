"""The losses of stages/rl.py's three methods, and the advantage estimates they use.

Shapes: a batch of N sequences x (N, T) holds prompt + completion (+ padding). Every per-token tensor is
(N, T-1) and aligned with the targets x[:, 1:]: position t scores the token x[:, t+1] given x[:, :t+1]; `mask`
is 1 on completion tokens (the actions), 0 on prompt and padding.

  GRPO  group-relative advantages (Shao et al. 2024, DeepSeekMath): each prompt's group_size rewards are
        normalised within the group, so no value network is needed; one on-policy gradient step per batch
        (the importance ratio is 1, so PPO's clipping is moot), plus kl_coef x the k3 estimate of
        KL(policy || reference) in the loss.
  PPO   (Schulman et al. 2017; InstructGPT / DeepSpeed-Chat step 3): a value head on the policy's trunk; the
        KL penalty to the reference is part of the per-token reward, the sequence's score is paid at its last
        token; advantages by GAE; several epochs of minibatches over each rollout batch with the clipped
        ratio objective and a clipped value loss.
  DPO   (Rafailov et al. 2023): offline, from preference pairs, no reward model: -log sigmoid(beta x (the
        policy's log-ratio to the reference on chosen - the same on rejected)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stages.lm.gpt import GPT


def token_logprobs(logits: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """logits (N, T-1, V) of seqs[:, :-1] -> log p(seqs[:, t+1] | seqs[:, :t+1]): (N, T-1)."""
    return torch.gather(F.log_softmax(logits.float(), -1), 2, seqs[:, 1:, None]).squeeze(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy: r - log r - 1 with r = ref/policy
    (Schulman's k3: unbiased, always >= 0, low variance)."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


class PolicyWithValue(nn.Module):
    """The policy GPT plus a scalar value head on its last hidden states (PPO's critic shares the trunk)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.value_head = nn.Linear(gpt.cfg.n_embd, 1)
        nn.init.zeros_(self.value_head.weight)  # starts at V = 0 everywhere: no made-up baseline at step 0
        nn.init.zeros_(self.value_head.bias)

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx (N, T) -> logits (N, T, V) and values (N, T): V at t estimates the return after position t."""
        h = self.gpt.hidden(idx)
        return self.gpt.lm_head(h), self.value_head(h).squeeze(-1).float()


# ---- GRPO ------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """rewards (P, G): G samples of each of P prompts -> advantages (P * G,): each reward minus its group's
    mean, divided by the group's std when `scale` (GRPO). A group whose samples all scored the same gets 0: it
    carries no signal about what to prefer. Scaling gives a group of 0/1 rewards the same weight however rare
    its successes, but also blows near-equal reward-model scores (noise) up to +-1; Dr. GRPO (Liu et al. 2025)
    drops it."""
    adv = rewards - rewards.mean(1, keepdim=True)
    return (adv / (rewards.std(1, keepdim=True) + 1e-6) if scale else adv).flatten()


def grpo_loss(logp: torch.Tensor, batch: dict, kl_coef: float) -> torch.Tensor:
    """Advantage-weighted log-likelihood of the completions + kl_coef x k3 KL, each averaged per sequence."""
    m = batch["mask"]
    n_tok = m.sum(1).clamp(min=1)
    pg = -(batch["adv"][:, None] * logp * m).sum(1) / n_tok
    kl = (k3_kl(logp, batch["ref_lp"]) * m).sum(1) / n_tok
    return (pg + kl_coef * kl).mean()


# ---- PPO -------------------------------------------------------------------------------------------------------
def ppo_rewards(scores: torch.Tensor, old_lp: torch.Tensor, ref_lp: torch.Tensor, mask: torch.Tensor,
                kl_coef: float) -> torch.Tensor:
    """Per-token rewards (N, T-1): -kl_coef x (log pi - log ref) on every completion token (InstructGPT's KL
    penalty, the k1 estimate, whose sum over a sample is its sequence KL), plus the sequence's score (N,) on
    its last completion token."""
    rewards = -kl_coef * (old_lp - ref_lp) * mask
    last = mask.size(1) - 1 - mask.flip(1).argmax(1)  # index of each row's last completion token
    rewards[torch.arange(mask.size(0)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over the completion tokens of each row.

    rewards, values, mask: (N, T-1). The episode ends after the last completion token (no value beyond it).
    Returns (advantages whitened over the batch's completion tokens, returns = raw advantages + values)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.size(0), device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        nxt = mask[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)  # 1 while the episode goes on
        next_value = values[:, t + 1] * nxt if t + 1 < rewards.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * nxt * last
        adv[:, t] = last
    adv = adv * mask
    returns = adv + values
    mean = masked_mean(adv, mask)
    var = masked_mean((adv - mean) ** 2, mask)
    return (adv - mean) * torch.rsqrt(var + 1e-8) * mask, returns * mask


def ppo_loss(logp: torch.Tensor, values: torch.Tensor, batch: dict, clip: float, value_clip: float,
             vf_coef: float) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate objective plus vf_coef x the clipped value loss, averaged over completion tokens.
    Returns (loss, {"clip_frac", "approx_kl"}) for monitoring."""
    m = batch["mask"]
    ratio = (logp - batch["old_lp"]).exp()
    adv = batch["adv"]
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    v_clipped = batch["old_values"] + (values - batch["old_values"]).clamp(-value_clip, value_clip)
    vf = 0.5 * torch.max((values - batch["returns"]) ** 2, (v_clipped - batch["returns"]) ** 2)
    loss = masked_mean(pg, m) + vf_coef * masked_mean(vf, m)
    with torch.no_grad():
        info = {"clip_frac": float(masked_mean(((ratio - 1).abs() > clip).float(), m)),
                "approx_kl": float(masked_mean(batch["old_lp"] - logp, m))}
    return loss, info


# ---- DPO -------------------------------------------------------------------------------------------------------
def sequence_logprobs(logits: torch.Tensor, seqs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities per sequence: (N,)."""
    return (token_logprobs(logits, seqs) * mask).sum(1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, implicit reward margins (N,)). Each input is a per-pair sum of response log-probabilities; the
    implicit reward of a response is beta x (log pi - log ref)."""
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margins).mean(), margins.detach()
