"""Talk to a model artifact in the terminal: `crawl2chat chat [ARTIFACT]` and `crawl2chat generate ARTIFACT PROMPT`.

The history is encoded with the one chat format (stages/lm/chat.py) and replies stream token by token from the
KV-cache engine. When the history outgrows the model's context, the oldest turns are dropped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TextIO

import torch

from stages.common import StageError
from stages.lm.chat import ChatTokenizer
from stages.lm.checkpoint import TOKENIZER, load_model
from stages.lm.engine import stream

PROMPT = "you> "
HELP = "Type a message and press Enter. /reset clears the history, /quit (or /exit, Ctrl-D) leaves, /help shows this."


class Chat:
    def __init__(self, model_dir: Path, temperature: float, top_k: int, max_new_tokens: int, seed: int | None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta, _ = load_model(model_dir, device)
        self.model.eval()
        self.tok = ChatTokenizer(model_dir / TOKENIZER)
        self.temperature, self.top_k, self.max_new_tokens, self.seed = temperature, top_k, max_new_tokens, seed
        self.history: list[dict] = []

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The history as a prompt, dropping the oldest turns until a reply of max_new_tokens fits."""
        while True:
            ids = self.tok.render_prompt(messages)
            if len(ids) + self.max_new_tokens <= self.model.cfg.seq_len or len(messages) <= 1:
                break
            messages = messages[2:] if len(messages) > 2 else messages[1:]
        if len(ids) >= self.model.cfg.seq_len:
            raise StageError(f"the message is {len(ids)} tokens, longer than the model's context of "
                             f"{self.model.cfg.seq_len}: send a shorter one")
        return ids

    def reply(self, text: str, out: TextIO) -> str:
        """Stream the answer to `text` into `out`; returns it and keeps both turns in the history."""
        messages = self.history + [{"role": "user", "content": text}]
        ids: list[int] = []
        shown = ""
        for tok_id in stream(self.model, self.prompt_ids(messages), self.max_new_tokens, self.temperature,
                             self.top_k, stop_ids=(self.tok.end, self.tok.eos), seed=self.seed):
            ids.append(tok_id)
            text_so_far = self.tok.decode(ids)  # decode the whole reply: pieces may split UTF-8 characters
            out.write(text_so_far[len(shown):])
            out.flush()
            shown = text_so_far
        out.write("\n")
        self.history = messages + [{"role": "assistant", "content": shown}]
        return shown


def repl(chat: Chat, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    stdout.write(f"chatting with {chat.meta.get('stage', 'model')} ({chat.model.num_params():,} parameters). "
                 f"{HELP}\n")
    while True:
        stdout.write(PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            chat.history = []
            stdout.write("(history cleared)\n")
            continue
        if re.fullmatch(r"/[a-z]+", text):  # /help, or a mistyped command: not a message for the model
            stdout.write(HELP + "\n" if text == "/help" else f"(unknown command {text}) {HELP}\n")
            continue
        stdout.write("assistant> ")
        try:
            chat.reply(text, stdout)
        except StageError as e:
            stdout.write(f"\n(error: {e})\n")
