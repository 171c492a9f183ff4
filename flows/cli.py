"""`crawl2chat`: run the pipeline and inspect its artifacts.

    crawl2chat run --preset tiny [--source DIR|URL] [--until STAGE] [--set stage.field=value ...]
    crawl2chat refresh [--crawl latest] [--source DIR|URL]    # a new dataset version from new WARC files only
    crawl2chat status
    crawl2chat artifacts list [STAGE] | show REF | lineage REF [--down] | verify [REF]
    crawl2chat chat [ARTIFACT] | generate ARTIFACT PROMPT
    crawl2chat export REF --format hf [--out DIR]
    crawl2chat server start [--port 4200] | stop | status
    crawl2chat deploy [--workdir DIR] | worker cpu|gpu
    crawl2chat run --deployment [--no-wait] ...     (a worker runs it; see infra/compose.yaml)
    crawl2chat schedule DEPLOYMENT --cron "0 3 * * 1" | schedule list | pause | resume | delete DEPLOYMENT

REF is `stage`, `stage/latest`, `stage/<version>` or a version prefix. The store is ./artifacts unless
--root or CRAWL2CHAT_ROOT says otherwise (a path or an fsspec URL). Errors are one line that names the fix,
with a non-zero exit. After `crawl2chat server start`, every command talks to that server (PREFECT_API_URL,
unless the environment already sets it).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from typer.core import TyperGroup

from stages.artifacts import ArtifactError, ArtifactStore
from stages.common import StageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Common Crawl -> chat model, one versioned stage at a time.")
artifacts_app = typer.Typer(no_args_is_help=True, help="List, inspect, trace and verify artifacts.")
app.add_typer(artifacts_app, name="artifacts")
server_app = typer.Typer(no_args_is_help=True, help="A local Prefect server with its UI (http://127.0.0.1:4200).")
app.add_typer(server_app, name="server")


class _ScheduleGroup(TyperGroup):
    """`schedule DEPLOYMENT --cron ...` is `schedule create DEPLOYMENT --cron ...`: the issue's spelling, next
    to the list | pause | resume | delete subcommands."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["create", *args]
        return super().resolve_command(ctx, args)


schedule_app = typer.Typer(cls=_ScheduleGroup, no_args_is_help=True,
                           help="Cron schedules of deployments: `schedule DEPLOYMENT --cron '0 3 * * 1'`, "
                                "list, pause, resume, delete.")
app.add_typer(schedule_app, name="schedule")
console = Console()


@app.callback()
def _use_server():
    # Before any command imports Prefect: point it at the server `crawl2chat server start` left running.
    from flows.server import use_server_from_state

    warning = use_server_from_state()
    if warning:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)

ROOT = typer.Option(None, "--root", envvar="CRAWL2CHAT_ROOT", help="artifact store: path or fsspec URL")


def _root(root: Optional[str]) -> str:
    return root or "artifacts"


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _interrupted() -> None:
    console.print("[bold yellow]interrupted:[/] committed stages are kept and the interrupted one resumes from its "
                  "staging folder (its last checkpoint): run the same command again", highlight=False, soft_wrap=True)
    raise typer.Exit(130)  # 128 + SIGINT, as a shell reports a Ctrl-C


def _store(root: Optional[str]) -> ArtifactStore:
    return ArtifactStore(_root(root))


# ---- run -----------------------------------------------------------------------------------------------------
@app.command()
def run(preset: str = typer.Option("tiny", help="tiny | small | d20"),
        source: Optional[str] = typer.Option(None, help="Common-Crawl-layout folder or URL (overrides the preset)"),
        until: Optional[str] = typer.Option(None, help="stop after this stage"),
        set_: list[str] = typer.Option([], "--set", help="override: stage.field=value (repeatable)"),
        deployment: bool = typer.Option(False, "--deployment",
                                        help="run on the server's cpu pool (a worker) instead of in-process"),
        wait: bool = typer.Option(True, help="with --deployment: wait for the run to end"),
        root: Optional[str] = ROOT):
    """Run the DAG end to end (unchanged stages are reused)."""
    from flows import presets

    try:
        # Fail fast, before Prefect starts, on a bad preset, override, stage name or source.
        cfg = presets.load(preset, set_, source)
        stops = [*presets.STAGES, *presets.IMPORTS]  # the imports stop by their slot: --until conversations
        if until is not None and until not in stops:
            raise StageError(f"unknown stage '{until}' for --until: choose one of {', '.join(stops)}")
        if deployment:  # a worker runs it: --source and --root are paths on the worker's machine, not checked here
            return _run_deployment(preset, source, until, list(set_), root, wait)
        if source and "://" not in source and not os.path.isdir(source):
            raise StageError(f"source folder {source} does not exist: give a Common-Crawl-layout folder "
                             f"(crawl-data/CC-MAIN-*/warc.paths.gz) or an http(s)/s3 URL")
        if source:
            from stages.download import read_listing

            read_listing(cfg.download)  # the listing is small; a source without one is a one-line error here
        from flows.server import temporary

        with temporary():
            from flows.pipeline import end_to_end

            built = end_to_end(preset=preset, overrides=list(set_), source=source, until=until, root=_root(root))
    except (StageError, ArtifactError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _interrupted()
    console.print(f"[bold green]done[/] ({len(built)} stages); artifacts in {_root(root)}")
    for ref in built:
        console.print(f"  {ref}")


@app.command()
def refresh(preset: str = typer.Option("small", help="tiny | small | d20: the data stages' settings"),
            crawl: str = typer.Option("latest", help="CC-MAIN-YYYY-WW, or latest (collinfo.json)"),
            source: Optional[str] = typer.Option(None, help="Common-Crawl-layout folder or URL (overrides the preset)"),
            max_files: int = typer.Option(8, help="at most this many new WARC files per refresh"),
            set_: list[str] = typer.Option([], "--set", help="override: stage.field=value (repeatable)"),
            root: Optional[str] = ROOT):
    """A new dataset version from the crawl's WARC files that no earlier version holds (flows/data_refresh.py)."""
    from flows import presets

    try:
        presets.load(preset, set_, source)  # fail fast on a bad preset or override, before Prefect starts
        from flows.server import temporary

        with temporary():
            from flows.data_refresh import data_refresh

            ref = data_refresh(preset=preset, crawl=crawl, source=source, max_files=max_files,
                               overrides=list(set_), root=_root(root))
    except (StageError, ArtifactError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _interrupted()
    console.print(f"[bold green]dataset[/] {ref} (alias tokenize_shards/dataset)")


def _run_deployment(preset: str, source: Optional[str], until: Optional[str], overrides: list[str],
                    root: Optional[str], wait: bool) -> None:
    from flows import deploy

    params = dict(preset=preset, overrides=overrides, source=source, until=until)
    if root:  # else the deployment's default, ./artifacts in the worker's working directory
        params["root"] = root
    run_id, _, link = deploy.trigger(deploy.END_TO_END, params)  # its name comes when a worker starts it
    console.print(f"flow run created: {link}", soft_wrap=True)
    workers = ("a worker on the cpu pool (`crawl2chat worker cpu`) runs it, and one on the gpu pool (`crawl2chat "
               "worker gpu`) its training stages")
    if not wait:
        console.print(workers, highlight=False, soft_wrap=True)
        return
    for pool in ("cpu", "gpu"):
        if not deploy.online_workers(pool):
            console.print(f"[yellow]warning:[/] no worker polls the {pool} pool yet", highlight=False)
    console.print(f"waiting: {workers}...", highlight=False, soft_wrap=True)
    run = deploy.wait(run_id)
    if not run.state.is_completed():
        _fail(f"flow run {run.name} ended {run.state.name}: {run.state.message or ''} (logs: {link})")
    console.print(f"[bold green]done[/] flow run {run.name}")


# ---- server, deployments, schedules ------------------------------------------------------------------------
@server_app.command("start")
def server_start(host: str = typer.Option("127.0.0.1", help="address to listen on"),
                 port: int = typer.Option(4200, help="port of the API and UI"),
                 database_url: Optional[str] = typer.Option(
                     None, envvar="PREFECT_API_DATABASE_CONNECTION_URL",
                     help="postgresql+asyncpg://user:password@host:5432/db (default: SQLite in $PREFECT_HOME)"),
                 timeout: float = typer.Option(120, help="seconds to wait for the server to answer")):
    """Start a Prefect server (API and UI) in the background; later commands use it."""
    from flows import server

    state = server.start(host, port, database_url, timeout)
    console.print(f"[bold green]Prefect server running[/] (pid {state.pid}, database {state.database})\n"
                  f"  UI:  {state.url}\n  API: {state.api_url}  (crawl2chat commands use it from now on)\n"
                  f"  log: {state.log}", highlight=False, soft_wrap=True)


@server_app.command("stop")
def server_stop():
    """Stop the server that `crawl2chat server start` started."""
    from flows import server

    state = server.stop()
    console.print(f"stopped the Prefect server at {state.url} (pid {state.pid})" if state else
                  "no server started by `crawl2chat server start` is running", highlight=False)


@server_app.command("status")
def server_status():
    """Where the server is and whether it answers."""
    from flows import server

    state = server.ServerState.read()
    if state is None:
        _fail("no server started by `crawl2chat server start`: start one with `crawl2chat server start`")
    ok = server.healthy(state.api_url)
    console.print(f"{state.url} (pid {state.pid}, database {state.database}): "
                  f"{'[green]healthy[/]' if ok else '[red]not answering[/]'}; log {state.log}", highlight=False)
    if not ok:
        raise typer.Exit(1)


@app.command("deploy")
def deploy_(workdir: Optional[str] = typer.Option(None, help="the repository on the workers (default: here)"),
            only: list[str] = typer.Option([], help="deploy only this one (repeatable)")):
    """Register the deployments (end-to-end on the cpu pool, train on the gpu pool) on the server."""
    from flows import deploy

    for name in deploy.deploy(workdir, only or None):
        console.print(f"deployed [bold]{name}[/]")
    console.print("start workers with `crawl2chat worker cpu` and `crawl2chat worker gpu`", highlight=False)


@app.command()
def worker(pool: str = typer.Argument(..., help="cpu or gpu"),
           run_once: bool = typer.Option(False, help="run the flow runs that are due, then exit")):
    """Run a Prefect process worker for POOL against the server (`prefect worker start`, pointed at it)."""
    from flows.deploy import POOLS, require_server

    if pool not in POOLS:
        _fail(f"unknown pool '{pool}': choose one of {', '.join(POOLS)}")
    require_server()  # the callback set PREFECT_API_URL from `crawl2chat server start`; the worker inherits it
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    os.execv(sys.executable, cmd + (["--run-once"] if run_once else []))


@schedule_app.command("create")
def schedule_create(deployment: str = typer.Argument(..., help="deployment name, e.g. data-refresh or "
                                                                 "crawl2chat/end-to-end"),
                    cron: str = typer.Option(..., help="five cron fields, e.g. '0 3 * * 1' (Mondays 03:00)"),
                    timezone: str = typer.Option("UTC", help="IANA time zone of the cron times")):
    """Run DEPLOYMENT on a cron schedule."""
    from flows import deploy

    sid, created = deploy.add_schedule(deployment, cron, timezone)
    console.print(f"{'scheduled' if created else 'already scheduled (made active)'} {deployment}: "
                  f"'{cron}' {timezone} (schedule {sid[:8]})", highlight=False)


@schedule_app.command("list")
def schedule_list(deployment: Optional[str] = typer.Argument(None, help="one deployment; all when left out")):
    """Every deployment's schedules, active or paused, with the next run."""
    from flows import deploy

    table = Table()
    for col in ("deployment", "schedule", "cron", "timezone", "active", "next run"):
        table.add_column(col, overflow="fold")  # whole names and times, folded, on narrow terminals
    for r in deploy.list_schedules(deployment):
        table.add_row(r["deployment"], r["id"][:8], r["schedule"], r["timezone"],
                      "yes" if r["active"] else "paused", r["next_run"])
    console.print(table)


def _schedule_action(action: str, deployment: str, schedule_id: Optional[str]) -> None:
    from flows import deploy

    n = deploy.set_schedules(deployment, action, schedule_id)
    done = {"pause": "paused", "resume": "resumed", "delete": "deleted"}[action]
    console.print(f"{done} {n} schedule(s) of {deployment}", highlight=False)


SCHEDULE_ID = typer.Option(None, "--id", help="only this schedule (an id prefix from `schedule list`)")


@schedule_app.command("pause")
def schedule_pause(deployment: str, schedule_id: Optional[str] = SCHEDULE_ID):
    """Stop scheduling runs (the schedule is kept)."""
    _schedule_action("pause", deployment, schedule_id)


@schedule_app.command("resume")
def schedule_resume(deployment: str, schedule_id: Optional[str] = SCHEDULE_ID):
    """Schedule runs again."""
    _schedule_action("resume", deployment, schedule_id)


@schedule_app.command("delete")
def schedule_delete(deployment: str, schedule_id: Optional[str] = SCHEDULE_ID):
    """Remove the schedules (and the runs they had scheduled)."""
    _schedule_action("delete", deployment, schedule_id)


# ---- status --------------------------------------------------------------------------------------------------
KEY_STATS = ("files_ok", "documents", "vocab_size", "bytes_per_token", "train_tokens", "val_loss", "val_bpb",
             "unigram_entropy", "val_assistant_loss_base", "val_assistant_loss", "val_accuracy", "val_accuracy_ci95",
             "val_reward_before", "val_reward_after", "val_accuracy_before", "val_accuracy_after", "hellaswag_acc",
             "gsm8k_acc", "reward_mean", "win_rate_vs_sft", "valid", "malformed", "real_token_fraction")


@app.command()
def status(root: Optional[str] = ROOT):
    """The latest artifact of every stage (and of each import), with its headline numbers."""
    from flows import presets

    store = _store(root)
    table = Table(title=f"artifacts in {store.location}")
    for col in ("stage", "latest", "headline"):
        table.add_column(col, overflow="fold")
    for slot in presets.SLOTS:
        name, alias = presets.slot_alias(slot)
        latest = store.read_alias(name, alias)
        if not latest:
            table.add_row(slot, "-", "not run yet")
            continue
        try:
            m = store.manifest(name, latest)
        except ArtifactError:
            table.add_row(slot, latest, f"CORRUPT: run `crawl2chat artifacts verify {name}/{latest}`")
            continue
        head = ", ".join(f"{k}={_fmt(m['stats'][k])}" for k in KEY_STATS if k in m["stats"])
        table.add_row(slot, latest, head)
    console.print(table)
    if not store.stages():  # a wrong folder looks like a fresh store: say where we looked
        console.print(f"no artifacts under {store.location} yet: run `crawl2chat run --preset tiny`, or point --root "
                      f"(or CRAWL2CHAT_ROOT) at an existing store", highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    if isinstance(v, list):  # an interval
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- artifacts -----------------------------------------------------------------------------------------------
def _resolve(store: ArtifactStore, ref: str) -> tuple[str, str]:
    try:
        return store.resolve(ref)
    except ArtifactError as e:
        _fail(str(e))


@artifacts_app.command("list")
def list_(stage: Optional[str] = typer.Argument(None), root: Optional[str] = ROOT):
    """Committed artifacts, oldest first."""
    from flows import presets

    store = _store(root)
    table = Table()
    for col in ("artifact", "ended", "inputs", "aliases"):
        table.add_column(col)
    if stage:
        try:
            store.require_stage(stage)
        except ArtifactError as e:
            _fail(str(e))
    for s in [stage] if stage else store.stages():
        for v in store.versions(s):
            aliases = ", ".join(a for a in ("latest", "dataset", *presets.IMPORTS) if store.read_alias(s, a) == v)
            try:
                m = store.manifest(s, v)
            except ArtifactError:
                table.add_row(f"{s}/{v}", "CORRUPT", "run `crawl2chat artifacts verify`", aliases)
                continue
            table.add_row(f"{s}/{v}", m["ended"], ", ".join(f"{i['stage']}/{i['version']}" for i in m["inputs"]),
                          aliases)
    console.print(table)


@artifacts_app.command()
def show(ref: str, root: Optional[str] = ROOT):
    """The manifest of one artifact (config, inputs, stats, files) as JSON."""
    store = _store(root)
    stage, version = _resolve(store, ref)
    m = store.manifest(stage, version)
    m["path"] = f"{store.root}/{stage}/{version}"
    console.print_json(json.dumps(m, default=str))


@artifacts_app.command()
def lineage(ref: str, down: bool = typer.Option(False, "--down", help="what was built from it, not what fed it"),
            root: Optional[str] = ROOT):
    """What fed an artifact, back to the WARC files (or, with --down, everything built from it)."""
    store = _store(root)
    stage, version = _resolve(store, ref)
    if down:
        for child in store.downstream(stage, version):
            console.print(child)
        return

    shown: set[str] = set()

    def add(node: Tree, up: dict) -> None:
        if up["ref"] in shown:  # a DAG, not a tree: the WARC files feed every model stage, so list each once
            node.add(f"{up['ref']}  (shown above)")
            return
        shown.add(up["ref"])
        branch = node.add(f"[bold]{up['ref']}[/]  ({up['manifest']['ended']})")
        if up["manifest"]["stage"] == "download":
            for f in up["manifest"]["files"]:
                if f["path"].endswith(".warc.gz"):
                    branch.add(f"{f['path']}  sha256 {f['sha256'][:12]}")
        for i in up["inputs"]:
            add(branch, i)

    tree = Tree(f"lineage of {stage}/{version}")
    add(tree, store.upstream(stage, version))
    console.print(tree)


@artifacts_app.command()
def verify(ref: Optional[str] = typer.Argument(None, help="one artifact; all committed ones when left out"),
           root: Optional[str] = ROOT):
    """Re-hash every file against its manifest; exit 1 on any difference."""
    store = _store(root)
    targets = [_resolve(store, ref)] if ref else [(s, v) for s in store.stages() for v in store.versions(s)]
    bad = 0
    for stage, version in targets:
        problems = store.verify(stage, version)
        if problems:
            bad += 1
            console.print(f"[red]CORRUPT[/] {stage}/{version}")
            for p in problems:
                console.print(f"    {p}", highlight=False)
        else:
            console.print(f"[green]ok[/] {stage}/{version}")
    if bad:
        _fail(f"{bad} of {len(targets)} artifacts differ from their manifests: delete them "
              f"and re-run the pipeline to rebuild them")


# ---- export --------------------------------------------------------------------------------------------------
@app.command()
def export(ref: str = typer.Argument(..., metavar="ARTIFACT", help="a pretrain, sft, reward_model or rl artifact"),
           format_: str = typer.Option("hf", "--format", help="hf: a Hugging Face Llama directory"),
           out: Optional[str] = typer.Option(None, "--out", help="folder (default: exports/<stage>-<version>-hf)"),
           root: Optional[str] = ROOT):
    """Write a model artifact in another format (hf: transformers' LlamaForCausalLM + LlamaTokenizer)."""
    if format_ != "hf":
        _fail(f"unknown export format '{format_}': use --format hf")
    store = _store(root)
    stage, version = _resolve(store, ref)
    out_dir = Path(out) if out else Path("exports") / f"{stage}-{version}-hf"
    from stages.lm.export import export_hf  # imports torch: only when exporting

    try:
        stats = export_hf(store.get(stage, version).path, out_dir)
    except (StageError, ArtifactError) as e:
        _fail(f"{stage}/{version}: {e}")
    console.print(f"[bold green]exported[/] {stage}/{version} ({stats['parameters']:,} parameters) to {out_dir}")
    if stats["left_out"]:
        console.print(f"  left out (no Llama equivalent): {', '.join(stats['left_out'])}")


# ---- chat ----------------------------------------------------------------------------------------------------
CHAT_STAGES = ("rl", "sft")  # the default model: the newest assistant, else the newest chat model
# sampling options shared by `chat` and `generate`
TEMPERATURE = typer.Option(0.8, min=0.0, help="0 is greedy")
TOP_K = typer.Option(50, min=0, help="sample among the k likeliest tokens (0: all)")
MAX_NEW_TOKENS = typer.Option(256, min=1, help="longest reply in tokens")
SEED = typer.Option(None, help="fix the sampling for reproducible replies")


def _model_dir(store: ArtifactStore, ref: Optional[str]) -> Path:
    if ref is None:
        found = [s for s in CHAT_STAGES if store.read_alias(s, "latest")]
        if not found:
            _fail(f"no chat model in {store.root} yet: run `crawl2chat run --preset tiny` first, or pass an "
                  f"ARTIFACT such as sft/<version>")
        ref = found[0]
    stage, version = _resolve(store, ref)
    return store.get(stage, version).path


@app.command()
def chat(ref: Optional[str] = typer.Argument(None, metavar="[ARTIFACT]", help="default: the newest rl, else sft"),
         temperature: float = TEMPERATURE, top_k: int = TOP_K, max_new_tokens: int = MAX_NEW_TOKENS,
         seed: Optional[int] = SEED,
         root: Optional[str] = ROOT):
    """A streaming chat in the terminal with a model artifact."""
    from flows.chat import Chat, repl

    store = _store(root)
    try:
        repl(Chat(_model_dir(store, ref), temperature, top_k, max_new_tokens, seed))
    except (StageError, ArtifactError) as e:
        _fail(str(e))


@app.command()
def generate(ref: str = typer.Argument(..., metavar="ARTIFACT"), prompt: str = typer.Argument(...),
             temperature: float = TEMPERATURE, top_k: int = TOP_K, max_new_tokens: int = MAX_NEW_TOKENS,
             seed: Optional[int] = SEED,
             root: Optional[str] = ROOT):
    """One answer to PROMPT, printed as it streams."""
    import sys

    from flows.chat import Chat

    store = _store(root)
    try:
        Chat(_model_dir(store, ref), temperature, top_k, max_new_tokens, seed).reply(prompt, sys.stdout)
    except (StageError, ArtifactError) as e:
        _fail(str(e))


def main():
    # typer's standalone mode turns typer.Exit into an exit code inside app(); errors raised by a command that
    # did not catch them arrive here instead, outside it, so exit directly.
    try:
        app()
    except (StageError, ArtifactError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(1)
    except httpx.HTTPStatusError as e:  # Prefect's client raises these; 401 is the one a user can fix here
        if e.response.status_code != 401:
            raise
        console.print(f"[bold red]error:[/] the Prefect server at {e.request.url.host}:{e.request.url.port} "
                      f"refused the credentials (401): set PREFECT_API_AUTH_STRING=user:password to the "
                      f"server's PREFECT_SERVER_API_AUTH_STRING", highlight=False, soft_wrap=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
