"""`crawl2chat chat` in a real pseudo-terminal, and `crawl2chat generate`, on a small committed chat model."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from docs_fixture import real_docs, train_tokenizer, write_docs
from stages.artifacts import ArtifactStore
from stages.lm.checkpoint import save_model
from stages.lm.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ArtifactStore:
    """A store holding one committed 'sft' model (random weights, real tokenizer)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("chatcli")
    tok, _ = train_tokenizer(tmp / "tok", write_docs(tmp / "docs", real_docs()[:30]), vocab_size=512)
    store = ArtifactStore(tmp / "store")
    staging = store.staging_path("sft", "0123456789ab")
    cfg = GPTConfig(vocab_size=512, seq_len=128, n_layer=1, n_embd=32, n_head=2, n_kv_head=2)
    save_model(GPT(cfg), staging, tok.path / "tokenizer.model", {"stage": "sft", "tokenizer_sha256": "x"})
    store.commit("sft", "0123456789ab", config={}, inputs=[], code_version=1, stats={}, started="")
    store.set_alias("sft", "latest", "0123456789ab")
    return store


def read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    """Bytes from the terminal until `marker` shows up (or the deadline: then the test fails on content)."""
    out, deadline = b"", time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def test_chat_in_a_pseudo_terminal(store):
    controller, terminal = pty.openpty()
    env = {**os.environ, "CRAWL2CHAT_ROOT": store.root, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "chat", "--max-new-tokens", "12", "--seed", "1"],
                            stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPO, env=env)
    os.close(terminal)
    try:
        banner = read_until(controller, b"you> ")
        assert b"chatting with sft" in banner, banner
        os.write(controller, b"Hello, who are you?\n")
        turn = read_until(controller, b"you> ")
        assert b"assistant> " in turn, turn
        reply = turn.split(b"assistant> ", 1)[1].rsplit(b"you> ", 1)[0].strip()
        assert reply, turn  # a random model still says something: 12 tokens at most, streamed
        os.write(controller, b"/reset\n")
        assert b"history cleared" in read_until(controller, b"you> ")
        os.write(controller, b"/hlep\n")  # a mistyped command is not sent to the model
        answer = read_until(controller, b"you> ")
        assert b"unknown command /hlep" in answer and b"assistant> " not in answer, answer
        os.write(controller, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(controller)


def test_generate_one_answer(store):
    env = {**os.environ, "CRAWL2CHAT_ROOT": store.root}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "sft", "What is 2 + 2?",
                             "--max-new-tokens", "8", "--temperature", "0"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    again = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "sft", "What is 2 + 2?",
                            "--max-new-tokens", "8", "--temperature", "0"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.stdout == result.stdout  # greedy is deterministic


def test_chat_without_a_model_says_what_to_run(tmp_path):
    env = {**os.environ, "CRAWL2CHAT_ROOT": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "chat"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "crawl2chat run" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
