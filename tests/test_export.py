"""stages/lm/export.py and `crawl2chat export`: an exported model loads in transformers' LlamaForCausalLM with
our logits, LlamaTokenizer gives our SentencePiece ids, and train_tokenizer's hf/ folder loads the same way.

The models are random GPTs (no training needed to compare two implementations) with weights scaled so that
attention is sharp and logits are O(1): with GPT's small init, attention is nearly uniform and a wrong RoPE
layout would barely move the logits. A negative control (a wrong rope_theta) shows the comparison would see it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.artifacts import ArtifactStore
from stages.common import build
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, save_model
from stages.lm.export import export_hf
from stages.lm.gpt import GPT, GPTConfig
from docs_fixture import real_docs, train_tokenizer, write_docs

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model's protobuf to build its tokenizer

TOL = 1e-4  # max abs logit difference allowed in fp32; measured 4e-6 (eager) and 0 (sdpa), logits up to ~5


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Real docs -> a 1024-piece tokenizer artifact (with its hf/ folder), and a few of the docs' texts."""
    root = tmp_path_factory.mktemp("export")
    docs = real_docs()
    tok, _ = train_tokenizer(root / "tok", write_docs(root / "docs", docs))
    return {"root": root, "tok": tok, "texts": [d["text"] for d in docs]}


def random_model(cfg: GPTConfig, seed: int) -> GPT:
    """A GPT with unit-scale weights: Linear std 1/sqrt(fan_in), query/key twice that (sharp attention),
    norm gains 1 +- 0.2 (so a missed norm weight shows)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name == "embed_tokens.weight":
                p.normal_(0, 1)
            else:
                scale = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.normal_(0, scale / math.sqrt(p.size(1)))
    return model


def text_batch(world: dict, seq_len: int) -> torch.Tensor:
    """Three real-text sequences of seq_len tokens (so every RoPE position is used) and one of random ids."""
    sp = ChatTokenizer(world["tok"].path / TOKENIZER).sp
    rows = [sp.encode(t)[:seq_len] for t in world["texts"] if len(sp.encode(t)) >= seq_len][:3]
    rows.append(torch.randint(0, sp.get_piece_size(), (seq_len,), generator=torch.Generator().manual_seed(0)).tolist())
    return torch.tensor(rows)


def hf_logits(out_dir: Path, idx: torch.Tensor, attn: str) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(out_dir, attn_implementation=attn).float().eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_exported_model_gives_our_logits(world, tmp_path, n_kv_head):
    # rope_theta 500 (not the default) checks that the config carries it; 64 positions, head_dim 16
    cfg = GPTConfig(vocab_size=1024, seq_len=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=n_kv_head,
                    rope_theta=500.0, norm_eps=1e-6)
    model = random_model(cfg, seed=n_kv_head)
    save_model(model, tmp_path / "model", world["tok"].path / TOKENIZER, {"stage": "pretrain"},
               extra_tensors={"reward_head.weight": torch.zeros(1, 64)})
    stats = export_hf(tmp_path / "model", tmp_path / "hf")
    assert stats["left_out"] == ["reward_head.weight"] and stats["parameters"] == model.num_params()

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"], config["rope_theta"]) == (
        n_kv_head, cfg.mlp_hidden, 500.0)

    idx = text_batch(world, cfg.seq_len)
    with torch.no_grad():
        ours = model(idx)  # (B, T, V)
    assert ours.abs().max() > 1  # logits of unit scale, so TOL is a tight relative bound too
    for attn in ("eager", "sdpa"):
        diff = (hf_logits(tmp_path / "hf", idx, attn) - ours).abs().max().item()
        print(f"{n_kv_head=} {attn}: max abs logit diff {diff:.2e}")
        assert diff <= TOL, f"{attn}: transformers' logits differ from ours by {diff}"

    # Negative control: the same weights under another rope_theta give clearly different logits.
    wrong = tmp_path / "hf-wrong-rope"
    shutil.copytree(tmp_path / "hf", wrong)
    config.update(rope_theta=10000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    (wrong / "config.json").write_text(json.dumps(config))
    control = (hf_logits(wrong, idx, "eager") - ours).abs().max().item()
    print(f"{n_kv_head=} largest logit {ours.abs().max().item():.1f}; wrong rope_theta: diff {control:.2f}")
    assert control > 1000 * TOL


def test_llama_tokenizer_gives_our_ids(world, tmp_path):
    """Both hf/ folders (train_tokenizer's and export's) load as LlamaTokenizer with SentencePiece's ids."""
    tok_dir = world["tok"].path
    save_model(GPT(GPTConfig(vocab_size=1024, seq_len=32, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)),
               tmp_path / "model", tok_dir / TOKENIZER, {"stage": "sft"})
    export_hf(tmp_path / "model", tmp_path / "hf")
    chat = ChatTokenizer(tok_dir / TOKENIZER)
    texts = world["texts"] + ["  two  spaces\n\nnew lines, digits 12345, ünïcödé 日本語\ttab ", " leading space"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, 2 + 2?\nThanks"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": " and 3 + 3?"}]
    for folder in (tok_dir / "hf", tmp_path / "hf"):
        hf = transformers.LlamaTokenizer.from_pretrained(folder)
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
        for text in texts:
            ids = chat.sp.encode(text)
            assert hf.encode(text, add_special_tokens=False) == ids, f"{folder}: ids differ on {text[:60]!r}"
            assert hf.decode(ids) == chat.decode(ids)
        assert hf("Hello")["input_ids"] == [chat.bos] + chat.sp.encode("Hello")  # prompts start like documents
        rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rendered = rendered if isinstance(rendered, list) else rendered["input_ids"]
        assert rendered == chat.render_prompt(messages)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto.encode(texts[0], add_special_tokens=False) == chat.sp.encode(texts[0])


# ---- the CLI ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FakeConfig:
    n: int = 1


def fake_stage(name: str, write) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.NAME, mod.CODE_VERSION, mod.Config = name, 1, FakeConfig

    def run(cfg, *inputs, out):
        write(out.path)
        return {}

    mod.run = run
    return mod


def test_cli_export(world, tmp_path, monkeypatch):
    import flows.cli as cli

    store = ArtifactStore(tmp_path / "store")
    cfg = GPTConfig(vocab_size=1024, seq_len=32, n_layer=1, n_embd=32, n_head=2, n_kv_head=1)
    model = random_model(cfg, seed=0)
    pre = build(fake_stage("pretrain", lambda p: save_model(model, p, world["tok"].path / TOKENIZER,
                                                              {"stage": "pretrain"})), FakeConfig(), [], store)
    shards = build(fake_stage("tokenize_shards", lambda p: (p / "index.json").write_text("{}")), FakeConfig(), [],
                   store)
    for b in (pre, shards):
        store.set_alias(b.artifact.stage, "latest", b.artifact.version)
    monkeypatch.chdir(tmp_path)  # the default output folder is relative: exports/<stage>-<version>-hf
    runner = CliRunner()
    args = ["--root", str(tmp_path / "store")]

    r = runner.invoke(cli.app, ["export", "pretrain", "--format", "hf", *args])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exports" / f"pretrain-{pre.artifact.version}-hf"
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, 1024, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= TOL

    r = runner.invoke(cli.app, ["export", "tokenize_shards/latest", "--out", str(tmp_path / "x"), *args])
    assert r.exit_code == 1 and "pass a pretrain, sft, reward_model or rl artifact" in r.output
    assert len(r.output.strip().splitlines()) == 1  # one line that names the fix
    r = runner.invoke(cli.app, ["export", "pretrain", "--format", "gguf", *args])
    assert r.exit_code == 1 and "use --format hf" in r.output
    (tmp_path / "a-file.txt").write_text("not a folder")
    r = runner.invoke(cli.app, ["export", "pretrain", "--out", str(tmp_path / "a-file.txt"), *args])
    assert r.exit_code == 1 and "is a file: give --out a folder" in r.output, r.output
