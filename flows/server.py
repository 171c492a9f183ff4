"""A local Prefect server for the CLI: `crawl2chat server start|stop|status`.

`start` runs `prefect server start` (API and UI; SQLite under $PREFECT_HOME unless a database URL is given) as a
background process, waits until its health check answers, and writes a small state file,
$PREFECT_HOME/crawl2chat-server.json. Every later `crawl2chat` command reads that file (`use_server_from_state`)
and sets PREFECT_API_URL, so runs, deployments and schedules go to that server and show in its UI. An
explicit PREFECT_API_URL in the environment always wins. `stop` ends the process and removes the file.
`run` and `refresh` without a server start one of their own for the command (`temporary`).

This module imports no Prefect code: the CLI calls it before Prefect reads its settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from stages.common import StageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200  # Prefect's own default; the UI is at http://127.0.0.1:4200
STATE_NAME = "crawl2chat-server.json"
LOG_NAME = "crawl2chat-server.log"
TEMPORARY_LOG_NAME = "crawl2chat-temporary-server.log"  # the servers of single commands (`temporary`)


def prefect_home() -> Path:
    """$PREFECT_HOME as Prefect resolves it (default ~/.prefect), without importing Prefect."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


@dataclass(frozen=True)
class ServerState:
    pid: int
    url: str      # the UI, e.g. http://127.0.0.1:4200
    api_url: str  # what PREFECT_API_URL must be: url + /api
    log: str
    database: str  # "sqlite" or the database URL with its password masked

    @staticmethod
    def path() -> Path:
        return prefect_home() / STATE_NAME

    @classmethod
    def read(cls) -> "ServerState | None":
        try:
            return cls(**json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as e:
            raise StageError(f"{cls.path()} is not a crawl2chat server state file ({e}): delete it and run "
                             f"`crawl2chat server start` again") from e

    def write(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        self.path().write_text(json.dumps(asdict(self), indent=2) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process holds that pid: ours is gone
        return False
    # A zombie (exited, not yet reaped by its parent) still answers kill(0): look at its state in /proc.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True  # no /proc (macOS): trust kill(0)


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """GET <api>/health: the route Prefect leaves open even when basic auth is on."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed server's TIME_WAIT is no owner
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _mask(url: str) -> str:
    """postgresql+asyncpg://user:secret@host/db -> postgresql+asyncpg://user:***@host/db (for the state file)."""
    scheme, sep, rest = url.partition("://")
    creds, at, hostpart = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{hostpart}"


def start(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, database_url: str | None = None,
          timeout: float = 120.0) -> ServerState:
    """Start the server in the background and wait until it answers; returns its state (also on disk).

    database_url: a SQLAlchemy async URL (postgresql+asyncpg://user:pw@host:5432/prefect); default SQLite in
    $PREFECT_HOME. Basic auth is on when PREFECT_SERVER_API_AUTH_STRING ("user:password") is set in the
    environment; clients then need the same value in PREFECT_API_AUTH_STRING.
    timeout: seconds to wait for the first health check (the first start migrates the database: ~10-30 s).
    """
    old = ServerState.read()
    if old and _alive(old.pid):
        raise StageError(f"a Prefect server is already running at {old.url} (pid {old.pid}): use it, or "
                         f"`crawl2chat server stop` first")
    if not _port_free(host, port):
        raise StageError(f"port {port} on {host} is taken by another program: stop it, or pick another port "
                         f"with `crawl2chat server start --port N`")
    url = f"http://{host}:{port}"
    env = {"PREFECT_UI_API_URL": f"{url}/api"}  # where the UI in the browser finds the API
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log_path = prefect_home() / LOG_NAME
    try:
        proc = _launch(host, port, env, log_path, timeout)
    except StageError as e:
        if not database_url:
            raise
        raise StageError(f"{e}; check that the database at {_mask(database_url)} is running and that the URL, user "
                         f"and password are right") from None
    state = ServerState(pid=proc.pid, url=url, api_url=f"{url}/api", log=str(log_path),
                        database=_mask(database_url) if database_url else "sqlite")
    state.write()
    return state


def _launch(host: str, port: int, env: dict[str, str], log_path: Path, timeout: float) -> subprocess.Popen:
    """`prefect server start` in the background with `env` on top of ours; returns once its health check answers."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env}  # offline machines: no phoning home
    env.pop("PREFECT_API_URL", None)  # the server must not mistake itself for a client of another server
    api_url = f"http://{host}:{port}/api"
    with open(log_path, "ab") as log:
        # start_new_session: the server is not in the terminal's process group, so Ctrl-C on a command does not
        # reach it; stopping it signals the whole group it leads.
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                 "--port", str(port)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not healthy(api_url):
        if proc.poll() is not None:
            raise StageError(f"the Prefect server exited with code {proc.returncode} before answering: "
                             f"see {log_path} (last lines: {_tail(log_path)})")
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            raise StageError(f"the Prefect server did not answer {api_url}/health within {timeout:.0f} s: "
                             f"see {log_path}, or give it longer with --timeout")
        time.sleep(0.5)
    return proc


def _profile_api_url() -> str | None:
    """PREFECT_API_URL of the active Prefect profile (`prefect config set PREFECT_API_URL=...`, Prefect Cloud's
    login), read from profiles.toml without importing Prefect."""
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml")
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


@contextlib.contextmanager
def temporary(timeout: float = 120.0) -> Iterator[None]:
    """A server for one command (`run`, `refresh`) when none is set: started, pointed at, stopped at the end.

    Why not Prefect's own temporary server: it runs in the terminal's process group, so Ctrl-C killed it before
    the flow could record the interrupt, and the command then spent two minutes printing connection errors and
    exited 1. This one leads its own session: Ctrl-C reaches only the flow, which records its crash and stops
    (exit 130). Same database as Prefect's ($PREFECT_HOME), no UI; `crawl2chat server start` gives one that
    stays. Called before Prefect is imported, like use_server_from_state.
    """
    if os.environ.get("PREFECT_API_URL") or _profile_api_url():  # `server start`'s, or one the user named
        yield
        return
    with socket.socket() as probe:  # a free port: several commands may each run their own
        probe.bind((DEFAULT_HOST, 0))
        port = probe.getsockname()[1]
    proc = _launch(DEFAULT_HOST, port, {"PREFECT_UI_ENABLED": "false"}, prefect_home() / TEMPORARY_LOG_NAME,
                   timeout)
    os.environ["PREFECT_API_URL"] = f"http://{DEFAULT_HOST}:{port}/api"
    try:
        yield
    finally:
        if "prefect" in sys.modules:  # send the run's last logs and events while the server still listens
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
            EventsWorker.drain_all(timeout=5)
        os.environ.pop("PREFECT_API_URL", None)
        _kill_group(proc.pid)
        proc.wait()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _kill_group(pid: int, grace: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn shuts down cleanly), SIGKILL after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop() -> ServerState | None:
    """Stop the server that `start` started; None when there was none."""
    state = ServerState.read()
    if state is None:
        return None
    if _alive(state.pid):
        _kill_group(state.pid)
    ServerState.path().unlink(missing_ok=True)
    return state


def use_server_from_state() -> str | None:
    """Point this process's Prefect client at the server `start` left running. Returns a warning or None.

    Called by the CLI before any Prefect import. PREFECT_API_URL already set in the environment wins. A state
    file whose process is gone is removed, with a warning (runs then start a `temporary` server).
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    try:
        state = ServerState.read()
    except StageError as e:
        return str(e)
    if state is None:
        return None
    if not _alive(state.pid):
        ServerState.path().unlink(missing_ok=True)
        return (f"the Prefect server started at {state.url} (pid {state.pid}) is no longer running: commands "
                f"run without it until `crawl2chat server start` starts one again")
    os.environ["PREFECT_API_URL"] = state.api_url
    return None
