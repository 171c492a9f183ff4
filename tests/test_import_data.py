"""The import stage: conversations, preference pairs and problems become versioned artifacts; malformed lines are
counted and kept with their line numbers; the version follows the source's content, not only its path."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading
from pathlib import Path

import fsspec
import pytest

from stages import import_data
from stages.artifacts import Artifact, ArtifactStore
from stages.common import StageError, apply_overrides, build

DATA = Path(__file__).resolve().parent.parent / "data"
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_conversations_keep_valid_records_and_report_malformed_lines(tmp_path):
    src = write_lines(tmp_path / "chats.jsonl", [
        json.dumps({**GOOD_CHAT, "id": 7}),                                      # 1: valid, extra field dropped
        '{"messages": [{"role": "user", "content": "cut off',                   # 2: invalid JSON
        "",                                                                      # 3: blank, not malformed
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),    # 4: no assistant turn
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),       # 5: unknown role
        json.dumps(["not", "an", "object"]),                                     # 6: not an object
        json.dumps(GOOD_CHAT),                                                   # 7: valid
    ])
    store = ArtifactStore(tmp_path / "store")
    res = build(import_data, import_data.Config(kind="conversations", source=str(src)), [], store)
    s = res.stats
    assert (s["lines"], s["blank"], s["valid"], s["malformed"]) == (7, 1, 2, 4)
    assert [m["line"] for m in s["malformed_lines"]] == [2, 4, 5, 6]
    reasons = [m["reason"] for m in s["malformed_lines"]]
    assert "invalid JSON" in reasons[0] and "assistant" in reasons[1] and "role" in reasons[2]
    assert reasons[3] == "not a JSON object"
    kept = [json.loads(line) for line in (res.artifact.path / "malformed.jsonl").read_text().splitlines()]
    assert [k["line"] for k in kept] == [2, 4, 5, 6] and kept[0]["raw"].endswith("cut off")  # the raw line, kept
    assert import_data.load_records(res.artifact, "conversations") == [GOOD_CHAT, GOOD_CHAT]
    assert s["source_sha256"] == res.artifact.manifest()["config"]["source_sha256"]


def test_bundled_preferences_and_problem_answers(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    prefs = build(import_data, import_data.Config(kind="preferences", source=str(DATA / "preferences" /
                                                                                 "hh-rlhf-pairs.800.jsonl")), [], store)
    # the bundled file has one pair with an empty 'chosen' (line 395): counted and named, not imported
    assert (prefs.stats["lines"], prefs.stats["valid"], prefs.stats["malformed"]) == (800, 799, 1)
    assert prefs.stats["malformed_lines"] == [{"line": 395, "reason": "'chosen' missing or empty"}]
    records = import_data.load_records(prefs.artifact, "preferences")
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in records)  # the "source" column is dropped

    src = write_lines(tmp_path / "problems.jsonl", [
        json.dumps({"question": "What is 2 + 3?", "answer": 5}),
        json.dumps({"question": "What is 7 - 4?", "answer": "7 - 4 = 3. #### 3"}),
        json.dumps({"question": "Name a colour.", "answer": "blue"}),
        json.dumps({"answer": "#### 1"}),
    ])
    probs = build(import_data, import_data.Config(kind="problems", source=str(src)), [], store)
    assert import_data.load_records(probs.artifact, "problems") == [
        {"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 7 - 4?", "answer": "7 - 4 = 3. #### 3"}]
    assert [m["line"] for m in probs.stats["malformed_lines"]] == [3, 4]


def test_version_follows_the_content_not_only_the_path(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    src = write_lines(tmp_path / "chats.jsonl", [json.dumps(GOOD_CHAT)])
    first = build(import_data, import_data.Config(source=str(src)), [], store)
    assert build(import_data, import_data.Config(source=str(src)), [], store).reused  # same bytes: reused

    edited = {"messages": GOOD_CHAT["messages"] + [{"role": "user", "content": "More?"},
                                                   {"role": "assistant", "content": "Sure."}]}
    write_lines(src, [json.dumps(GOOD_CHAT), json.dumps(edited)])  # same path, new content
    second = build(import_data, import_data.Config(source=str(src)), [], store)
    assert not second.reused and second.artifact.version != first.artifact.version
    assert second.stats["valid"] == 2 and import_data.load_records(first.artifact, "conversations") == [GOOD_CHAT]

    # a source that changes between planning (the config) and running is refused, not imported under a stale hash
    planned = import_data.Config(source=str(src))
    write_lines(src, [json.dumps(edited)])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match="changed after this run was planned"):
        import_data.run(planned, out=Artifact(import_data.NAME, "stale", out))


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www: (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_and_gzip_sources(tmp_path, http_folder):
    """http(s) URLs (requests) and other fsspec URLs (memory:// here, s3:// the same way); gzip when .gz."""
    body = (json.dumps(GOOD_CHAT) + "\n").encode()
    www, url = http_folder
    (www / "chats.jsonl").write_bytes(body)
    with fsspec.open("memory://imports/chats.jsonl.gz", "wb") as f:
        f.write(gzip.compress(body))
    store = ArtifactStore(tmp_path / "store")
    for source in (f"{url}/chats.jsonl", "memory://imports/chats.jsonl.gz"):
        res = build(import_data, import_data.Config(source=source), [], store)
        assert res.stats["valid"] == 1 and import_data.load_records(res.artifact, "conversations") == [GOOD_CHAT]
    with pytest.raises(ValueError, match="cannot read source.*404"):
        import_data.Config(source=f"{url}/missing.jsonl")


def test_bad_sources_and_wrong_artifacts_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="cannot read source"):
        import_data.Config(source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(StageError, match="conversations: cannot read source"):  # `--set conversations.source=...`
        apply_overrides(import_data.Config(), {"source": str(tmp_path / "missing.jsonl")}, "conversations")
    with pytest.raises(ValueError, match="kind must be one of"):
        import_data.Config(kind="pictures")

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match="set problems.source="):  # the pipeline skips an empty source
        import_data.run(import_data.Config(kind="problems", source=""), out=Artifact(import_data.NAME, "x", out))
    bad = write_lines(tmp_path / "bad.jsonl", ['{"messages": []}', "not json"])
    with pytest.raises(StageError, match="holds no valid conversations"):
        import_data.run(import_data.Config(source=str(bad)), out=Artifact(import_data.NAME, "x", out))

    store = ArtifactStore(tmp_path / "store")
    chats = build(import_data, import_data.Config(source=str(write_lines(tmp_path / "c.jsonl",
                                                                         [json.dumps(GOOD_CHAT)]))), [], store)
    with pytest.raises(StageError, match="holds conversations, not preferences.*kind=preferences"):
        import_data.load_records(chats.artifact, "preferences")
    with pytest.raises(StageError, match="from the sft stage.*import_data artifact"):
        import_data.load_records(Artifact("sft", "abc", tmp_path), "conversations")
