"""evaluate: answer parsing, HellaSwag/GSM8K/reward evaluation on a small random model, the report card chain."""

from __future__ import annotations

import json

import pytest
import torch

from docs_fixture import real_docs, train_tokenizer, write_docs
from stages import evaluate
from stages.artifacts import Artifact
from stages.common import StageError
from stages.lm.checkpoint import save_model
from stages.lm.gpt import GPT, GPTConfig, RewardModel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random 'sft' model, a random reward model and an 'rl' model, sharing one real tokenizer."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("eval")
    tok, _ = train_tokenizer(tmp / "tok", write_docs(tmp / "docs", real_docs()[:30]), vocab_size=512)
    cfg = GPTConfig(vocab_size=512, seq_len=256, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    arts = {}
    for stage in ("sft", "rl"):
        save_model(GPT(cfg), tmp / stage, tok.path / "tokenizer.model", {"stage": stage, "tokenizer_sha256": "x"})
        arts[stage] = Artifact(stage, f"{stage}0", tmp / stage)
    rm = RewardModel(GPT(cfg))
    torch.nn.init.normal_(rm.reward_head.weight)  # a head that says something, so scores differ
    save_model(rm.gpt, tmp / "rm", tok.path / "tokenizer.model", {"stage": "reward_model", "tokenizer_sha256": "x"},
               extra_tensors={"reward_head.weight": rm.reward_head.weight, "reward_head.bias": rm.reward_head.bias})
    arts["reward_model"] = Artifact("reward_model", "rm0", tmp / "rm")
    return arts


CFG = evaluate.Config(hellaswag_items=8, gsm8k_items=3, gsm8k_max_new_tokens=8, reward_prompts=4,
                      reward_max_new_tokens=8)


def test_final_number():
    assert evaluate.final_number("so 3 + 4 = 7. The answer is 1,200.") == "1200"
    assert evaluate.final_number("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert evaluate.final_number("x = 5.0") == "5" and evaluate.final_number("no digits") is None


def test_report_card_chains_rows(models, tmp_path):
    (tmp_path / "a").mkdir()
    first = evaluate.run(CFG, models["sft"], models["reward_model"], out=Artifact("evaluate", "a", tmp_path / "a"))
    assert 0 <= first["hellaswag_acc"] <= 1 and first["hellaswag_items"] == 8
    assert first["gsm8k_items"] == 3 and "reward_mean" in first and "win_rate_vs_sft" not in first
    (tmp_path / "b").mkdir()
    second = evaluate.run(CFG, models["rl"], models["reward_model"], models["sft"],
                          Artifact("evaluate", "a", tmp_path / "a"), out=Artifact("evaluate", "b", tmp_path / "b"))
    assert 0 <= second["win_rate_vs_sft"] <= 1
    card = json.loads((tmp_path / "b" / "metrics.json").read_text())["card"]
    assert [r["model"] for r in card] == ["sft/sft0", "rl/rl0"]
    table = (tmp_path / "b" / evaluate.CARD).read_text().splitlines()
    assert table[0].startswith("| model") and len(table) == 4


def test_unknown_context_is_refused(models, tmp_path):
    with pytest.raises(StageError, match="tokenize_shards, reward_model, sft"):
        evaluate.run(CFG, models["sft"], Artifact("download", "d", tmp_path), out=Artifact("evaluate", "c", tmp_path))
