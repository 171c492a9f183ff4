"""rl's methods and inputs on a trivial task: PPO and GRPO (RLHF) raise their reward, DPO learns preferences.

The task: "What is n times 0?" (n up to 999), whose answer is always 0. The chat model is a depth-1 GPT given a
few seconds of plain-PyTorch SFT on replies that are a random digit, mostly 7 (40%) and 0 a fifth of the time, so
it has learnt to answer with one digit and <|end|>, greedily the wrong one: room for each method to learn
"0". Problems and preference pairs enter through import_data artifacts, as in the pipeline.
"""

import json

import numpy as np
import pyarrow.ipc as ipc
import pytest
import torch
import torch.nn.functional as F

from docs_fixture import real_docs, write_docs
from stages import import_data, rl
from stages import train_tokenizer as tt
from stages.artifacts import Artifact, ArtifactStore, sha256_file
from stages.common import StageError, build
from stages.lm import policy_opt as po
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import save_model
from stages.lm.examples import pad_batch
from stages.lm.gpt import GPT, GPTConfig, RewardModel
from stages.sft import collate

# A KL divergence is >= 0, but computed from float32 log-probabilities (each rounded to ~6e-8 relative) the KL of
# a policy to itself, or the k3 estimate exp(d) - d - 1 at d ~ 0, comes out within ~1e-7 of 0 on either side
# (-2.6e-8 seen on a loaded CI machine). Compare with that tolerance, not with 0.
KL_ROUNDING = 1e-6

SFT_DIGITS = [0.2] + [0.05] * 6 + [0.4] + [0.05] * 2  # probabilities of the replies "0".."9"
FAST = dict(precision="fp32", checkpoint_every=1000, max_new_tokens=4, val_prompts=16, warmup_steps=2)


def question(n: int) -> str:
    return f"What is {n} times 0?"


def imported(store: ArtifactStore, tmp, kind: str, records: list[dict]) -> Artifact:
    """An import_data artifact of `kind` holding the records."""
    path = tmp / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return build(import_data, import_data.Config(kind=kind, source=str(path)), [], store).artifact


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl_methods")
    store = ArtifactStore(tmp / "store")
    docs = write_docs(tmp / "docs", real_docs())
    tok_art = build(tt, tt.Config(vocab_size=640, heldout_chars=20_000), [docs], store).artifact
    tok = ChatTokenizer(tok_art.path / "tokenizer.model")
    rng = np.random.default_rng(0)
    ns = rng.permutation(1000)[:400].tolist()
    wrong = lambda: str(int(rng.integers(1, 10)))  # noqa: E731

    # SFT: one digit then <|end|>: "7" in 40% of the replies (greedy says 7), "0" in 20%, each other digit 5%
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=640, seq_len=32, aspect_ratio=64, head_dim=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        batch = [tok.encode_conversation([{"role": "user", "content": question(n)},
                                          {"role": "assistant", "content": str(rng.choice(10, p=SFT_DIGITS))}])
                 for n in rng.choice(ns, 32)]
        x, y = collate(batch, tok.pad)
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok_file = tok_art.path / "tokenizer.model"
    save_model(model, tmp / "chat", tok_file, {"stage": "sft", "tokenizer_sha256": sha256_file(tok_file)})
    chat = Artifact("sft", "digits", tmp / "chat")

    pairs = [{"prompt": question(n), "chosen": "0", "rejected": wrong()} for n in ns[:300]]
    prefs = imported(store, tmp, "preferences", pairs)
    problems = imported(store, tmp, "problems", [{"question": question(n), "answer": "0"} for n in ns[300:]])

    # a reward model that prefers "0": the chat trunk + a head, a few Bradley-Terry steps on the pairs
    rm = RewardModel(GPT(model.cfg))
    rm.gpt.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    enc = lambda p, r: tok.render_prompt([{"role": "user", "content": p}]) + tok.encode(r) + [tok.end]  # noqa: E731
    for step in range(30):
        chunk = [pairs[i] for i in rng.choice(len(pairs), 16)]
        seqs = [enc(p["prompt"], p["chosen"]) for p in chunk] + [enc(p["prompt"], p["rejected"]) for p in chunk]
        r = rm(pad_batch(seqs, tok.pad), torch.tensor([len(s) for s in seqs]))
        loss = -F.logsigmoid(r[:16] - r[16:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(rm.gpt, tmp / "rm", tok_file, {"stage": "reward_model", "tokenizer_sha256": sha256_file(tok_file),
                                              "reward_head": True},
               extra_tensors={"reward_head.weight": rm.reward_head.weight, "reward_head.bias": rm.reward_head.bias})
    reward = Artifact("reward_model", "zero", tmp / "rm")
    conversations = imported(store, tmp, "conversations", [{"messages": [{"role": "user", "content": "Hi"},
                                                                        {"role": "assistant", "content": "Hello"}]}])
    return {"store": store, "chat": chat, "prefs": prefs, "problems": problems, "reward": reward,
            "conversations": conversations}


def rollout_rows(path) -> list[dict]:
    files = sorted((path / "rollouts").glob("*.arrow"))
    return [r for f in files for r in ipc.open_file(str(f)).read_all().to_pylist()]


def test_ppo_raises_verifier_reward(world, tmp_path):
    cfg = rl.Config(method="ppo", reward="verifier", steps=12, prompts_per_step=4, group_size=4, lr=3e-3,
                    ppo_epochs=2, ppo_minibatches=2, kl_coef=0.01, **FAST)
    s = rl.run(cfg, world["chat"], world["problems"], out=Artifact("rl", "ppo", tmp_path))
    assert s["method"] == "ppo" and s["problems"] == world["problems"].ref
    acc = s["train_accuracy_by_step"]
    assert len(acc) == 12 and s["rollouts"] == 12 * 16
    # greedy replies to held-out problems: "7" before, "0" after; sampled ones (16 a step) mostly right at the end
    assert s["val_accuracy_before"] == 0 and s["val_accuracy_after"] == 1
    assert np.mean(acc[-3:]) >= 0.85 and np.mean(acc[-3:]) > np.mean(acc[:2]) + 0.2, acc
    assert 0 < s["ppo_clip_frac"] < 1  # several epochs per batch: the ratio does leave the clip range
    rows = rollout_rows(tmp_path)
    assert len(rows) == s["rollouts"] and all(r["kl"] >= -KL_ROUNDING for r in rows)
    assert all(r["kl"] == pytest.approx(0, abs=1e-5) for r in rows[:16])  # step 0: policy == reference
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "checkpoints").exists()


def test_grpo_rlhf_raises_reward_model_score_within_kl_bound(world, tmp_path):
    # scale_rewards=False (Dr. GRPO): the reward model scores all wrong digits within 0.01 of each other, and
    # dividing by a group's std would blow those differences up to +-1 (the policy then drifted to empty replies)
    cfg = rl.Config(method="grpo", reward="reward_model", steps=12, prompts_per_step=4, group_size=4, lr=1e-3,
                    scale_rewards=False, kl_coef=0.1, kl_bound=1.0, **FAST)
    s = rl.run(cfg, world["chat"], world["reward"], world["prefs"], out=Artifact("rl", "rlhf", tmp_path))
    assert s["method"] == "grpo" and s["reward"] == "reward_model" and s["val_prompts"] == 16
    assert s["val_reward_after"] > s["val_reward_before"] + 0.5, (s["val_reward_before"], s["val_reward_after"])
    assert s["kl_within_bound"] and -KL_ROUNDING <= s["val_kl_to_reference"] <= cfg.kl_bound
    assert len(rollout_rows(tmp_path)) == s["rollouts"] == 12 * 16


def test_dpo_learns_held_out_preferences(world, tmp_path):
    cfg = rl.Config(method="dpo", steps=30, batch_size=8, lr=3e-4, beta=0.1, **FAST)
    s = rl.run(cfg, world["chat"], world["prefs"], out=Artifact("rl", "dpo", tmp_path))
    assert s["method"] == "dpo" and s["val_pairs"] == 16 and s["train_pairs"] == 284
    # the reference prefers "0" about as much as any digit; after DPO, by a wide log-probability margin
    assert s["val_logp_margin_after"] > s["val_logp_margin_before"] + 1.0
    assert s["val_reward_accuracy"] >= 0.9 and s["val_reward_margin"] > 0
    lo, hi = s["val_reward_accuracy_ci95"]
    assert lo <= s["val_reward_accuracy"] <= hi
    assert s["kl_within_bound"] and not (tmp_path / "rollouts").exists()


# ---- inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, inputs, message", [
    (dict(), [], "no preferences input; no reward_model input.*pass the chat model then a reward_model artifact"),
    (dict(), ["reward"], "no preferences input"),
    (dict(reward="verifier"), ["prefs"], "a preferences input it does not use.*import_data artifact of problems"),
    (dict(reward="verifier"), ["reward"], "a reward_model input it does not use"),
    (dict(reward="verifier"), ["problems", "problems"], "2 problems inputs"),
    (dict(method="dpo"), [], "no preferences input.*rl.method=dpo"),
    (dict(method="dpo"), ["reward", "prefs"], "a reward_model input it does not use"),
    (dict(method="dpo"), ["chat"], r"sft/digits \(sft\) is not an rl input"),
    (dict(reward="verifier"), ["conversations"], r"import_data/\w+ \(conversations\) is not an rl input"),
])
def test_wrong_or_missing_inputs_name_the_fix(world, tmp_path, settings, inputs, message):
    with pytest.raises(StageError, match=message):
        rl.run(rl.Config(**settings), world["chat"], *[world[k] for k in inputs], out=Artifact("rl", "x", tmp_path))


def test_config_checks():
    with pytest.raises(ValueError, match="method must be one of grpo, ppo, dpo"):
        rl.Config(method="reinforce")
    with pytest.raises(ValueError, match="ppo_minibatches"):
        rl.Config(method="ppo", ppo_minibatches=0)
    rl.Config(method="ppo", group_size=1)  # PPO needs no group


# ---- the maths -------------------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computation():
    # one row: 2 prompt positions, 3 completion tokens, 1 padding
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float)
    values = torch.tensor([[0, 0, 0.5, 0.2, 0.1, 0]])
    rewards = torch.tensor([[0, 0, 0.0, 0.0, 1.0, 0]])
    gamma, lam = 1.0, 0.5
    d4 = 1.0 - 0.1                      # last token: no value after it
    d3 = 0.0 + 0.1 - 0.2
    d2 = 0.0 + 0.2 - 0.5
    a4, a3 = d4, d3 + lam * d4
    a2 = d2 + lam * a3
    raw = torch.tensor([a2, a3, a4])
    adv, returns = po.gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(returns[0, 2:5], raw + values[0, 2:5])
    assert torch.allclose(adv[0, 2:5], (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-5)
    assert adv[0, [0, 1, 5]].abs().sum() == 0


def test_ppo_rewards_pay_the_score_at_the_last_token():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float)
    lp, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -1.5)  # log pi - log ref = 0.5 per token
    r = po.ppo_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[0, -0.05, 1.95, 0], [-0.05, -0.05, -0.05, -1.05]]))


def test_dpo_loss_is_log2_at_the_reference_and_falls_with_the_margin():
    z = torch.zeros(3)
    loss, margins = po.dpo_loss(z, z, z, z, beta=0.1)
    assert loss.item() == pytest.approx(np.log(2)) and margins.abs().sum() == 0
    better, _ = po.dpo_loss(torch.full((3,), -1.0), torch.full((3,), -5.0), z - 2, z - 2, beta=0.1)
    assert better.item() < np.log(2)
