"""Train a lossless SentencePiece BPE tokenizer on a deterministic, bounded sample of the extracted documents.

    python -m stages.train_tokenizer --root artifacts --input extract/latest
    python -m stages.train_tokenizer --root artifacts --input extract/latest --set vocab_size=2048   # tiny, CPU

Lossless means decode(encode(text)) == text for any text except the literal character "▁" (U+2581, which
SentencePiece uses for a space and decodes as one): no normalization, no collapsing of whitespace, no dummy
prefix (so encode(a) + encode(b) decodes to a + b, which the chat format relies on), and byte fallback for
every character the vocabulary lacks. Newlines: SentencePiece trains on lines, so documents are split on "\n";
a newline then encodes as the byte token <0x0A>.

Special tokens have fixed ids in every tokenizer this stage makes: <unk>=0, <|bos|>=1, <|eos|>=2, <|pad|>=3
(control tokens: encode never produces them, decode drops them) and <|system|>=4, <|user|>=5,
<|assistant|>=6, <|end|>=7 (user-defined: encode turns the literal text "<|user|>" into id 5, so
tokenize_shards escapes such literals in web text; chat code may build turns by encoding the markers).

Output: tokenizer.model, tokenizer.vocab, tokenizer.json (sha256 of the model, vocab size, special ids), and
hf/ with the files Hugging Face's LlamaTokenizer loads (`LlamaTokenizer.from_pretrained(artifact / "hf")`
gives the same ids). They sit in hf/ because transformers would read our tokenizer.json as its own format.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm

from stages.artifacts import Artifact, sha256_file
from stages.common import StageError, main
from stages.lm.export import write_hf_tokenizer

NAME = "train_tokenizer"
CODE_VERSION = 2  # 2: also writes hf/ (Hugging Face LlamaTokenizer files)

log = logging.getLogger(f"crawl2chat.{NAME}")

# Fixed ids, shared by every tokenizer and every model: changing them breaks every downstream artifact.
UNK, BOS, EOS, PAD = "<unk>", "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # ids 4..7
SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, PAD: 3, **{t: 4 + i for i, t in enumerate(CHAT_TOKENS)}}


@dataclass(frozen=True)
class Config:
    # 32768 = 2**15: nanochat's and Llama-2's order of size; fits uint16 shards. The tiny preset uses ~2048.
    vocab_size: int = 32768
    # Training sample bound, in characters of document text (~1 GB of English). SentencePiece BPE holds the
    # whole sample in memory (roughly 10x its size at peak), so this bounds the stage's RAM.
    max_sample_chars: int = 100_000_000
    # Documents kept out of the sample to measure bytes/token and check round trips (chars, ~10 MB).
    heldout_chars: int = 10_000_000
    # Lines longer than this are cut into pieces: SentencePiece skips sentences over max_sentence_length
    # bytes, and 4096 chars are at most 16384 utf-8 bytes, which is what we pass as max_sentence_length.
    max_line_chars: int = 4096
    # 0.9995: SentencePiece's default; the rarest 0.05% of characters are left to byte fallback.
    character_coverage: float = 0.9995
    seed: int = 0  # picks the sample: documents are ordered by sha256(seed, id)
    # SentencePiece trainer threads. Part of the recipe: 1 and 2 threads give different tokenizers (measured).
    num_threads: int = 2

    def __post_init__(self):
        n_reserved = len(SPECIAL_IDS) + 256  # specials + the 256 byte-fallback pieces
        if not n_reserved < self.vocab_size <= 2**31 - 1:
            raise ValueError(f"vocab_size must be more than {n_reserved} (special tokens and the 256 byte "
                             f"pieces), got {self.vocab_size}")
        if self.max_sample_chars <= 0 or self.heldout_chars < 0:
            raise ValueError("max_sample_chars must be positive and heldout_chars non-negative")
        if self.max_line_chars < 16:
            raise ValueError(f"max_line_chars must be at least 16, got {self.max_line_chars}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in [0.9, 1.0], got {self.character_coverage}")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")


# ---- reading documents (shared with tokenize_shards) ----------------------------------------------------------
def doc_files(docs: Artifact) -> list[Path]:
    """The parquet files of a docs artifact, in a fixed order."""
    files = sorted((docs.path / "docs").glob("**/*.parquet"))
    if not files:
        raise StageError(f"{docs.ref} has no docs/**/*.parquet under {docs.path}: pass an extract artifact "
                         f"(--input extract/latest), or re-run extract if it produced no documents")
    for f in files[:1]:
        missing = {"id", "text"} - set(pq.read_schema(f).names)
        if missing:
            raise StageError(f"{f} lacks column(s) {sorted(missing)}: it was not written by extract; "
                             f"re-run extract")
    return files


def iter_docs(files: list[Path], batch_size: int = 1024) -> Iterator[tuple[list[str], list[str]]]:
    """(ids, texts) batches over all documents, in file then row order."""
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["id", "text"]):
            yield batch.column("id").to_pylist(), batch.column("text").to_pylist()


def hash_unit(key: str) -> float:
    """A deterministic number in [0, 1) for a string: 64 bits of its sha256."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


# ---- the stage ------------------------------------------------------------------------------------------------
def _plan_sample(files: list[Path], cfg: Config) -> tuple[set[str], set[str]]:
    """Ids of the training sample and of the held-out docs: docs ordered by sha256(seed, id), held-out from
    the end of that order (up to heldout_chars, at most a tenth of the docs but at least one when there are
    two), the sample from the start (up to max_sample_chars)."""
    keyed = []
    for f in files:
        t = pq.read_table(f, columns=["id", "text"])
        lengths = pc.fill_null(pc.utf8_length(t.column("text")), 0).to_pylist()
        keyed += [(hash_unit(f"{cfg.seed}:{i}"), i, n) for i, n in zip(t.column("id").to_pylist(), lengths)]
    keyed.sort()
    heldout, chars = set(), 0
    max_heldout = max(1, len(keyed) // 10) if len(keyed) > 1 and cfg.heldout_chars > 0 else 0
    while len(heldout) < max_heldout and (not heldout or chars < cfg.heldout_chars):
        _, i, n = keyed.pop()
        heldout.add(i)
        chars += n
    sample, chars = set(), 0
    for _, i, n in keyed:
        if chars >= cfg.max_sample_chars:
            break
        sample.add(i)
        chars += n
    return sample, heldout


def _lines(files: list[Path], ids: set[str], max_line_chars: int) -> Iterator[str]:
    for batch_ids, texts in iter_docs(files):
        for i, text in zip(batch_ids, texts):
            if i not in ids or not text:
                continue
            for line in text.split("\n"):
                for start in range(0, len(line), max_line_chars):
                    yield line[start:start + max_line_chars]


def run(cfg: Config, docs: Artifact, *, out: Artifact) -> dict:
    files = doc_files(docs)
    sample, heldout = _plan_sample(files, cfg)
    if not sample:
        raise StageError(f"{docs.ref} has no documents to train a tokenizer on: re-run extract with more input")
    log.info("training on %d docs, %d held out", len(sample), len(heldout))

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(files, sample, cfg.max_line_chars), model_writer=model,
            model_type="bpe", vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
            max_sentence_length=4 * cfg.max_line_chars,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            user_defined_symbols=list(CHAT_TOKENS), num_threads=cfg.num_threads, minloglevel=2)
    except RuntimeError as e:
        if "smaller than required_chars" in str(e):  # fewer pieces than distinct characters to cover
            raise StageError(f"vocab_size={cfg.vocab_size} cannot hold the {docs.ref} sample's characters ({e}): "
                             f"raise train_tokenizer.vocab_size or lower train_tokenizer.character_coverage"
                             ) from None
        if "Vocabulary size" in str(e) or "vocab_size" in str(e):
            raise StageError(f"the sample of {docs.ref} is too small for vocab_size={cfg.vocab_size} ({e}): "
                             f"lower train_tokenizer.vocab_size or give extract more data") from None
        raise

    model_path = out.path / "tokenizer.model"
    model_path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    (out.path / "tokenizer.vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())))
    for piece, i in SPECIAL_IDS.items():
        assert sp.piece_to_id(piece) == i, f"SentencePiece put {piece} at {sp.piece_to_id(piece)}, not {i}"

    # Held-out quality: utf-8 bytes per token, and the lossless round trip on real text.
    n_bytes = n_tokens = checked = failed = 0
    for batch_ids, texts in iter_docs(files):
        chosen = [t for i, t in zip(batch_ids, texts) if i in heldout and t]
        for text, ids in zip(chosen, sp.encode(chosen, num_threads=cfg.num_threads)):
            n_bytes += len(text.encode())
            n_tokens += len(ids)
            checked += 1
            if sp.decode(ids) != text:
                failed += 1
    if failed:
        log.warning("%d of %d held-out docs do not round-trip (a literal U+2581 '▁' decodes as a space)",
                    failed, checked)

    sha = sha256_file(model_path)
    meta = {"tokenizer_sha256": sha, "model_file": "tokenizer.model", "model_type": "bpe",
            "vocab_size": sp.get_piece_size(), "special_tokens": SPECIAL_IDS,
            "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
    (out.path / "tokenizer.json").write_text(json.dumps(meta, indent=2))
    write_hf_tokenizer(model_path, out.path / "hf")  # the same writer as `crawl2chat export`
    return {"vocab_size": sp.get_piece_size(), "tokenizer_sha256": sha,
            "sample_docs": len(sample), "heldout_docs": len(heldout),
            "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else None,
            "roundtrip_checked": checked, "roundtrip_failed": failed}


def load_tokenizer(tok: Artifact) -> tuple[spm.SentencePieceProcessor, dict]:
    """The processor and tokenizer.json of a tokenizer artifact, checked against its recorded sha256."""
    meta_path, model_path = tok.path / "tokenizer.json", tok.path / "tokenizer.model"
    if not meta_path.exists() or not model_path.exists():
        raise StageError(f"{tok.ref} at {tok.path} has no tokenizer.json/tokenizer.model: pass a train_tokenizer "
                         f"artifact (--input train_tokenizer/latest)")
    meta = json.loads(meta_path.read_text())
    sha = sha256_file(model_path)
    if sha != meta["tokenizer_sha256"]:
        raise StageError(f"{model_path} has sha256 {sha[:12]}… but tokenizer.json says "
                         f"{meta['tokenizer_sha256'][:12]}…: the file is corrupt; re-run train_tokenizer")
    return spm.SentencePieceProcessor(model_file=str(model_path)), meta


if __name__ == "__main__":
    main(sys.modules[__name__])
