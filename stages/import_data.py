"""Import conversations, preference pairs or verifiable problems as a versioned artifact.

    python -m stages.import_data --root artifacts --set kind=conversations \
        --set source=data/conversations/hh-rlhf-dialogues.800.jsonl
    python -m stages.import_data --root artifacts --set kind=problems --set source=https://host/gsm8k-train.jsonl

Training data other than the web text enters the DAG here, so it is versioned and appears in the lineage of every
model trained on it. The source is JSONL, one record a line (gzip-compressed when it ends in .gz), read from a
local path, an http(s) URL or any other fsspec URL (s3:// with s3fs installed):

    conversations  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preferences    {"prompt": str, "chosen": str, "rejected": str}
    problems       {"question": str, "answer": str | number}   (GSM8K: the final number after '####')

Output: `data.jsonl` (the valid records, normalised to the format's fields only; answers as strings),
`malformed.jsonl` (one {"line", "reason", "raw"} per rejected line: counted and kept, never silently dropped)
and `meta.json` (kind, source, sha256). Consumers read it with `load_records(artifact, kind)`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import fsspec
import requests
import urllib3

from stages.artifacts import Artifact
from stages.common import StageError, main
from stages.lm.chat import ROLES
from stages.lm.verifiers import check_problem

NAME = "import_data"
CODE_VERSION = 1
REPO = Path(__file__).resolve().parent.parent
KINDS = ("conversations", "preferences", "problems")
DATA, MALFORMED, META = "data.jsonl", "malformed.jsonl", "meta.json"
RAW_CHARS = 2000  # a malformed line is kept up to this many characters (a broken 10 MB line stays readable)
REPORTED = 50     # malformed lines named (number and reason) in the stats; all of them are in malformed.jsonl

# The bundled samples (data/README.md): the defaults of every preset.
DEFAULT_SOURCES = {
    "conversations": str(REPO / "data/conversations/hh-rlhf-dialogues.800.jsonl"),
    "preferences": str(REPO / "data/preferences/hh-rlhf-pairs.800.jsonl"),
    "problems": "",  # none bundled: without problems, rl's verifier draws its seeded arithmetic problems
}


def read_source(source: str) -> bytes:
    """The bytes of a local path or URL. https through requests, retried on the transient failures (connection
    errors, 429 and 5xx, with exponential backoff: urllib3's Retry); other URLs (s3://, memory://) through fsspec."""
    try:
        if source.startswith(("http://", "https://")):
            with requests.Session() as session:
                retry = urllib3.util.Retry(total=5, backoff_factor=1.0, status_forcelist=(429, 500, 502, 503, 504))
                session.mount(source.split("://")[0] + "://", requests.adapters.HTTPAdapter(max_retries=retry))
                response = session.get(source, timeout=60)
                response.raise_for_status()
                return response.content
        with fsspec.open(source, "rb") as f:
            return f.read()
    except (OSError, ValueError, ImportError, requests.RequestException) as e:  # ImportError: s3fs not installed
        raise ValueError(f"cannot read source {source!r} ({type(e).__name__}: {e}); give an existing JSONL "
                         f"path or URL") from None


@dataclass(frozen=True)
class Config:
    kind: str = "conversations"   # conversations | preferences | problems (formats in the module docstring)
    source: str = DEFAULT_SOURCES["conversations"]  # local path or fsspec URL; "" imports nothing (see run)
    # Why a content hash in the config: an artifact's version hashes its config (stages/artifacts.plan_version),
    # and the path alone would let an edited file, or a URL whose content moved on, reuse the stale artifact.
    # Hashing the source here, when the config is made, puts its bytes into the version with no special case in
    # the store, shows the hash in every manifest, and makes a missing source fail before anything runs. It is
    # not an init field: always computed, never set (replace() with a new source recomputes it). run() checks
    # the bytes it reads still have this hash, so a source that changes between planning and running is refused.
    source_sha256: str = dataclasses.field(init=False, default="")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.source:
            object.__setattr__(self, "source_sha256", hashlib.sha256(read_source(self.source)).hexdigest())


# ---- formats: each check returns why a record is malformed, or None -----------------------------------------
def check_conversation(rec: dict) -> str | None:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "no 'messages' list"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"a message is not {{role: {'|'.join(ROLES)}, content: str}}"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn to learn from"
    return None


def check_pair(rec: dict) -> str | None:
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            return f"'{key}' missing or empty"
    if rec["chosen"].strip() == rec["rejected"].strip():
        return "chosen and rejected are identical"
    return None


CHECKS = {"conversations": check_conversation, "preferences": check_pair, "problems": check_problem}


def normalise(kind: str, rec: dict) -> dict:
    """Only the format's fields, so extra columns of a source (ids, metadata) never reach training."""
    if kind == "conversations":
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]}
    if kind == "preferences":
        return {k: rec[k] for k in ("prompt", "chosen", "rejected")}
    return {"question": rec["question"], "answer": str(rec["answer"])}


def parse(kind: str, lines: list[str]) -> tuple[list[dict], list[dict], int]:
    """(valid records, malformed [{"line", "reason", "raw"}], blank lines); line numbers count from 1."""
    records, malformed, blank = [], [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            blank += 1
            continue
        try:
            rec = json.loads(line)
            why = CHECKS[kind](rec) if isinstance(rec, dict) else "not a JSON object"
        except json.JSONDecodeError as e:
            why = f"invalid JSON: {e.msg} at column {e.colno}"
        if why:
            malformed.append({"line": n, "reason": why, "raw": line[:RAW_CHARS]})
        else:
            records.append(normalise(kind, rec))
    return records, malformed, blank


def run(cfg: Config, *, out: Artifact) -> dict:
    if not cfg.source:
        raise StageError(f"no source to import {cfg.kind} from: set {cfg.kind}.source=PATH_OR_URL (a JSONL file)")
    raw = read_source(cfg.source)  # small datasets (MBs); read once, so the hash and the records share the bytes
    digest = hashlib.sha256(raw).hexdigest()
    if digest != cfg.source_sha256:
        raise StageError(f"{cfg.source} changed after this run was planned (sha256 {cfg.source_sha256[:12]} -> "
                         f"{digest[:12]}): run again, which plans a new version for the new content")
    if cfg.source.endswith(".gz"):
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise StageError(f"{cfg.source} is not UTF-8 text (byte {e.start}): give a UTF-8 JSONL file") from None
    lines = text.splitlines()
    records, malformed, blank = parse(cfg.kind, lines)
    if not records:
        first = malformed[0] if malformed else None
        raise StageError(f"{cfg.source} holds no valid {cfg.kind} ({len(malformed)} malformed lines; first: "
                         f"{first and {k: first[k] for k in ('line', 'reason')}}); check its format against "
                         f"stages/import_data.py")
    with open(out.path / DATA, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(out.path / MALFORMED, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(m, ensure_ascii=False) + "\n" for m in malformed)
    (out.path / META).write_text(json.dumps({"kind": cfg.kind, "source": cfg.source, "sha256": digest}))
    return {
        "kind": cfg.kind,
        "source": cfg.source,
        "source_sha256": digest,
        "lines": len(lines),
        "blank": blank,
        "valid": len(records),
        "malformed": len(malformed),
        "malformed_lines": [{k: m[k] for k in ("line", "reason")} for m in malformed[:REPORTED]],
    }


def load_records(art: Artifact, kind: str) -> list[dict]:
    """The valid records of an import_data artifact of `kind`; any other artifact is refused, naming the fix."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if art.stage != NAME:
        raise StageError(f"{art.ref} comes from the {art.stage} stage, but {kind} are read from an {NAME} artifact: "
                         f"pass the one made with kind={kind} (e.g. {NAME}/{kind})")
    have = json.loads((art.path / META).read_text())["kind"]
    if have != kind:
        raise StageError(f"{art.ref} holds {have}, not {kind}: pass the {NAME} artifact made with kind={kind} "
                         f"(e.g. {NAME}/{kind})")
    with open(art.path / DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def kind_of(art: Artifact) -> str | None:
    """The kind of an import_data artifact (None for any other stage's): for stages that sort their inputs."""
    return json.loads((art.path / META).read_text())["kind"] if art.stage == NAME else None


if __name__ == "__main__":
    main(sys.modules[__name__])
