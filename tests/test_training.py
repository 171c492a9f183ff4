"""The training stages end to end on tiny models: pretrain (and its resume), sft, reward_model, rl.

One module-scoped chain docs -> tokenizer -> shards -> base -> chat -> reward model, committed in an
ArtifactStore under tmp, so each DeepSpeed engine (a few seconds to start) is built once.
"""

import dataclasses
import json
from pathlib import Path

import pyarrow.ipc as ipc
import pytest
import torch

from docs_fixture import build_shards, train_tokenizer
from stages import import_data, pretrain, reward_model, rl, sft
from stages.artifacts import Artifact, ArtifactStore, sha256_file
from stages.common import StageError, build
from stages.lm import launch, trainer
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import load_model
from stages.lm.examples import ExampleLoader, pack, split_heldout

# A KL divergence is >= 0, but computed from float32 log-probabilities (each rounded to ~6e-8 relative) the KL of
# a policy to itself, or the k3 estimate exp(d) - d - 1 at d ~ 0, comes out within ~1e-7 of 0 on either side
# (-2.6e-8 seen on a loaded CI machine). Compare with that tolerance, not with 0.
KL_ROUNDING = 1e-6

DATA = Path(__file__).resolve().parent.parent / "data"
CONVERSATIONS = DATA / "conversations" / "hh-rlhf-dialogues.800.jsonl"
PAIRS = DATA / "preferences" / "hh-rlhf-pairs.800.jsonl"

# depth 2, width 2 * 32 = 64, two heads of 32; 64-token context. 200 steps (about 4 s): the val loss is
# compared with the unigram entropy of the *whole* val split (the val split's own token frequencies, a strong
# baseline on 13 held-out articles), so eval_sequences covers every val window and the model needs that many
# steps to beat it by a safe margin (0.3-0.5 nats over seeds 1, 2, 1337; 60 steps does not beat it).
PRETRAIN = pretrain.Config(depth=2, aspect_ratio=32, head_dim=32, seq_len=64, steps=200, lr=3e-3, warmup_steps=5,
                           batch_size=8, eval_sequences=512, sample_tokens=8, checkpoint_every=50,
                           precision="fp32")
VOCAB = 640


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    store, docs, tok, shards = build_shards(tmp, VOCAB)
    return {"tmp": tmp, "store": store, "docs": docs, "tok": tok.artifact, "shards": shards.artifact,
            "shard_stats": shards.stats}


@pytest.fixture(scope="module")
def base(world):
    return build(pretrain, PRETRAIN, [world["shards"], world["tok"]], world["store"])


@pytest.fixture(scope="module")
def conversations(world):
    """The first 100 real conversations, imported (stages/import_data.py; its malformed lines are tested there).
    Half are cut to their first exchange of at most 12 characters a turn (about 20 tokens of the tests' 640-piece
    vocabulary), so several fit a 64-token row."""
    convs = [json.loads(line) for line in CONVERSATIONS.read_text(encoding="utf-8").splitlines()[:100]]
    for c in convs[::2]:
        c["messages"] = [{"role": m["role"], "content": m["content"][:12]} for m in c["messages"][:2]]
    path = world["tmp"] / "conversations.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    return build(import_data, import_data.Config(kind="conversations", source=str(path)), [], world["store"])


@pytest.fixture(scope="module")
def preferences(world):
    return build(import_data, import_data.Config(kind="preferences", source=str(PAIRS)), [], world["store"])


SFT = sft.Config(val_fraction=0.1, steps=30, batch_size=8, lr=2e-3, warmup_steps=3, precision="fp32")


@pytest.fixture(scope="module")
def chat(world, base, conversations):
    return build(sft, SFT, [base.artifact, conversations.artifact], world["store"])


@pytest.fixture(scope="module")
def rm(world, chat, preferences):
    cfg = reward_model.Config(val_fraction=0.1, steps=10, batch_size=4, lr=1e-3, warmup_steps=2,
                              precision="fp32")
    return build(reward_model, cfg, [chat.artifact, preferences.artifact], world["store"])


# ---- pretrain ------------------------------------------------------------------------------------------------
def test_pretrain_learns_beyond_unigram(world, base):
    stats = base.stats
    assert not base.reused
    assert stats["steps"] == 200 and stats["tokens_trained"] == 200 * 8 * 64
    assert [h["step"] for h in stats["curve"]][-2:] == [199, 200]  # every other step, and the last
    # the val loss covers every val window, as the unigram entropy does
    assert stats["val_tokens"] == (world["shard_stats"]["val_tokens"] - 1) // 64 * 64
    assert stats["val_loss"] < stats["unigram_entropy"] - 0.1 and stats["learned_beyond_unigram"] is True
    assert stats["curve"][-1]["loss"] < stats["curve"][0]["loss"]
    assert 0 < stats["val_bpb"] < 8 and stats["val_tokens"] > 0
    assert stats["model"]["n_layer"] == 2 and stats["model"]["n_embd"] == 64 and stats["model"]["n_head"] == 2
    assert stats["tokenizer_sha256"] == sha256_file(world["tok"].path / "tokenizer.model")
    assert set(stats["samples"]) == set(PRETRAIN.sample_prompts)
    json.dumps(stats)


def test_pretrain_artifact_layout(world, base):
    art = base.artifact
    files = {p.relative_to(art.path).as_posix() for p in art.path.rglob("*")}
    assert {"model.safetensors", "model.json", "tokenizer.model"} <= files
    assert not any(f.startswith("checkpoints") for f in files)  # the resumable checkpoints are gone
    assert sha256_file(art.path / "tokenizer.model") == sha256_file(world["tok"].path / "tokenizer.model")
    meta = json.loads((art.path / "model.json").read_text())
    assert meta["stage"] == "pretrain" and meta["tokenizer_sha256"] == base.stats["tokenizer_sha256"]
    assert meta["config"]["vocab_size"] == VOCAB and meta["config"]["seq_len"] == 64
    model, meta2, extra = load_model(art.path)
    assert extra == {} and meta2 == meta
    assert world["store"].verify("pretrain", art.version) == []
    # same recipe: the committed artifact is reused, nothing is trained
    again = build(pretrain, PRETRAIN, [world["shards"], world["tok"]], world["store"])
    assert again.reused and again.artifact == art


def test_pretrain_refuses_a_mismatched_tokenizer(world, tmp_path):
    other, other_stats = train_tokenizer(tmp_path / "other", world["docs"], vocab_size=VOCAB + 64)
    ours = sha256_file(world["tok"].path / "tokenizer.model")
    theirs = other_stats["tokenizer_sha256"]
    assert ours != theirs
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError) as e:
        pretrain.run(PRETRAIN, world["shards"], other, out=Artifact(pretrain.NAME, "mismatch", out))
    assert ours[:12] in str(e.value) and theirs[:12] in str(e.value)
    assert "tokenize_shards" in str(e.value)
    assert not (out / "model.safetensors").exists()


def test_pretrain_resumes_from_its_checkpoint(world, tmp_path, monkeypatch):
    cfg = pretrain.Config(depth=1, aspect_ratio=32, head_dim=16, seq_len=64, steps=20, lr=3e-3, warmup_steps=2,
                          batch_size=4, eval_sequences=8, sample_prompts=("Once",), sample_tokens=2,
                          checkpoint_every=10, precision="fp32")
    out = Artifact(pretrain.NAME, "resume", tmp_path)
    real_step = trainer.train_step
    calls = []

    def crashing_step(engine, micro_batches, loss_fn, c, step, total, count_fn=None):
        if step == 14:
            raise RuntimeError("simulated crash at step 15")
        calls.append(real_step(engine, micro_batches, loss_fn, c, step, total, count_fn=count_fn))
        return calls[-1]

    monkeypatch.setattr(trainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain.run(cfg, world["shards"], world["tok"], out=out)
    assert [m["step"] for m in calls] == list(range(1, 15))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000010"]
    first_run = list(calls)

    calls.clear()
    monkeypatch.setattr(trainer, "train_step", lambda *a, **kw: calls.append(real_step(*a, **kw)) or calls[-1])
    stats = pretrain.run(cfg, world["shards"], world["tok"], out=out)
    assert [m["step"] for m in calls] == list(range(11, 21))  # resumed at step 10: ten steps left
    curve_steps = [h["step"] for h in stats["curve"]]
    assert sorted(set(curve_steps)) == list(range(1, 21))  # the history of the crashed run is kept
    assert [h["loss"] for h in stats["curve"][:10]] == [m["loss"] for m in first_run[:10]]
    # the resumed steps 11-14 see the same batches, weights and optimizer state as the crashed run did
    for before, after in zip(first_run[10:], calls[:4]):
        assert after["lr"] == before["lr"]
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-4)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "checkpoints").exists()


# ---- sft -----------------------------------------------------------------------------------------------------
def test_sft_improves_assistant_loss(base, chat, conversations):
    stats = chat.stats
    assert stats["val_assistant_loss"] < stats["val_assistant_loss_base"] and stats["improved_over_base"]
    assert stats["conversations"] == 100
    assert stats["train_conversations"] + stats["val_conversations"] <= 100
    assert stats["val_conversations"] >= 1
    files = {p.name for p in chat.artifact.path.iterdir()}
    assert {"model.safetensors", "model.json", "tokenizer.model"} <= files and "checkpoints" not in files
    meta = json.loads((chat.artifact.path / "model.json").read_text())
    assert meta["stage"] == "sft" and meta["tokenizer_sha256"] == base.stats["tokenizer_sha256"]
    assert chat.artifact.manifest()["inputs"] == [{"stage": "pretrain", "version": base.artifact.version},
                                                  {"stage": "import_data", "version": conversations.artifact.version}]


def test_sft_packs_conversations_into_rows(chat):
    s = chat.stats
    # 64-token rows: the long conversations are truncated and fill a row alone; the short ones share rows
    assert s["train_rows"] < s["train_conversations"]
    assert 0 < s["real_token_fraction_unpacked"] < s["real_token_fraction"] <= 1


def test_pack_keeps_every_token_and_its_loss_mask():
    examples = [([1] * n, [0, 0] + [1] * (n - 2)) for n in (3, 9, 5, 2, 8, 4, 7, 10, 6)]  # 54 tokens
    rows = pack(examples, row_len=10)
    assert len(rows) == 6 and all(len(ids) == len(mask) <= 10 for ids, mask in rows)  # 54 / 10 -> at least 6
    assert sorted(t for ids, _ in rows for t in ids) == sorted(t for ids, _ in examples for t in ids)
    assert sum(sum(m) for _, m in rows) == sum(sum(m) for _, m in examples)
    with pytest.raises(ValueError, match="truncate it first"):
        pack([([1] * 11, [1] * 11)], row_len=10)


def test_example_loader_gives_each_rank_its_own_part_of_the_global_batch():
    examples = list(range(12))
    one = ExampleLoader(examples, 4, seed=3, collate=list)                    # one rank, 4 a step
    two = [ExampleLoader(examples, 2, seed=3, collate=list, rank=r, world_size=2) for r in (0, 1)]  # 2 x 2
    for _ in range(7):  # past two epoch ends (3 steps an epoch)
        a, b = next(two[0]), next(two[1])
        assert not set(a) & set(b) and a + b == next(one)
    assert two[0].state_dict() == two[1].state_dict() == one.state_dict()  # global position: resumable anywhere
    # 10 examples, 2 x 4 a step: an epoch's 2-example tail is shorter than a step, so the next epoch starts
    two = [ExampleLoader(examples[:10], 4, seed=3, collate=list, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(5):
        a, b = next(two[0]), next(two[1])
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    with pytest.raises(StageError, match="1 training examples, fewer than one step's batch of 2"):
        ExampleLoader([0], 1, seed=0, collate=list, rank=0, world_size=2)


def test_a_step_trains_on_the_same_examples_however_the_batch_is_cut():
    """batch_size is the recipe; ranks and micro batches only cut it up. 10 examples, 4 a step: each epoch's
    2-example tail is dropped at a step boundary, never mid-step, whatever the cut."""
    examples = list(range(10))

    def steps(micro, world, accum, n=6):
        loaders = [ExampleLoader(examples, micro, seed=5, collate=list, rank=r, world_size=world, grad_accum=accum)
                   for r in range(world)]
        return [sorted(x for _ in range(accum) for loader in loaders for x in next(loader)) for _ in range(n)]

    whole = steps(4, 1, 1)
    assert steps(2, 1, 2) == steps(1, 2, 2) == steps(2, 2, 1) == steps(1, 4, 1) == whole
    assert all(len(s) == 4 for s in whole)
    assert all(not set(whole[i]) & set(whole[i + 1]) for i in (0, 2, 4))  # two steps an epoch, then a new order


def test_packed_targets_are_the_assistant_tokens(chat):
    tok = ChatTokenizer(chat.artifact.path / "tokenizer.model")
    convs = [json.loads(line)["messages"] for line in CONVERSATIONS.read_text(encoding="utf-8").splitlines()[:40]]
    encoded = [tok.encode_conversation(m, max_len=65) for m in convs]
    _, y_alone = sft.collate(encoded, tok.pad)
    _, y_packed = sft.collate(pack(encoded, 65), tok.pad)
    targets = lambda y: sorted(y[y != -1].tolist())  # noqa: E731
    assert targets(y_packed) == targets(y_alone) and len(targets(y_alone)) > 0


def test_sft_weighs_every_assistant_token_alike_however_the_batch_is_cut(base, conversations, tmp_path):
    """Packed rows hold different numbers of assistant tokens, so a mean per micro batch would weigh a token by
    how the batch happened to be cut; the step's loss is the mean over the whole batch's assistant tokens, so
    8 rows at once and 4 accumulated micro batches of 2 train the same model (float rounding apart)."""
    curves = []
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        out.mkdir()
        stats = sft.run(dataclasses.replace(SFT, steps=4, micro_batch_size=micro), base.artifact,
                        conversations.artifact, out=Artifact(sft.NAME, f"micro{micro}", out))
        curves.append([h["loss"] for h in stats["curve"]])
    assert len(curves[0]) == 4 and max(abs(a - b) for a, b in zip(*curves)) < 1e-5, curves


def test_sft_refuses_an_import_of_the_wrong_kind(base, preferences, tmp_path):
    with pytest.raises(StageError, match="holds preferences, not conversations"):
        sft.run(SFT, base.artifact, preferences.artifact, out=Artifact(sft.NAME, "bad", tmp_path))


# ---- reward model --------------------------------------------------------------------------------------------
def test_reward_model_stats(rm):
    s = rm.stats
    assert 0.0 <= s["val_accuracy"] <= 1.0
    lo, hi = s["val_accuracy_ci95"]
    assert 0.0 <= lo <= s["val_accuracy"] <= hi <= 1.0 and hi - lo < 0.5
    assert s["pairs"] == 799  # the bundled file's 800 lines, less the malformed one the import reported
    assert s["pairs"] == s["train_pairs"] + s["val_pairs"] and s["val_pairs"] == int(s["pairs"] * 0.1)
    assert len({h["step"] for h in s["curve"]}) == 10
    meta = json.loads((rm.artifact.path / "model.json").read_text())
    assert meta["stage"] == "reward_model" and meta["reward_head"] is True


def test_reward_model_can_train_its_head_alone(world, chat, preferences):
    cfg = reward_model.Config(train_trunk=False, val_fraction=0.1, steps=3, batch_size=4, lr=1e-2,
                              warmup_steps=1, precision="fp32")
    res = build(reward_model, cfg, [chat.artifact, preferences.artifact], world["store"])
    trunk, _, _ = load_model(res.artifact.path)
    sft_model, _, _ = load_model(chat.artifact.path)
    for (name, a), b in zip(trunk.state_dict().items(), sft_model.state_dict().values()):
        assert torch.equal(a, b), name  # the frozen SFT trunk, bit for bit
    head = reward_model.load_reward_model(res.artifact.path).reward_head.weight
    assert float(head.detach().abs().sum()) > 0  # while the head learned


def test_reward_model_reloads_and_scores(chat, rm, preferences):
    model = reward_model.load_reward_model(rm.artifact.path)
    assert float(model.reward_head.weight.detach().abs().sum()) > 0  # the trained head, not the zero init
    tok = ChatTokenizer(rm.artifact.path / "tokenizer.model")
    records = import_data.load_records(preferences.artifact, "preferences")
    pairs = []
    for r in records:
        p = tok.render_prompt(reward_model.prompt_messages(r["prompt"]))
        pairs.append((reward_model.encode_response(tok, p, tok.encode(r["chosen"].strip()), 64),
                      reward_model.encode_response(tok, p, tok.encode(r["rejected"].strip()), 64)))
    assert all(len(c) <= 64 and len(r) <= 64 and c[-1] == r[-1] == tok.end for c, r in pairs)
    _, val = split_heldout(pairs, 0.1, reward_model.Config().seed)
    correct, _ = reward_model.pair_accuracy(model, val, tok.pad)
    assert correct / len(val) == rm.stats["val_accuracy"]  # the reloaded model is the one that was evaluated
    x, lengths = reward_model.collate(val[:3], tok.pad)
    with torch.no_grad():
        scores = model(x, lengths)
    assert scores.shape == (6,) and torch.isfinite(scores).all()


# ---- several ranks ------------------------------------------------------------------------------------------
@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setenv("CRAWL2CHAT_NPROC", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's torch threads: 2 ranks on 2 shared cores
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CRAWL2CHAT_HOSTFILE", "CRAWL2CHAT_LAUNCHER"):
        monkeypatch.delenv(var, raising=False)
    # sft and reward_model split their data by rank; this makes the launcher use it even before
    # stages/lm/launch.RANK_AWARE lists them
    assert {"sft", "reward_model"} <= launch.RANK_AWARE


def test_sft_and_reward_model_on_two_ranks(world, base, conversations, preferences, two_ranks, tmp_path,
                                          monkeypatch):
    cfg = dataclasses.replace(SFT, steps=4, zero_stage=1)
    chat2 = build(sft, cfg, [base.artifact, conversations.artifact], world["store"])
    s = chat2.stats
    assert not chat2.reused and s["world_size"] == 2 and len(s["curve"]) == 4
    assert s["val_assistant_loss"] < s["val_assistant_loss_base"]
    assert load_model(chat2.artifact.path)[1]["stage"] == "sft"  # rank 0 wrote the weights
    # the same recipe in one process: every assistant token of the batch weighs the same on 1 or 2 ranks
    monkeypatch.delenv("CRAWL2CHAT_NPROC")
    chat1 = build(sft, cfg, [base.artifact, conversations.artifact], ArtifactStore(tmp_path / "one"))
    assert chat1.artifact.version == chat2.artifact.version and chat1.stats["world_size"] == 1
    one, two = ([h["loss"] for h in c.stats["curve"]] for c in (chat1, chat2))
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    monkeypatch.setenv("CRAWL2CHAT_NPROC", "2")
    rm_cfg = reward_model.Config(val_fraction=0.1, steps=3, batch_size=4, lr=1e-3, warmup_steps=1,
                                 zero_stage=1, precision="fp32")
    rm2 = build(reward_model, rm_cfg, [chat2.artifact, preferences.artifact], world["store"])
    assert rm2.stats["world_size"] == 2 and len(rm2.stats["curve"]) == 3
    assert not (rm2.artifact.path / "checkpoints").exists()
    assert reward_model.load_reward_model(rm2.artifact.path).reward_head.weight.abs().sum() > 0


# ---- rl ------------------------------------------------------------------------------------------------------
def test_rl_grpo_run(world, chat, rm, preferences):
    cfg = rl.Config(val_prompts=4, steps=2, prompts_per_step=2, group_size=3, max_new_tokens=8,
                    lr=1e-4, warmup_steps=1, precision="fp32")
    res = build(rl, cfg, [chat.artifact, rm.artifact, preferences.artifact], world["store"])
    s = res.stats
    for key in ("val_reward_before", "val_reward_after", "val_kl_to_reference"):
        assert isinstance(s[key], float) and s[key] == s[key]  # not NaN
    assert s["val_kl_to_reference"] >= -KL_ROUNDING and isinstance(s["kl_within_bound"], bool)
    assert s["val_prompts"] == 4 and s["prompts"] > 4
    assert s["rollouts"] == cfg.steps * cfg.prompts_per_step * cfg.group_size
    assert len(s["train_reward_by_step"]) == len(s["train_kl_by_step"]) == 2
    files = sorted((res.artifact.path / "rollouts").glob("*.arrow"))
    assert [f.name for f in files] == ["step_000000_rank_000.arrow", "step_000001_rank_000.arrow"]
    rows = []
    for f in files:
        table = ipc.open_file(str(f)).read_all()
        assert set(table.column_names) >= {"step", "prompt", "completion", "reward", "kl"}
        rows += table.to_pylist()
    assert len(rows) == s["rollouts"]
    assert [r["step"] for r in rows] == [0] * 6 + [1] * 6
    assert all(r["kl"] >= -KL_ROUNDING and r["prompt"] for r in rows)
    assert all(r["kl"] == pytest.approx(0, abs=1e-6) for r in rows[:6])  # step 0: policy == reference
    meta = json.loads((res.artifact.path / "model.json").read_text())
    assert meta["stage"] == "rl" and not (res.artifact.path / "checkpoints").exists()
    assert [i["stage"] for i in res.artifact.manifest()["inputs"]] == ["sft", "reward_model", "import_data"]
