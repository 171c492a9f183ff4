"""train_tokenizer: lossless on real and adversarial text, fixed special ids, deterministic, clear errors."""

import json

import pytest
import sentencepiece as spm

from docs_fixture import real_docs, train_tokenizer, write_docs
from stages import train_tokenizer as tt
from stages.artifacts import Artifact, sha256_file
from stages.common import StageError

ADVERSARIAL = [
    "emoji 😀👩🏽‍💻🇫🇷 and a lone surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "CJK 漢字かなカナ한국어, Arabic العربية, Devanagari हिन्दी",
    "control \x00\x01\x07\x1b[31m red \x7f and \r\n CRLF \t tabs \x0b\x0c",
    "a" + " " * 100 + "b" + "\n" * 7 + "\t" * 9 + "   ",
    "   leading and trailing whitespace   ",
    "digits 1234567890 3.14159 0x7fffffff 1e-9",
    "zero width \u200b\u200c\u200d joiners, BOM \ufeff, NBSP \u00a0, combining e\u0301 vs \u00e9",
    "<|bos|> <|eos|> <|pad|> <unk> as literal text",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    docs = write_docs(tmp / "docs", real_docs())
    art, stats = train_tokenizer(tmp / "tokenizer", docs, vocab_size=1024)
    return docs, art, stats, spm.SentencePieceProcessor(model_file=str(art.path / "tokenizer.model"))


def test_outputs_and_stats(tok):
    _, art, stats, sp = tok
    assert {p.name for p in art.path.iterdir()} == {"tokenizer.model", "tokenizer.vocab", "tokenizer.json", "hf"}
    assert {p.name for p in (art.path / "hf").iterdir()} == {"tokenizer.model", "tokenizer_config.json",
                                                             "special_tokens_map.json"}
    meta = json.loads((art.path / "tokenizer.json").read_text())
    assert meta["tokenizer_sha256"] == sha256_file(art.path / "tokenizer.model") == stats["tokenizer_sha256"]
    assert meta["vocab_size"] == stats["vocab_size"] == sp.get_piece_size() == 1024
    assert stats["heldout_docs"] >= 1 and stats["roundtrip_checked"] == stats["heldout_docs"]
    assert stats["roundtrip_failed"] == 0
    assert 1.5 < stats["bytes_per_token"] < 6  # English web text with a 1k vocab: ~2.5 bytes/token
    json.dumps(stats)


def test_special_ids_fixed(tok):
    _, art, _, sp = tok
    expected = {"<unk>": 0, "<|bos|>": 1, "<|eos|>": 2, "<|pad|>": 3,
                "<|system|>": 4, "<|user|>": 5, "<|assistant|>": 6, "<|end|>": 7}
    assert {sp.id_to_piece(i): i for i in range(8)} == expected
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert json.loads((art.path / "tokenizer.json").read_text())["special_tokens"] == expected


def test_lossless_on_real_text(tok):
    *_, sp = tok
    texts = [d["text"] for d in real_docs()]
    assert all(sp.decode(ids) == t for t, ids in zip(texts, sp.encode(texts)))


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_lossless_on_adversarial_text(tok, text):
    *_, sp = tok
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert sp.unk_id() not in ids  # byte fallback covers every character
    assert not {sp.bos_id(), sp.eos_id(), sp.pad_id()} & set(ids)  # control tokens never come from text


def test_concatenation_and_markers(tok):
    """No dummy prefix: encodings concatenate. Chat markers in text become their special ids (user-defined
    symbols); bos/eos/pad are control tokens that decode to nothing. The one lossy character is U+2581."""
    *_, sp = tok
    a, b = "Hello there.", " How are you?"
    assert sp.decode(sp.encode(a) + sp.encode(b)) == a + b
    assert sp.encode("<|user|>") == [5] and sp.encode("<|end|>") == [7]
    assert sp.encode("<|user|>Hi<|end|>")[0] == 5
    assert sp.decode([1, 5] + sp.encode("Hi") + [7, 2]) == "<|user|>Hi<|end|>"
    assert sp.decode(sp.encode("a\u2581b")) == "a b"  # SentencePiece's own space symbol: documented limit


def test_deterministic(tok, tmp_path):
    docs, _, stats, _ = tok
    _, again = train_tokenizer(tmp_path / "again", docs, vocab_size=1024)
    assert again["tokenizer_sha256"] == stats["tokenizer_sha256"]


def test_vocab_too_large_names_the_fix(tok, tmp_path):
    docs, *_ = tok
    with pytest.raises(StageError, match="lower train_tokenizer.vocab_size"):
        tt.run(tt.Config(vocab_size=200_000), docs, out=Artifact(tt.NAME, "x", tmp_path))


def test_bad_inputs(tmp_path):
    with pytest.raises(StageError, match="extract"):
        tt.run(tt.Config(), Artifact("extract", "x", tmp_path), out=Artifact(tt.NAME, "y", tmp_path))
    with pytest.raises(ValueError, match="vocab_size"):
        tt.Config(vocab_size=100)
