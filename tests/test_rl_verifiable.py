"""RL with verifiable rewards: the arithmetic generator, the verifier, and a short rl run with reward="verifier".

The model is a random-init depth-1 GPT (a base artifact written directly, no pre-training): this checks the
plumbing end to end; bench/rl_arithmetic.py shows that a tiny model actually learns with it.
"""

import json
import re
from pathlib import Path

import pyarrow.ipc as ipc
import pytest
import torch

from docs_fixture import real_docs, write_docs
from stages import rl
from stages import train_tokenizer as tt
from stages.artifacts import Artifact, ArtifactStore, sha256_file
from stages.common import StageError, build
from stages.lm import verifiers
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import save_model
from stages.lm.gpt import GPT, GPTConfig
from stages.lm.rl_data import VerifierReward

# A KL divergence is >= 0, but computed from float32 log-probabilities (each rounded to ~6e-8 relative) the KL of
# a policy to itself, or the k3 estimate exp(d) - d - 1 at d ~ 0, comes out within ~1e-7 of 0 on either side
# (-2.6e-8 seen on a loaded CI machine). Compare with that tolerance, not with 0.
KL_ROUNDING = 1e-6

GSM8K = Path(__file__).resolve().parent.parent / "data" / "eval" / "gsm8k-test.shared300.jsonl"


# ---- the generator -------------------------------------------------------------------------------------------
def test_arithmetic_problems_are_deterministic_disjoint_and_right():
    train, val = verifiers.arithmetic_problems(99, 300, 50, seed=3)
    assert (train, val) == verifiers.arithmetic_problems(99, 300, 50, seed=3)
    assert verifiers.arithmetic_problems(99, 300, 50, seed=4) != (train, val)
    assert len(train) == 300 and len(val) == 50
    questions = [p["question"] for p in train + val]
    assert len(set(questions)) == 350  # distinct, so train and held-out share nothing
    # the held-out set does not depend on how many training problems are asked for
    assert verifiers.arithmetic_problems(99, 10, 50, seed=3)[1] == val
    ops = set()
    for p in train + val:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p["question"]).groups()
        a, b = int(a), int(b)
        c = a + b if op == "+" else a - b
        assert 0 <= a <= 99 and 0 <= b <= 99 and c >= 0
        assert p["answer"] == f"{a} {op} {b} = {c}. #### {c}" and verifiers.reference(p["answer"]) == str(c)
        ops.add(op)
    assert ops == {"+", "-"}


def test_arithmetic_problems_refuse_more_than_the_space_holds():
    # operands 0..3: 16 sums + 10 differences = 26 problems; at most half (13) are drawn
    assert verifiers.arithmetic_space(3) == 26
    assert len(verifiers.arithmetic_problems(3, 10, 3, seed=0)[0]) == 10
    with pytest.raises(StageError, match="raise rl.arithmetic_max"):
        verifiers.arithmetic_problems(3, 11, 3, seed=0)


# ---- the verifier --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, reward, correct", [
    ("23 + 48 = 71. #### 71", 1.5, True),        # right, in the answer format
    ("23 + 48 = 71. The answer is 71.", 1.0, True),  # right, no '####' line
    ("23 + 48 = 71. #### 70", 0.5, False),       # the number after '####' is the one that counts
    ("#### 71 is my guess", 1.0, True),          # right number after '####', but not the reply's end: no bonus
    ("23 + 48 = 71 #### seventy-one", 0.0, False),  # after '####' there is no number at all
    ("I don't know", 0.0, False),
    ("", 0.0, False),
])
def test_verifier_scores(reply, reward, correct):
    assert verifiers.score(reply, "23 + 48 = 71. #### 71", format_reward=0.5) == (reward, correct)


def test_verifier_on_gsm8k_answers():
    item = json.loads(GSM8K.read_text().splitlines()[0])
    target = verifiers.reference(item["answer"])
    assert target == item["answer"].split("####")[-1].strip().replace(",", "")
    assert verifiers.score(f"So the answer is {target}", item["answer"]) == (1.0, True)
    assert verifiers.score(f"So the answer is {int(target) + 1}", item["answer"]) == (0.0, False)
    # thousands separators and a trailing .0 are the same number
    assert verifiers.score("It costs 1,200.0 dollars. #### 1,200", "#### 1200", 0.25) == (1.25, True)
    with pytest.raises(StageError, match="numeric answer"):
        verifiers.reference("no number here")


def test_load_problems_reports_malformed_lines(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"question": "What is 1 + 1?", "answer": "#### 2"}\n'
                    '{"question": "What is 2 + 2?"}\n'
                    'not json\n'
                    '{"question": "Pick a number", "answer": "any"}\n'
                    '{"question": "What is 3 + 3?", "answer": 6}\n')
    problems, malformed = verifiers.load_problems(path)
    assert problems == [{"question": "What is 1 + 1?", "answer": "#### 2"},
                        {"question": "What is 3 + 3?", "answer": "6"}]
    assert [m["line"] for m in malformed] == [2, 3, 4]


# ---- rl with reward="verifier" -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A random-init depth-1 model with a real 640-piece tokenizer, as an sft artifact would hold it."""
    tmp = tmp_path_factory.mktemp("rl_verifiable")
    docs = write_docs(tmp / "docs", real_docs())
    tok = build(tt, tt.Config(vocab_size=640, heldout_chars=20_000), [docs], ArtifactStore(tmp / "store")).artifact
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=640, seq_len=64, aspect_ratio=32, head_dim=16))
    tok_file = tok.path / "tokenizer.model"
    save_model(model, tmp / "chat", tok_file, {"stage": "sft", "tokenizer_sha256": sha256_file(tok_file)})
    return Artifact("sft", "random", tmp / "chat")


def test_rl_with_verifier_runs_end_to_end(chat, tmp_path):
    cfg = rl.Config(reward="verifier", arithmetic_max=20, arithmetic_train=30, val_prompts=4,
                    format_reward=0.5, steps=2, prompts_per_step=2, group_size=3, max_new_tokens=8, lr=1e-4,
                    warmup_steps=1, precision="fp32")
    s = rl.run(cfg, chat, out=Artifact(rl.NAME, "verifier", tmp_path))
    assert s["reward"] == "verifier" and s["problems"] == "arithmetic"
    assert s["train_problems"] == 30 and s["val_problems"] == s["val_prompts"] == 4 and s["too_long"] == 0
    for key in ("val_accuracy_before", "val_accuracy_after", "val_reward_before", "val_reward_after"):
        assert 0.0 <= s[key] <= 1.5
    assert s["val_kl_to_reference"] >= -KL_ROUNDING and isinstance(s["kl_within_bound"], bool)
    assert s["rollouts"] == 2 * 2 * 3
    assert len(s["train_reward_by_step"]) == len(s["train_accuracy_by_step"]) == len(s["train_kl_by_step"]) == 2
    json.dumps(s)

    files = sorted((tmp_path / "rollouts").glob("*.arrow"))
    assert [f.name for f in files] == ["step_000000_rank_000.arrow", "step_000001_rank_000.arrow"]
    rows = [r for f in files for r in ipc.open_file(str(f)).read_all().to_pylist()]
    assert len(rows) == 12 and [r["step"] for r in rows] == [0] * 6 + [1] * 6
    assert s["world_size"] == 1 and {r["rank"] for r in rows} == {0}
    train, _ = verifiers.arithmetic_problems(20, 30, 4, cfg.seed)
    questions = {p["question"] for p in train}
    tok = ChatTokenizer(chat.path / "tokenizer.model")
    for r in rows:
        assert r["reward"] in (0.0, 0.5, 1.0, 1.5) and r["kl"] >= -KL_ROUNDING
        assert any(q in r["prompt"] for q in questions)  # rollouts are drawn from the training problems
        reply = r["completion"].replace("<|end|>", "")
        formatted = bool(verifiers.ANSWER_LINE.search(reply))
        assert r["reward"] == float(r["correct"]) + 0.5 * formatted
    assert all(r["kl"] == pytest.approx(0, abs=1e-6) for r in rows[:6])  # step 0: policy == reference
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "checkpoints").exists()
    assert tok.vocab_size == 640


def test_verifier_problems_from_imported_records(chat):
    train, val = verifiers.arithmetic_problems(50, 40, 10, seed=0)
    records = train + val + [{"question": "too long " + "x " * 80, "answer": "1"}]
    cfg = rl.Config(reward="verifier", val_prompts=10, max_new_tokens=16, prompts_per_step=2)
    source = VerifierReward(cfg, records, "import_data/abc", ChatTokenizer(chat.path / "tokenizer.model"), seq_len=64)
    assert source.stats["problems"] == "import_data/abc"
    assert source.stats["too_long"] == 1  # the 80-word question leaves no room for a reply in 64 tokens
    assert len(source.train) + len(source.val) == 50 and len(source.val) >= 9
    assert len(source.train_answers) == len(source.train) and len(source.val_answers) == len(source.val)
    assert source.score(0, [[]]) == [{"reward": 0.0, "correct": False}]
    with pytest.raises(StageError, match="RL needs training and held-out ones"):
        VerifierReward(cfg, records[:1], "import_data/one", ChatTokenizer(chat.path / "tokenizer.model"), 64)


def test_reward_source_and_inputs_must_agree(chat, tmp_path):
    out = Artifact(rl.NAME, "bad", tmp_path)
    with pytest.raises(StageError, match="pass the chat model then a reward_model artifact.*rl.reward=verifier"):
        rl.run(rl.Config(reward="reward_model"), chat, out=out)
    with pytest.raises(StageError, match=r"sft/random \(sft\) is not an rl input"):
        rl.run(rl.Config(reward="verifier"), chat, chat, out=out)
    with pytest.raises(ValueError, match="reward must be reward_model or verifier"):
        rl.Config(reward="human")
    with pytest.raises(ValueError, match="format_reward"):
        rl.Config(format_reward=-1.0)


def test_worked_answers_are_right_column_arithmetic():
    train, val = verifiers.arithmetic_problems(99, 300, 50, seed=5, worked=True)
    assert [p["question"] for p in train] == [p["question"] for p in verifiers.arithmetic_problems(99, 300, 50, 5)[0]]
    for p in train + val:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p["question"]).groups()
        a, b = int(a), int(b)
        steps = re.findall(r"(\d+) ([+-]) (\d) [+-] (\d) = (\d+)\.", p["answer"])
        assert len(steps) == 2  # ones, then tens
        carry, digits = 0, []
        for (x, o, y, c, z), da, db in zip(steps, (a % 10, a // 10), (b % 10, b // 10)):
            x, y, c, z = int(x), int(y), int(c), int(z)
            assert o == op and y == db and c == carry and x % 10 == da
            assert z == (x + y + c if op == "+" else x - y - c) and 0 <= z <= 19
            carry = z // 10 if op == "+" else int(x >= 10)
            digits.append(z % 10 if op == "+" else z)
        value = digits[0] + 10 * digits[1] + 100 * (carry if op == "+" else 0)
        assert value == (a + b if op == "+" else a - b) and verifiers.reference(p["answer"]) == str(value)
