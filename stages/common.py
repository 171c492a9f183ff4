"""What every stage shares: building an artifact from a stage module, config overrides, and `python -m` entry.

A stage module exports `NAME`, `CODE_VERSION` (bump it when the same config would now give different output),
a frozen `Config` dataclass and `run(cfg, *inputs, out) -> dict`. `build` is the whole contract in one place:
plan the version, reuse a committed artifact, else run into the staging directory and commit. flows/tasks.py
wraps exactly this for Prefect; `python -m stages.<name>` calls it directly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import inspect
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from stages.artifacts import Artifact, ArtifactError, ArtifactStore, plan_version

log = logging.getLogger("crawl2chat")


class StageError(Exception):
    """Bad input at a stage's boundary. The message says what is wrong and how to fix it."""


@dataclasses.dataclass(frozen=True)
class BuildResult:
    artifact: Artifact
    reused: bool
    stats: dict


# ---- progress: a stage says how far it is; whoever runs it shows that -----------------------------------------
# Stages call progress(done, total, unit) as work completes and never import Prefect or rich. flows/tasks.py
# installs a reporter for the duration of a build (a progress artifact in the Prefect UI and a rich bar on the
# terminal, flows/progress.py); without one, progress() does nothing. A plain global rather than a contextvar:
# download reports from a thread pool, where context variables are not inherited, and one process builds one
# stage at a time.
Reporter = typing.Callable[[float, float, str], None]
_reporter: Reporter | None = None


def progress(done: float, total: float, unit: str = "steps") -> None:
    """Report that `done` of `total` units of the current stage's work are finished."""
    if _reporter is not None:
        _reporter(done, total, unit)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> typing.Iterator[None]:
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous


def config_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def runtime(default: Any) -> Any:
    """A Config field that only says how to run (processes, threads), not what to make: it is recorded in the
    manifest but left out of the version, so the same recipe on a bigger machine reuses the same artifact."""
    return dataclasses.field(default=default, metadata={"runtime": True})


REPO = Path(__file__).resolve().parent.parent  # this checkout


def portable(value: Any) -> Any:
    """A config value as it enters the version, with paths inside this checkout written `<repo>/...`. The presets
    point at the bundled data (data/) by absolute path, so that a run works from any directory; without this, the
    same recipe would get another version in every clone at another path, and nothing would be reused between
    them. The manifest keeps the real path."""
    if isinstance(value, str):
        root = str(REPO)
        return "<repo>" + value[len(root):] if value == root or value.startswith(root + "/") else value
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(portable(v) for v in value)
    return value


def recipe_dict(cfg: Any) -> dict:
    """The config as it enters the version: every field but the runtime() ones, checkout paths made portable."""
    return {k: portable(v) for k, v in config_dict(cfg).items()
            if not next(f for f in dataclasses.fields(cfg) if f.name == k).metadata.get("runtime")}


def build(stage: types.ModuleType, cfg: Any, inputs: list[Artifact], store: ArtifactStore) -> BuildResult:
    """Plan -> reuse if committed -> run in staging -> commit. Re-running a crashed build resumes in staging."""
    if hasattr(cfg, "resolved"):  # hardware-dependent choices ("auto" precision) enter the version as made
        cfg = cfg.resolved()
    version = plan_version(stage.NAME, stage.CODE_VERSION, recipe_dict(cfg), inputs)
    if store.is_committed(stage.NAME, version):
        art = store.get(stage.NAME, version)
        return BuildResult(art, True, art.manifest()["stats"])

    def waiting(holder: str) -> None:
        log.info("%s/%s: %s is building it; waiting to reuse it", stage.NAME, version, holder)

    with store.building(stage.NAME, version, on_wait=waiting):  # one builder per recipe, the others wait
        if store.is_committed(stage.NAME, version):  # built while this run waited
            art = store.get(stage.NAME, version)
            return BuildResult(art, True, art.manifest()["stats"])
        return _build_in_staging(stage, cfg, inputs, store, version)


def _build_in_staging(stage: types.ModuleType, cfg: Any, inputs: list[Artifact], store: ArtifactStore,
                      version: str) -> BuildResult:
    staging = store.staging_path(stage.NAME, version)
    staging.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    log.info("%s/%s: running in %s", stage.NAME, version, staging)
    out = Artifact(stage.NAME, version, staging)
    # Training stages run in several processes when CRAWL2CHAT_NPROC / _HOSTFILE / _LAUNCHER ask for it; the
    # version above never depends on that. Imported here, not at the top: launch.py imports this module.
    from stages.lm import launch
    settings = launch.Launch.from_env()
    if launch.wants_launch(stage, cfg, settings):
        stats = launch.run_stage(stage, cfg, inputs, out, settings)
    else:
        stats = stage.run(cfg, *inputs, out=out)
    art = store.commit(stage.NAME, version, config=config_dict(cfg), inputs=inputs,
                       code_version=stage.CODE_VERSION, stats=stats, started=started)
    return BuildResult(art, False, art.manifest()["stats"])  # as JSON, like a reused artifact's


# ---- config overrides: `field=value` strings typed by the dataclass field -----------------------------------
def _coerce(raw: str, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise StageError(f"{where}: '{raw}' is not a boolean; use true or false")
    if annotation in (int, float):
        try:
            return annotation(raw)
        except ValueError:
            raise StageError(f"{where}: '{raw}' is not a{'n' if annotation is int else ''} "
                             f"{annotation.__name__}") from None
    if annotation is str:
        return raw
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _coerce(raw, a, where)
                except StageError:
                    continue
        raise StageError(f"{where}: '{raw}' fits none of {annotation}")
    if origin in (tuple, list):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = [s for s in raw.split(",") if s]
        if not isinstance(value, list):
            raise StageError(f"{where}: expected a list such as a,b,c or [\"a\",\"b\"], got '{raw}'")
        item_type = next((a for a in args if a is not Ellipsis), str)
        value = [_coerce(str(v), item_type, where) for v in value]
        return tuple(value) if origin is tuple else value
    return raw


def apply_overrides(cfg: Any, overrides: dict[str, str], where: str) -> Any:
    """A copy of the frozen dataclass `cfg` with string overrides parsed to each field's type."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise StageError(f"{where} has no setting '{key}'; its settings are: {', '.join(fields)}")
        changes[key] = _coerce(raw, hints[key], f"{where}.{key}")
    try:
        return dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as e:  # __post_init__ validation says what is wrong
        raise StageError(f"{where}: {e}") from None


def parse_assignment(text: str, form: str = "field=value") -> tuple[str, str]:
    """`key=value` -> (key, value). form: how the caller's keys look, for the error (the CLI's are stage.field)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise StageError(f"malformed override '{text}': write it as {form}")
    return key.strip(), value.strip()


def check_input_count(stage: types.ModuleType, given: int) -> None:
    """The stage's run() takes its inputs positionally, in order: name them when too few or too many are given."""
    params = list(inspect.signature(stage.run).parameters.values())[1:]  # after cfg
    required = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    takes_more = any(p.kind == p.VAR_POSITIONAL for p in params)
    if given < len(required) or (given > len(required) and not takes_more):
        needs = f"{len(required)} input(s), in this order: {', '.join(required)}" if required else "no inputs"
        raise StageError(f"{stage.NAME} takes {needs}{' (and optional more)' if takes_more else ''}, but "
                         f"{given} --input were given; `python -m stages.{stage.NAME} --help` shows examples")


def main(stage: types.ModuleType, argv: list[str] | None = None) -> None:
    """`python -m stages.<name> --root DIR [--input stage/version ...] [--set field=value ...]`."""
    settings = "\n".join(f"  {k} = {v!r}" for k, v in config_dict(stage.Config()).items())
    p = argparse.ArgumentParser(prog=f"python -m stages.{stage.NAME}",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="\n\n".join(stage.__doc__.split("\n\n")[:2]),  # summary + usage
                                epilog=f"settings for --set, with their defaults:\n{settings}")
    p.add_argument("--root", default="artifacts", help="artifact store: a path or fsspec URL")
    p.add_argument("--input", action="append", default=[], help="input artifact: stage, stage/latest or stage/version")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Config field")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        store = ArtifactStore(args.root)
        cfg = apply_overrides(stage.Config(), dict(parse_assignment(s) for s in args.set), stage.NAME)
        check_input_count(stage, len(args.input))
        inputs = [store.get(*store.resolve(ref)) for ref in args.input]
        result = build(stage, cfg, inputs, store)
    except (StageError, ArtifactError) as e:
        sys.exit(f"error: {e}")
    store.set_alias(stage.NAME, "latest", result.artifact.version)
    state = "reused" if result.reused else "built"
    print(f"{state} {result.artifact.ref} at {result.artifact.path}")
    print(json.dumps(result.stats, indent=2, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
