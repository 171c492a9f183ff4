"""Versioned, immutable artifact store.

An artifact is a directory `{root}/{stage}/{version}/` that one stage wrote. Its version is a short hash of
the recipe that made it: stage name, the stage's code version, its config as canonical JSON and the versions
of its inputs. Same recipe, same version, so a committed artifact is reused instead of rebuilt, and changing
one stage's config gives that stage and everything downstream new versions while upstream is reused.

Commit is atomic and durable. A stage writes into a staging directory that depends only on (stage, version), so
a crashed stage finds its own partial work again and resumes it; one builder at a time holds it (`building`: a
lock the kernel drops when its holder dies, so a killed builder's work is taken over, not waited on). Commit
fsyncs every file, writes and fsyncs `manifest.json` (config, inputs, stats, every file with size and sha256),
then the `COMMITTED` marker, fsyncs the directories, and only then makes the artifact visible: locally by renaming
the staging directory into place (one atomic rename, then an fsync of the parent so the rename survives a power
loss), on an object store by uploading the files, the manifest and the marker last. Readers only trust
directories that hold the marker. A crash at any point leaves either no artifact (the next run resumes from
staging) or a complete one (tests/test_store_concurrency.py kills the committing process between every two steps).

`root` is a local path or any fsspec URL (s3://, gs://, memory:// in tests). Stages always read and write
local directories: artifacts on a remote root are materialised into a local cache (checked against their
manifest) before a stage reads them, and staged locally before they are uploaded.

    python -m stages.artifacts list --root artifacts        # what is in a store
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"
MARKER = "COMMITTED"
ALIASES = "_aliases"
STAGING = ".staging"
VERSION_CHARS = 12  # hex chars of sha256: 48 bits, collision-free for any realistic number of recipes
# What a stage name, a version and an alias may look like. Every path the store builds or removes is made of
# names checked against these first, since manifests, aliases and listings of a shared or remote store are data
# anyone with write access could have crafted ("../../home", "/etc"). A pattern rather than the list of this
# checkout's stages: a store also holds the stages of newer checkouts and of tests, and the pattern is what keeps
# a name a single path component.
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
VERSION_NAME = re.compile(rf"[0-9a-f]{{{VERSION_CHARS}}}")
ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Test hook: SIGKILL the committing process at this point of commit (one of COMMIT_STEPS), as a power loss or an
# OOM kill would stop it there: no exception, no clean-up.
KILL_ENV = "CRAWL2CHAT_SIGKILL_IN_COMMIT"
COMMIT_STEPS = ("files_synced", "manifest_written", "marker_written", "renamed")


class ArtifactError(Exception):
    """A problem with the store whose message names the fix."""


@dataclass(frozen=True)
class Artifact:
    """One committed (or, while a stage runs, staging) artifact: a local directory a stage reads or writes."""

    stage: str
    version: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.version}"

    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def plan_version(stage: str, code_version: int | str, config: dict, inputs: Sequence[Artifact]) -> str:
    """The version of the artifact this recipe makes. Input order matters: it is the stage's argument order."""
    recipe = {
        "stage": stage,
        "code_version": str(code_version),
        "config": config,
        "inputs": [a.ref for a in inputs],
    }
    return hashlib.sha256(canonical_json(recipe).encode()).hexdigest()[:VERSION_CHARS]


def sha256_file(path: Path | str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def code_revision() -> str:
    """The git commit of this checkout (plus '-dirty' when it has changes), or 'unknown' outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_name(stage: str, version: str | None = None, alias: str | None = None) -> None:
    """Refuse a stage, version or alias name that is not one plain path component of the expected form."""
    for kind, value, pattern in (("stage", stage, STAGE_NAME), ("version", version, VERSION_NAME),
                                 ("alias", alias, ALIAS_NAME)):
        if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
            raise ArtifactError(f"refusing {kind} name {value!r}: a {kind} is {pattern.pattern}; a manifest, alias "
                                f"or listing that gives another was written by something other than this store")


def check_relpath(path: str) -> None:
    """A manifest's file path must stay inside its artifact: relative, no '..', no empty or odd components."""
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise ArtifactError(f"refusing the manifest's file path {path!r}: it would reach outside its artifact")


def fsync_path(path: Path | str) -> None:
    """Flush a file's data, or a directory's entries, to stable storage (Linux opens both read-only for this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _crash_point(step: str) -> None:
    if os.environ.get(KILL_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ArtifactStore:
    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.root = str(root).rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self._base = str(Path(self._base).resolve())
        default_cache = Path(os.environ.get("CRAWL2CHAT_CACHE", Path.home() / ".cache" / "crawl2chat"))
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache

    @property
    def location(self) -> str:
        """The root as a user should read it: an absolute path for a local store, the URL otherwise."""
        return self._base if self.is_local else self.root

    # ---- paths ---------------------------------------------------------------------------------------------
    def _dir(self, stage: str, version: str) -> str:
        check_name(stage, version)
        return f"{self._base}/{stage}/{version}"

    def staging_path(self, stage: str, version: str) -> Path:
        """Where a stage writes. Stable for (stage, version), so a re-run after a crash resumes there."""
        check_name(stage, version)
        if self.is_local:
            return Path(self._base) / stage / STAGING / version
        return self.cache_dir / "staging" / self._root_key() / stage / version

    @contextlib.contextmanager
    def building(self, stage: str, version: str, on_wait=None):
        """Hold the builder lock of (stage, version) for the block: one process builds a recipe, every other one
        that asks for it waits here, then finds it committed and reuses it (or, if the builder failed, resumes
        its staging directory). Distinct recipes have distinct locks and never wait on each other.

        flock, not a lock file's existence: the kernel releases it when the holder exits however it exits
        (SIGKILL, OOM), so a dead builder's lock is taken over at once instead of waited on forever (tested with
        processes on one machine). On NFS, Linux maps flock to the server's byte-range locks (unless the mount
        says local_lock=flock, which makes them local to each machine), and the server frees a crashed client's
        locks when its lease expires; that was not tested here. The file keeps the holder's host and pid for the
        message on_wait(holder) gets. A remote store's staging, and so its lock, is in this machine's cache:
        there it serialises the runs of one machine."""
        lock_path = self.staging_path(stage, version).with_name(f"{version}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                if on_wait is not None:
                    on_wait(lock.read().strip() or "another process")
                fcntl.flock(lock, fcntl.LOCK_EX)  # until the holder commits, fails or dies
            lock.seek(0)
            lock.truncate()
            lock.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            lock.flush()
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _root_key(self) -> str:
        """A cache folder per remote root, so two stores sharing a cache never mix their artifacts."""
        return hashlib.sha256(self.root.encode()).hexdigest()[:16]

    # ---- reading -------------------------------------------------------------------------------------------
    def is_committed(self, stage: str, version: str) -> bool:
        return self.fs.exists(f"{self._dir(stage, version)}/{MARKER}")

    def get(self, stage: str, version: str) -> Artifact:
        """A committed artifact as a local directory (downloaded and checked into the cache when remote)."""
        if not self.is_committed(stage, version):
            raise ArtifactError(f"no committed artifact {stage}/{version} in {self.root}: "
                                f"run `crawl2chat artifacts list` to see what is there")
        if self.is_local:
            self._check_sizes(stage, version)
            return Artifact(stage, version, Path(self._dir(stage, version)))
        local = self.cache_dir / "artifacts" / self._root_key() / stage / version
        if not (local / MARKER).exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".download-"))
            self.fs.get(self._dir(stage, version) + "/", str(tmp), recursive=True)
            manifest = json.loads((tmp / MANIFEST).read_text())
            try:  # all of the manifest's names before any of them is used for a path
                for i in manifest["inputs"]:
                    check_name(i["stage"], i["version"])
                for f in manifest["files"]:
                    check_relpath(f["path"])
            except ArtifactError:
                shutil.rmtree(tmp)
                raise
            for f in manifest["files"]:
                if sha256_file(tmp / f["path"]) != f["sha256"]:
                    shutil.rmtree(tmp)
                    raise ArtifactError(f"{stage}/{version}: {f['path']} does not match its manifest in "
                                        f"{self.root}; run `crawl2chat artifacts verify {stage}/{version}`")
            local.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp, local)
            # An artifact may read files of an earlier version of its own stage by relative path
            # ("../<version>/..."; tokenize_shards extending a dataset): bring those into the cache beside it.
            for i in manifest["inputs"]:
                if i["stage"] == stage:
                    self.get(i["stage"], i["version"])
        return Artifact(stage, version, local)

    def _check_sizes(self, stage: str, version: str) -> None:
        """Every file of the manifest is there with its size. Not the sha256 (that is `verify`): hashing a
        dataset's shards on every reuse would cost minutes, and a stat catches what a crash, a cut copy or an
        append leaves behind."""
        base = Path(self._dir(stage, version))
        for f in self.manifest(stage, version)["files"]:
            check_relpath(f["path"])
            path = base / f["path"]
            if path.is_symlink() or not path.is_file() or path.stat().st_size != f["size"]:
                raise ArtifactError(f"{stage}/{version} is corrupt: {f['path']} is missing or not the size its "
                                    f"manifest records; run `crawl2chat artifacts verify {stage}/{version}`, "
                                    f"delete {base} and re-run to rebuild it")

    def manifest(self, stage: str, version: str) -> dict:
        try:
            with self.fs.open(f"{self._dir(stage, version)}/{MANIFEST}", "r") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{stage}/{version} is corrupt: its {MANIFEST} is missing or unreadable "
                                f"({type(e).__name__}); delete {self._dir(stage, version)} and re-run to rebuild "
                                f"it") from None

    def stages(self) -> list[str]:
        if not self.fs.exists(self._base):
            return []
        return sorted(Path(p).name for p in self.fs.ls(self._base, detail=False)
                      if self.fs.isdir(p) and STAGE_NAME.fullmatch(Path(p).name))

    def versions(self, stage: str) -> list[str]:
        """Committed versions of a stage, oldest first."""
        base = f"{self._base}/{stage}"
        if not self.fs.exists(base):
            return []
        found = []
        for p in self.fs.ls(base, detail=False):
            v = Path(p).name
            if VERSION_NAME.fullmatch(v) and self.is_committed(stage, v):
                # the marker holds the commit time: a corrupt manifest still lists, and `verify` reports it
                found.append((self.fs.cat_file(f"{base}/{v}/{MARKER}").decode().strip(), v))
        return [v for _, v in sorted(found)]

    def manifests(self) -> Iterable[dict]:
        for stage in self.stages():
            for v in self.versions(stage):
                yield self.manifest(stage, v)

    def require_stage(self, stage: str, what: str = "stage") -> None:
        """An error that lists the stages there are, unless `stage` is one of them."""
        if stage not in self.stages():
            known = ", ".join(self.stages()) or "none yet"
            raise ArtifactError(f"no {what} '{stage}' in {self.location} (stages: {known})")

    def resolve(self, ref: str) -> tuple[str, str]:
        """`stage`, `stage/latest`, `stage/<tag>`, `stage/<version>` or a version prefix -> (stage, version)."""
        stage, slash, name = ref.partition("/")
        name = name or "latest"
        if stage not in self.stages() and not slash:  # a bare version prefix, of any stage
            matches = [(s, v) for s in self.stages() for v in self.versions(s) if v.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ArtifactError(f"'{ref}' matches several artifacts: "
                                    f"{', '.join(f'{s}/{v}' for s, v in matches)}; give more characters")
        self.require_stage(stage, "stage or version")
        alias = self.read_alias(stage, name)
        if alias:
            return stage, alias
        matches = [v for v in self.versions(stage) if v.startswith(name)]
        if len(matches) == 1:
            return stage, matches[0]
        if not matches:
            raise ArtifactError(f"no version or alias '{name}' of stage '{stage}': "
                                f"run `crawl2chat artifacts list {stage}`")
        raise ArtifactError(f"'{name}' matches several versions of {stage}: {', '.join(matches)}; give more characters")

    # ---- aliases -------------------------------------------------------------------------------------------
    def set_alias(self, stage: str, name: str, version: str) -> None:
        check_name(stage, version, name)
        if not self.is_committed(stage, version):
            raise ArtifactError(f"cannot alias {stage}/{version}: it is not committed")
        path = f"{self._base}/{ALIASES}/{stage}/{name}"
        self.fs.makedirs(f"{self._base}/{ALIASES}/{stage}", exist_ok=True)
        if self.is_local:  # write-then-rename, so a reader never sees an empty alias file, even after a power loss
            tmp = Path(f"{path}.tmp-{os.getpid()}")
            _write_durably(tmp, version)
            os.replace(tmp, path)
            fsync_path(tmp.parent)
        else:
            self.fs.pipe_file(path, version.encode())

    def read_alias(self, stage: str, name: str) -> str | None:
        check_name(stage, alias=name)
        path = f"{self._base}/{ALIASES}/{stage}/{name}"
        if not self.fs.exists(path):
            return None
        version = self.fs.cat_file(path).decode().strip()
        check_name(stage, version)  # the alias file is data: it must name a version, not a path
        return version

    # ---- writing -------------------------------------------------------------------------------------------
    def commit(self, stage: str, version: str, *, config: dict, inputs: Sequence[Artifact],
               code_version: int | str, stats: dict, started: str, extra: dict | None = None) -> Artifact:
        """Seal the staging directory of (stage, version) into a committed, read-only artifact."""
        staging = self.staging_path(stage, version)
        files = []
        for p in sorted(staging.rglob("*")):
            if p.is_symlink():  # its target is outside what the manifest can vouch for, and may change
                raise ArtifactError(f"{stage}/{version}: the stage left a symbolic link, {p.relative_to(staging)}, "
                                    f"in its output; an artifact holds files only: copy the file instead")
            if p.is_file() and p.name not in (MANIFEST, MARKER):
                files.append({"path": p.relative_to(staging).as_posix(), "size": p.stat().st_size,
                              "sha256": sha256_file(p)})
                fsync_path(p)  # the stage's writes are on disk before anything says they are complete
        _crash_point("files_synced")
        manifest = {
            "stage": stage,
            "version": version,
            "code_version": str(code_version),
            "code_revision": code_revision(),
            "config": config,
            "inputs": [{"stage": a.stage, "version": a.version} for a in inputs],
            "started": started,
            "ended": _utcnow(),
            "host": socket.gethostname(),
            "stats": stats,
            "files": files,
            **(extra or {}),
        }
        _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _crash_point("manifest_written")
        _write_durably(staging / MARKER, manifest["ended"] + "\n")
        for d in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            fsync_path(d)  # every file's directory entry, the manifest's and the marker's included
        _crash_point("marker_written")
        final = self._dir(stage, version)
        if self.is_local:
            if Path(final).exists():  # committed by a concurrent run of the same recipe: keep theirs
                shutil.rmtree(staging)
            else:
                os.replace(staging, final)
                _crash_point("renamed")
                fsync_path(Path(final).parent)  # the rename itself is durable now
                fsync_path(staging.parent)
                # read-only only now: a crash before the rename leaves staging writable for the run that resumes it
                for p in Path(final).rglob("*"):  # committed artifacts are never modified: make that the default
                    if p.is_file():
                        p.chmod(0o444)
        else:
            for f in files:
                self.fs.put_file(str(staging / f["path"]), f"{final}/{f['path']}")
            self.fs.put_file(str(staging / MANIFEST), f"{final}/{MANIFEST}")
            self.fs.put_file(str(staging / MARKER), f"{final}/{MARKER}")  # last: now it exists for readers
            shutil.rmtree(staging)
        return self.get(stage, version)

    # ---- integrity and lineage -----------------------------------------------------------------------------
    def verify(self, stage: str, version: str) -> list[str]:
        """Re-hash every file of a committed artifact; returns the differences (empty when intact)."""
        base = self._dir(stage, version)
        try:
            manifest = self.manifest(stage, version)
        except ArtifactError as e:
            return [str(e)]
        problems = []
        listed = set()
        for f in manifest["files"]:
            try:
                check_relpath(f["path"])
            except ArtifactError as e:
                problems.append(str(e))
                continue
            listed.add(f["path"])
            path = f"{base}/{f['path']}"
            if self.is_local and Path(path).is_symlink():
                problems.append(f"symbolic link: {f['path']} (an artifact holds files only)")
            elif not self.fs.exists(path):
                problems.append(f"missing: {f['path']}")
            elif self.fs.size(path) != f["size"]:
                problems.append(f"size changed: {f['path']} ({f['size']} -> {self.fs.size(path)} bytes)")
            elif sha256_file(path, self.fs) != f["sha256"]:
                problems.append(f"content changed: {f['path']} (sha256 differs from the manifest)")
        for p in self.fs.find(base):
            rel = p[len(base.rstrip("/")) + 1:] if p.startswith(base) else Path(p).name
            if rel not in listed and rel not in (MANIFEST, MARKER):
                problems.append(f"unexpected file: {rel}")
        return problems

    def upstream(self, stage: str, version: str) -> dict:
        """The tree of artifacts that fed this one: {"ref", "stats", "inputs": [...]}."""
        manifest = self.manifest(stage, version)
        return {"ref": f"{stage}/{version}", "manifest": manifest,
                "inputs": [self.upstream(i["stage"], i["version"]) for i in manifest["inputs"]]}

    def downstream(self, stage: str, version: str) -> list[str]:
        """Every committed artifact built, directly or not, from this one."""
        children: dict[str, list[str]] = {}
        for m in self.manifests():
            for i in m["inputs"]:
                children.setdefault(f"{i['stage']}/{i['version']}", []).append(f"{m['stage']}/{m['version']}")
        seen, todo = [], [f"{stage}/{version}"]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in seen:
                    seen.append(child)
                    todo.append(child)
        return seen
