"""One chat encoding for SFT, reward modelling, RL, evaluation and the chat CLI.

    <|bos|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> <|user|> ...

Each turn is a role token, the content's SentencePiece ids, and <|end|>. The loss mask covers the assistant's
content and its <|end|> (so the model learns when to stop), nothing else. To generate, render the history and
append <|assistant|>; sampling stops at <|end|>.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

from stages.common import StageError

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MARKERS = SPECIALS[3:]  # the chat markers: SentencePiece user-defined symbols, matched in raw text
ROLES = ("system", "user", "assistant")


def marker_escapes(sp: spm.SentencePieceProcessor) -> dict[int, list[int]]:
    """Chat marker id -> the same text as ordinary tokens ("<" then "|user|>").

    The markers are SentencePiece user-defined symbols, so the literal text "<|user|>" in a web page or a
    user's message would encode to the marker itself; swapping in these ids keeps text from forging turns.
    """
    return {sp.piece_to_id(t): sp.encode(t[:1]) + sp.encode(t[1:]) for t in MARKERS}


class ChatTokenizer:
    def __init__(self, model_path: Path | str):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        ids = {piece: self.sp.piece_to_id(piece) for piece in SPECIALS}
        missing = [p for p, i in ids.items() if i == self.sp.unk_id() or self.sp.id_to_piece(i) != p]
        if missing:
            raise StageError(f"tokenizer {model_path} lacks the chat special tokens {missing}: "
                             f"re-train it with stages.train_tokenizer, which reserves them")
        self.bos, self.eos, self.pad = ids["<|bos|>"], ids["<|eos|>"], ids["<|pad|>"]
        self.end = ids["<|end|>"]
        self.role = {r: ids[f"<|{r}|>"] for r in ROLES}
        self.vocab_size = self.sp.vocab_size()
        self.escapes = marker_escapes(self.sp)

    def encode(self, text: str) -> list[int]:
        """Text as ordinary tokens: a literal chat marker in it never becomes the special token."""
        ids = self.sp.encode(text)
        if any(i in self.escapes for i in ids):
            ids = [j for i in ids for j in self.escapes.get(i, (i,))]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def encode_conversation(self, messages: list[dict], max_len: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, mask): mask[i] = 1 where ids[i] is an assistant token to train on. Truncates at max_len."""
        ids, mask = [self.bos], [0]
        for m in messages:
            role = m.get("role")
            if role not in self.role:
                raise StageError(f"unknown chat role {role!r}: use one of {', '.join(ROLES)}")
            content = self.encode(m["content"]) + [self.end]
            train = 1 if role == "assistant" else 0
            ids += [self.role[role]] + content
            mask += [0] + [train] * len(content)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """The history followed by <|assistant|>, ready for the model to write the next reply."""
        ids, _ = self.encode_conversation(messages)
        return ids + [self.role["assistant"]]


_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_transcript_to_messages(text: str) -> list[dict]:
    """Anthropic hh-rlhf transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> chat messages."""
    parts = _TURN.split(text)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages
