"""RL: chat model -> assistant, by GRPO (default), PPO or DPO, with a KL penalty to the frozen chat model.

    python -m stages.rl --root artifacts --input sft --input reward_model --input import_data/preferences  # RLHF
    python -m stages.rl --root artifacts --input sft --set reward=verifier               # seeded arithmetic
    python -m stages.rl --root artifacts --input sft --input import_data/problems --set reward=verifier
    python -m stages.rl --root artifacts --input sft --input import_data/preferences --set method=dpo

Inputs: the chat model first, then, recognised by their stage (and an import_data artifact by its `kind`):
  reward=reward_model (RLHF)  a reward_model artifact, and "preferences" whose prompts (first user turn) are
                              the rollout prompts; held-out: the mean reward-model score of greedy replies.
  reward=verifier             optionally "problems" ({question, answer}, GSM8K style); without them, seeded
                              small-number arithmetic (stages/lm/verifiers.py). A reply earns 1 when its final
                              number is right (+ format_reward when it ends with "#### <number>"). Held-out:
                              greedy accuracy before and after.
  method=dpo                  "preferences" only: pairs, no reward model, no sampling while training.

GRPO and PPO sample `prompts_per_step` prompts x `group_size` completions per step from the current policy with
the KV-cache engine (stages/lm/engine.py) and score them; the losses are in stages/lm/policy_opt.py. Every
rollout (prompt, completion, reward, KL, step, rank) is written to rollouts/step_<step>_rank_<rank>.arrow, so a
run can be audited and re-scored. GRPO takes one gradient step per rollout batch; PPO takes ppo_epochs x
ppo_minibatches.

Several ranks (stages/lm/launch.py): as in sft, batch sizes count all ranks together. Each rank samples its own
prompts_per_step / world prompts of every rollout batch (a seeded draw of prompts_per_step distinct prompts, cut
into one slice per rank) with all of each prompt's group_size completions, so a GRPO group never spans ranks, and
DeepSpeed averages the ranks' gradients. Unlike pretrain and sft, GRPO and PPO do not yet train the same model on
any number of ranks: the sampling seed is per (step, rank), the losses average tokens per rank, and PPO whitens
its advantages per rank, so a run on N ranks draws other samples than one process (same distribution, another
draw) under the same version. DPO does (its pairs, like sft's rows, are cut from one global batch). DPO splits its pairs by rank (ExampleLoader). Every rank
evaluates the same held-out prompts greedily (identical weights, identical results); rank 0 writes the model
and reads every rank's rollout files for the stats.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
import torch.distributed as dist

from stages import import_data
from stages.artifacts import Artifact
from stages.common import StageError, main
from stages.lm import policy_opt as po
from stages.lm import trainer
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, load_model, save_model
from stages.lm.engine import generate
from stages.lm.examples import ExampleLoader, pad_batch
from stages.lm.rl_data import RewardModelReward, VerifierReward, dpo_eval, dpo_pairs, pair_logps

NAME = "rl"
CODE_VERSION = 4  # 2: inputs from import_data; methods ppo and dpo. 3: rank-aware, rollouts/step_*_rank_*.arrow.
                  # 4: prompts_per_step and batch_size count all ranks
METHODS = ("grpo", "ppo", "dpo")


@dataclass(frozen=True)
class Config(trainer.TrainConfig):
    method: str = "grpo"          # "grpo", "ppo" or "dpo" (offline, from preference pairs; ignores `reward`)
    reward: str = "reward_model"  # grpo/ppo: "reward_model" (RLHF) or "verifier" (checkable answers)
    first_turn_only: bool = True  # reward_model: keep only the first user turn of each prompt (short rollouts)
    arithmetic_max: int = 99      # verifier without a problems input: operands 0..99 (two-digit + and -)
    arithmetic_train: int = 2000  # verifier, arithmetic: training problems (held-out ones: val_prompts)
    format_reward: float = 0.0    # verifier: bonus for ending with "#### <number>" (0: only the answer counts)
    val_prompts: int = 32         # held-out prompts (problems; pairs for dpo) measured before and after
    steps: int = 50               # grpo/ppo: rollout batches; dpo: optimizer steps
    prompts_per_step: int = 4     # per rollout batch, all ranks: each samples prompts_per_step / world of them
    group_size: int = 8           # completions per prompt (GRPO's group; PPO samples the same way)
    max_new_tokens: int = 48
    temperature: float = 1.0
    scale_rewards: bool = True    # grpo: divide by the group's reward std (DeepSeekMath); False: only subtract
                                  # its mean (Dr. GRPO), so near-equal reward-model scores stay small advantages
    kl_coef: float = 0.05         # grpo: weight of the k3 KL in the loss; ppo: per-token KL penalty in the reward
    kl_bound: float = 1.0         # nats/token: the run reports whether the final KL stayed under it
    lr: float = 2e-5
    warmup_steps: int = 5         # optimizer steps (ppo takes ppo_epochs x ppo_minibatches of them per batch)
    batch_size: int = 8           # dpo: pairs per optimizer step, all ranks (grpo/ppo: prompts_per_step x group_size)
    ppo_epochs: int = 2           # passes over each rollout batch
    ppo_minibatches: int = 2      # minibatches per pass (one optimizer step each)
    clip: float = 0.2             # ppo: the ratio is clipped to [1 - clip, 1 + clip]
    value_clip: float = 0.2       # ppo: a value moves at most this far from its rollout-time estimate per batch
    vf_coef: float = 0.5          # ppo: weight of the value loss (the value head shares the policy's trunk)
    gamma: float = 1.0            # ppo: no discount within a reply (the score comes at its end)
    lam: float = 0.95             # ppo: GAE's bias/variance trade-off
    beta: float = 0.1             # dpo: strength of the implicit KL constraint (the paper's default)

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.reward not in ("reward_model", "verifier"):
            raise ValueError(f"reward must be reward_model or verifier, not {self.reward!r}")
        if self.arithmetic_max < 1 or self.arithmetic_train < 1 or self.val_prompts < 1:
            raise ValueError("arithmetic_max, arithmetic_train and val_prompts must be at least 1")
        if self.format_reward < 0:
            raise ValueError("format_reward must be >= 0: it is a bonus for the answer format, not a penalty")
        if self.method == "grpo" and self.group_size < 2:
            raise ValueError("group_size must be at least 2: GRPO's advantage compares samples in a group")
        if self.ppo_epochs < 1 or not 1 <= self.ppo_minibatches <= self.prompts_per_step * self.group_size:
            raise ValueError("ppo_epochs must be >= 1 and ppo_minibatches between 1 and prompts_per_step x "
                             "group_size (each minibatch needs a sample)")
        if self.beta <= 0 or self.clip <= 0 or self.value_clip <= 0:
            raise ValueError("beta, clip and value_clip must be > 0")


def sort_inputs(cfg: Config, inputs: tuple[Artifact, ...]) -> dict[str, Artifact]:
    """{"reward_model" | "preferences" | "problems": artifact} for the inputs after the chat model, checked
    against what cfg.method and cfg.reward need; anything wrong is one error that says what to pass."""
    found: dict[str, list[Artifact]] = {"reward_model": [], "preferences": [], "problems": []}
    errors = []
    for art in inputs:
        kind = import_data.kind_of(art) or art.stage
        if kind in found:
            found[kind].append(art)
        else:
            errors.append(f"{art.ref} ({kind}) is not an rl input")
    errors += [f"{len(arts)} {kind} inputs ({', '.join(a.ref for a in arts)}), one at most"
               for kind, arts in found.items() if len(arts) > 1]
    if cfg.method == "dpo":
        need, allowed, mode = {"preferences"}, {"preferences"}, "rl.method=dpo"
    elif cfg.reward == "reward_model":
        need, allowed, mode = {"reward_model", "preferences"}, {"reward_model", "preferences"}, "rl.reward=reward_model"
    else:
        need, allowed, mode = set(), {"problems"}, "rl.reward=verifier"
    errors += [f"no {kind} input" for kind in sorted(need) if not found[kind]]
    errors += [f"a {kind} input it does not use" for kind in sorted(found) if found[kind] and kind not in allowed]
    if errors:
        wants = {"rl.method=dpo": "an import_data artifact of preference pairs (kind preferences)",
                 "rl.reward=reward_model": "a reward_model artifact and an import_data artifact of preference "
                                           "pairs (kind preferences) for its prompts",
                 "rl.reward=verifier": "nothing more (seeded arithmetic) or an import_data artifact of "
                                       "problems (kind problems)"}[mode]
        raise StageError(f"rl inputs: {'; '.join(errors)}. With {mode}, pass the chat model then {wants}"
                         + ("; or set rl.reward=verifier to reward checkable answers instead"
                            if mode == "rl.reward=reward_model" else ""))
    return {kind: arts[0] for kind, arts in found.items() if arts}


def from_every_rank(obj) -> list:
    """[rank 0's obj, rank 1's, ...]: a collective, so every rank must call it at the same point."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class Rollouts:
    """trainer.fit's loader for GRPO and PPO. Each rollout batch is sampled from the current policy, scored,
    written to Arrow and turned into `updates` minibatches (GRPO: the whole batch once; PPO: ppo_epochs passes
    of ppo_minibatches shuffled minibatches), one per next(). The state holds the minibatches not yet used, so
    a resume continues the same batch (their old log-probabilities and values came from weights that no longer
    exist, so they cannot be recomputed). `monitor` collects PPO's per-minibatch clip fraction and approximate
    KL (online_loss appends to it); it is part of the state too, so a resumed run reports the whole run.

    With several ranks each rank holds its own minibatches, but DeepSpeed saves the client state of rank 0
    only: state_dict() gathers every rank's (a collective; trainer.fit calls it on every rank at the same
    step) and load_state_dict() takes this rank's back."""

    def __init__(self, cfg: Config, engine, ref, source, tok: ChatTokenizer, out_dir, rank: int = 0, world: int = 1):
        self.cfg, self.engine, self.ref, self.source, self.tok, self.out_dir = cfg, engine, ref, source, tok, out_dir
        self.rank, self.world = rank, world
        self.step, self.pending, self.monitor = 0, [], []
        self.updates = cfg.ppo_epochs * cfg.ppo_minibatches if cfg.method == "ppo" else 1
        if cfg.prompts_per_step % world:
            raise StageError(f"prompts_per_step={cfg.prompts_per_step} does not split over {world} ranks: set "
                             f"rl.prompts_per_step to a multiple of {world}, or run on a number of ranks that divides it")
        if len(source.train) < cfg.prompts_per_step:
            raise StageError(f"{len(source.train)} training prompts for prompts_per_step={cfg.prompts_per_step}: "
                             f"lower rl.prompts_per_step or give more prompts")
        if cfg.ppo_minibatches > cfg.prompts_per_step // world * cfg.group_size:
            raise StageError(f"ppo_minibatches={cfg.ppo_minibatches} but each of {world} ranks samples only "
                             f"{cfg.prompts_per_step // world * cfg.group_size} completions per batch: lower "
                             f"rl.ppo_minibatches")
        out_dir.mkdir(parents=True, exist_ok=True)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.pending:
            self.pending = self.minibatches(self.collect())
            self.step += 1
        return {k: v.to(self.engine.device) for k, v in self.pending.pop(0).items()}

    def policy(self):
        return self.engine.module.gpt if self.cfg.method == "ppo" else self.engine.module

    @torch.no_grad()
    def collect(self) -> dict:
        cfg, tok, policy, dev = self.cfg, self.tok, self.policy(), self.engine.device
        P = cfg.prompts_per_step // self.world
        # Distinct prompts per rank, the DeepSpeed-Chat way (a DistributedSampler over the prompts, a per-device
        # generation batch): one seeded draw of prompts_per_step distinct prompts per rollout batch, rank r takes
        # the r-th slice of P, so no prompt is rolled out twice in a batch and each group stays on one rank
        # (open-instruct also keeps a prompt's samples together). The sampling seed is distinct per (step, rank):
        # step x world + rank numbers every rank's batches in order (with one rank, the seed is as before).
        pick = np.random.default_rng([cfg.seed, self.step]).choice(len(self.source.train), cfg.prompts_per_step,
                                                                  replace=False)[self.rank * P:(self.rank + 1) * P]
        gen = torch.Generator(device=dev).manual_seed(cfg.seed * 1_000_003 + self.step * self.world + self.rank)
        seqs, masks, rewards, rows = [], [], [], []
        policy.eval()
        for i in pick:
            prompt = self.source.train[i]
            comps = generate(policy, prompt, cfg.group_size, cfg.max_new_tokens, cfg.temperature,
                             stop_ids=(tok.end, tok.eos), generator=gen)
            scored = self.source.score(int(i), comps)
            rewards.append([row["reward"] for row in scored])
            for c, row in zip(comps, scored):
                seqs.append(prompt + c)
                masks.append([0] * (len(prompt) - 1) + [1] * len(c))  # aligned with targets seqs[1:]
                rows.append({"step": self.step, "rank": self.rank, "prompt": tok.decode(prompt),
                             "completion": tok.decode(c), **row})
        x = pad_batch(seqs, tok.pad).to(dev)
        m = pad_batch(masks, 0).to(dev).float()[:, : x.size(1) - 1]
        ref_lp = po.token_logprobs(self.ref(x[:, :-1]), x)
        if cfg.method == "ppo":
            logits, values = self.engine.module(x[:, :-1])
        else:
            logits, values = policy(x[:, :-1]), None
        policy.train()
        old_lp = po.token_logprobs(logits, x)
        kl = (po.k3_kl(old_lp, ref_lp) * m).sum(1) / m.sum(1).clamp(min=1)
        for row, k in zip(rows, kl.tolist()):
            row["kl"] = k
        table = pa.Table.from_pylist(rows)  # the audit trail: one Arrow file per rollout batch and rank
        with ipc.new_file(str(self.out_dir / f"step_{self.step:06d}_rank_{self.rank:03d}.arrow"), table.schema) as w:
            w.write_table(table)
        r = torch.tensor(rewards, device=dev)  # (prompts_per_step / world, group_size)
        if cfg.method == "grpo":
            return {"x": x, "mask": m, "adv": po.group_advantages(r, cfg.scale_rewards), "ref_lp": ref_lp}
        scores = po.ppo_rewards(r.flatten(), old_lp, ref_lp, m, cfg.kl_coef)
        # GAE whitens the advantages over this rank's batch (as DeepSpeed-Chat's per-rank whiten does)
        adv, returns = po.gae(scores, values * m, m, cfg.gamma, cfg.lam)
        return {"x": x, "mask": m, "adv": adv, "returns": returns, "old_lp": old_lp, "old_values": values * m}

    def minibatches(self, batch: dict) -> list[dict]:
        if self.cfg.method == "grpo":
            return [batch]
        out = []
        for epoch in range(self.cfg.ppo_epochs):
            order = np.random.default_rng([self.cfg.seed, self.step, epoch]).permutation(batch["x"].size(0))
            for idx in np.array_split(order, self.cfg.ppo_minibatches):
                idx = torch.as_tensor(idx, device=batch["x"].device)
                out.append({k: v[idx] for k, v in batch.items()})
        return out

    def state_dict(self) -> dict:
        mine = {"pending": [{k: v.cpu() for k, v in b.items()} for b in self.pending], "monitor": self.monitor}
        return {"step": self.step, "ranks": from_every_rank(mine)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ranks"]) != self.world:
            raise StageError(f"the checkpoint was written by {len(state['ranks'])} rank(s), this run has {self.world}: "
                             f"resume with the same number of ranks (each holds part of the rollout batch)")
        mine = state["ranks"][self.rank]
        self.step, self.pending = int(state["step"]), list(mine["pending"])
        self.monitor[:] = mine["monitor"]  # in place: online_loss holds this list


def online_loss(cfg: Config, monitor: list):
    """loss_fn(engine, minibatch) for trainer.fit; PPO's clip fraction and approximate KL go to `monitor`."""
    def loss_fn(engine, b):
        if cfg.method == "grpo":
            return po.grpo_loss(po.token_logprobs(engine(b["x"][:, :-1]), b["x"]), b, cfg.kl_coef)
        logits, values = engine(b["x"][:, :-1])
        loss, info = po.ppo_loss(po.token_logprobs(logits, b["x"]), values, b, cfg.clip, cfg.value_clip,
                                 cfg.vf_coef)
        monitor.append(info)
        return loss
    return loss_fn


@torch.no_grad()
def mean_kl(policy, ref, tok: ChatTokenizer, prompts, max_new: int) -> float:
    """Per-token KL(policy || ref) on sampled replies (exact over the vocabulary at each position)."""
    dev = next(policy.parameters()).device
    kls = []
    for p in prompts:
        c = generate(policy, p, 1, max_new, temperature=1.0, stop_ids=(tok.end, tok.eos),
                     generator=torch.Generator(device=dev).manual_seed(len(p)))[0]
        if not c:
            continue
        x = torch.tensor([p + c], device=dev)
        lp, lq = torch.log_softmax(policy(x).float(), -1), torch.log_softmax(ref(x).float(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)[0, len(p) - 1:-1]
        kls.append(float(kl.mean()))
    return float(np.mean(kls)) if kls else 0.0


def run_online(cfg: Config, policy, ref, tok: ChatTokenizer, source, out: Artifact) -> tuple[torch.nn.Module, dict]:
    """GRPO or PPO against `source` (a RewardModelReward or VerifierReward): the trained policy and its stats."""
    rank, world = trainer.rank_world()
    if cfg.zero_stage == 3 and world > 1:
        # ZeRO-3 gathers each layer's weights in every forward pass, a collective; ranks sampling different
        # prompts run different numbers of forward passes and would wait on each other for ever
        raise StageError("rl with method=grpo/ppo cannot sample with zero_stage=3 on several ranks: set "
                         "rl.zero_stage=1 or 2 (the weights are replicated for sampling anyway), or use one rank")
    before = source.evaluate(policy)  # every rank: greedy, so each computes the same numbers
    torch.manual_seed(cfg.seed)
    model = po.PolicyWithValue(policy) if cfg.method == "ppo" else policy
    # one optimizer step per (mini)batch of rollouts; DeepSpeed's micro batch is that minibatch's size per rank
    per_rank = cfg.prompts_per_step // world * cfg.group_size // (cfg.ppo_minibatches if cfg.method == "ppo" else 1)
    cfg = dataclasses.replace(cfg, micro_batch_size=max(1, per_rank), grad_accum=1)
    engine = trainer.make_engine(model, cfg)
    source.to(engine.device)
    rollout_dir = out.path / "rollouts"
    rollouts = Rollouts(cfg, engine, ref.to(engine.device), source, tok, rollout_dir, rank, world)
    history = trainer.fit(engine, cfg, cfg.steps * rollouts.updates, rollouts, online_loss(cfg, rollouts.monitor),
                          out.path / "checkpoints", log_every=5)
    policy = rollouts.policy()
    after = source.evaluate(policy)
    if dist.is_initialized():
        dist.barrier()  # every rank's rollout files are closed before they are read
    # exactly this run's files: a crashed attempt with more ranks (and no checkpoint) may have left others
    files = [rollout_dir / f"step_{s:06d}_rank_{r:03d}.arrow" for s in range(cfg.steps) for r in range(world)]
    if rank == 0:
        for stale in set(rollout_dir.glob("*.arrow")) - set(files):
            stale.unlink()
    table = pa.concat_tables([ipc.open_file(str(p)).read_all() for p in files])
    per_step = [("reward", "mean"), ("kl", "mean")] + ([("correct", "mean")] if "correct" in table.column_names
                                                       else [])
    by_step = table.group_by("step").aggregate(per_step).sort_by("step")
    monitor = [info for infos in from_every_rank(rollouts.monitor) for info in infos]
    stats = {
        "reward": cfg.reward,
        **source.stats,
        "world_size": world,
        "val_prompts": len(source.val),
        **{f"{k}_before": v for k, v in before.items()},
        **{f"{k}_after": v for k, v in after.items()},
        "val_kl_to_reference": mean_kl(policy, ref, tok, source.val, cfg.max_new_tokens),
        "rollouts": table.num_rows,
        "train_reward_by_step": by_step.column("reward_mean").to_pylist(),
        "train_kl_by_step": by_step.column("kl_mean").to_pylist(),
        "curve": trainer.thin(history),
    }
    if "correct_mean" in by_step.column_names:
        stats["train_accuracy_by_step"] = by_step.column("correct_mean").to_pylist()
    if monitor:  # PPO: how often the ratio left the clip range, and how far the policy moved per batch
        stats["ppo_clip_frac"] = float(np.mean([i["clip_frac"] for i in monitor]))
        stats["ppo_approx_kl"] = float(np.mean([i["approx_kl"] for i in monitor]))
    return policy, stats


def run_dpo(cfg: Config, policy, ref, tok: ChatTokenizer, train: list, val: list, out: Artifact):
    """DPO on preference pairs against the frozen reference: the trained policy and its stats."""
    before = dpo_eval(ref, ref, val, tok.pad, cfg.beta)
    torch.manual_seed(cfg.seed)
    cfg = trainer.plan_batch(cfg, policy, seqs_per_example=2)  # a pair is two sequences
    engine = trainer.make_engine(policy, cfg)
    ref.to(engine.device)
    # the reference's log-probabilities never change: computed once, (chosen, rejected) per training pair
    train = [(c, r, float(lc), float(lr)) for (c, r), (lc, lr) in zip(train, pair_logps(ref, train, tok.pad))]

    def collate(items):  # -> x (2B, T), mask (2B, T-1), reference log-probs (2B,): the B chosen sides first
        sides = [c for c, _, _, _ in items] + [r for _, r, _, _ in items]
        x = pad_batch([ids for ids, _ in sides], tok.pad)
        m = pad_batch([mask for _, mask in sides], 0).float()[:, : x.size(1) - 1]
        return x, m, torch.tensor([lc for _, _, lc, _ in items] + [lr for _, _, _, lr in items])

    def loss_fn(eng, batch):
        x, m, ref_lp = (t.to(eng.device) for t in batch)
        lp = po.sequence_logprobs(eng(x[:, :-1]), x, m)
        n = lp.size(0) // 2
        return po.dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], cfg.beta)[0]

    rank, world = trainer.rank_world()  # several ranks: each trains on its own pairs of every step, as sft
    loader = ExampleLoader(train, cfg.micro_batch_size, cfg.seed, collate, rank, world, cfg.grad_accum)
    history = trainer.fit(engine, cfg, cfg.steps, loader, loss_fn, out.path / "checkpoints", log_every=10)
    policy = engine.module
    after = dpo_eval(policy, ref, val, tok.pad, cfg.beta)  # every rank, the same numbers (ZeRO-3 gathers per forward)
    prompts = [c[0][: len(c[0]) - int(sum(c[1]))] for c, _ in val]  # each held-out pair's prompt
    prompts = [p for p in prompts if len(p) + cfg.max_new_tokens <= policy.cfg.seq_len]
    return policy, {
        "train_pairs": len(train),
        "world_size": world,
        "val_pairs": len(val),
        "val_logp_margin_before": before["logp_margin"],  # log pi(chosen) - log pi(rejected), the reference
        "val_logp_margin_after": after["logp_margin"],
        "val_reward_accuracy": after["accuracy"],         # implicit reward beta x log(pi/ref): chosen > rejected
        "val_reward_accuracy_ci95": after["accuracy_ci95"],
        "val_reward_margin": after["reward_margin"],
        "train_loss": history[-1]["loss"],
        "val_kl_to_reference": mean_kl(policy, ref, tok, prompts, cfg.max_new_tokens),
        "curve": trainer.thin(history),
    }


def run(cfg: Config, chat: Artifact, *inputs: Artifact, out: Artifact) -> dict:
    given = sort_inputs(cfg, inputs)
    policy, meta, _ = load_model(chat.path)
    ref, _, _ = load_model(chat.path)
    ref.requires_grad_(False).eval()
    tok = ChatTokenizer(chat.path / TOKENIZER)
    if cfg.method == "dpo":
        pairs = import_data.load_records(given["preferences"], "preferences")
        train, val = dpo_pairs(cfg, pairs, tok, policy.cfg.seq_len)
        policy, stats = run_dpo(cfg, policy, ref, tok, train, val, out)
        stats["preferences"] = given["preferences"].ref
    else:
        if cfg.reward == "verifier":
            problems = given.get("problems")
            source = VerifierReward(cfg, import_data.load_records(problems, "problems") if problems else None,
                                    problems.ref if problems else "arithmetic", tok, policy.cfg.seq_len)
        else:
            prompts = import_data.load_records(given["preferences"], "preferences")
            source = RewardModelReward(cfg, given["reward_model"], prompts, tok, policy.cfg.seq_len,
                                       policy.cfg.vocab_size)
        policy, stats = run_online(cfg, policy, ref, tok, source, out)
    rank, _ = trainer.rank_world()
    with trainer.whole_params(policy):  # ZeRO-3 holds shards; every rank gathers, rank 0 writes
        if rank == 0:
            save_model(policy, out.path, chat.path / TOKENIZER,
                       {"stage": NAME, "tokenizer_sha256": meta["tokenizer_sha256"]})
    if rank == 0:
        shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
    stats["kl_within_bound"] = stats["val_kl_to_reference"] <= cfg.kl_bound
    return {"method": cfg.method, **stats}


if __name__ == "__main__":
    main(sys.modules[__name__])
