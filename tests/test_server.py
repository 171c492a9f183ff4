"""infra/compose.yaml's set-up without containers: Prefect on a real PostgreSQL with basic auth on, driven
through the CLI as a user would, and checked through the REST API.

    PostgreSQL (Debian's package, as an unprivileged user) <- `crawl2chat server start --database-url ...`
    with PREFECT_SERVER_API_AUTH_STRING set  <- `crawl2chat deploy | schedule ... | run --deployment`
    <- a process worker on the cpu pool, as compose's worker-cpu service runs it

Skips only when PostgreSQL's server binaries are missing (CI installs them: `apt-get install postgresql`).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from stages.artifacts import ArtifactStore

REPO = Path(__file__).resolve().parent.parent
AUTH = "crawl2chat:test-secret"  # user:password, as PREFECT_SERVER_API_AUTH_STRING takes it
PG_PASSWORD = "pg-secret"
CRON = "0 3 * * 1"  # 03:00 UTC on Mondays


def _pg_bin() -> Path | None:
    """Debian keeps initdb and pg_ctl in /usr/lib/postgresql/<major>/bin, off PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


PG_BIN = _pg_bin()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with password auth; yields its SQLAlchemy URL."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    # PostgreSQL refuses to run as root: as root, run it as the package's postgres user (or nobody). Its
    # folder lives outside pytest's tmp (mode 0700, root's) so that user can reach it.
    user = None
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
    base = Path(tempfile.mkdtemp(prefix="crawl2chat-pg-"))
    data, port = base / "data", free_port()
    (base / "pw").write_text(PG_PASSWORD + "\n")
    if user:
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        os.chown(base / "pw", entry.pw_uid, entry.pw_gid)

    def pg(*args: str) -> None:
        result = subprocess.run([str(PG_BIN / args[0]), *args[1:]], user=user, capture_output=True, text=True,
                                env={**os.environ, "PGPASSWORD": PG_PASSWORD}, timeout=120, cwd=base)
        assert result.returncode == 0, f"{args}: {result.stdout[-2000:]} {result.stderr[-2000:]}"

    pg("initdb", "-D", str(data), "-U", "prefect", f"--pwfile={base / 'pw'}", "--auth-local=trust",
       "--auth-host=scram-sha-256", "-E", "UTF8")
    # -k: the Unix socket goes in our folder (the default /var/run/postgresql needs the package's set-up)
    pg("pg_ctl", "-D", str(data), "-l", str(base / "postgres.log"), "-w", "-t", "60",
       "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect")
        yield f"postgresql+asyncpg://prefect:{PG_PASSWORD}@127.0.0.1:{port}/prefect", port
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """`crawl2chat server start` on the PostgreSQL database with auth on; yields (client env, API URL)."""
    home = tmp_path_factory.mktemp("prefect-home")
    # not PREFECT_* (the test picks its server) nor torch.distributed's variables: in-process training in an
    # earlier test set them here, with its rendezvous port still open, and a child would try to listen on it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PREFECT_HOME=str(home), PYTHONUNBUFFERED="1", PREFECT_SERVER_API_AUTH_STRING=AUTH, COLUMNS="200",
               # the scheduler turns schedules into runs every 60 s by default; the test checks those runs
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    port = free_port()
    started = crawl2chat("server", "start", "--port", str(port), "--database-url", postgres[0], env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    client_env = {**env, "PREFECT_API_AUTH_STRING": AUTH}
    del client_env["PREFECT_SERVER_API_AUTH_STRING"]  # a client knows only its own credentials
    try:
        yield client_env, f"http://127.0.0.1:{port}/api"
    finally:
        stopped = crawl2chat("server", "stop", env=env)
        assert "stopped the Prefect server" in stopped.stdout, stopped.stdout + stopped.stderr


def crawl2chat(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def api(url: str, path: str, body: dict | None = None, auth: str | None = AUTH):
    """One REST call; returns (status, parsed JSON). POST when there is a body (Prefect's filter routes)."""
    req = urllib.request.Request(url + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_server_start_refuses_a_taken_port_and_a_second_server(tmp_path, monkeypatch):
    from flows import server
    from stages.common import StageError

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(StageError, match=r"port \d+ on 127.0.0.1 is taken .* --port N"):
            server.start(port=taken.getsockname()[1])
    # a state file whose process is alive (this one): a second start is refused before touching the port
    server.ServerState(pid=os.getpid(), url="http://127.0.0.1:1", api_url="http://127.0.0.1:1/api", log="",
                       database="sqlite").write()
    with pytest.raises(StageError, match="already running at http://127.0.0.1:1 .* `crawl2chat server stop`"):
        server.start(port=free_port())


def test_server_start_on_an_unreachable_database_names_the_fix(tmp_path, monkeypatch):
    from flows import server
    from stages.common import StageError

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    url = f"postgresql+asyncpg://prefect:secret@127.0.0.1:{free_port()}/prefect"  # nothing listens there
    with pytest.raises(StageError, match=r"exited with code .* check that the database at "
                                         r"postgresql\+asyncpg://prefect:\*\*\*@127.0.0.1:\d+/prefect is running"):
        server.start(port=free_port(), database_url=url, timeout=60)
    assert not server.ServerState.path().exists()


def test_temporary_server_defers_to_a_prefect_profile(tmp_path, monkeypatch):
    """A user whose Prefect profile names a server (`prefect config set PREFECT_API_URL=...`) keeps using it."""
    from flows import server

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "")
    for name in ("PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "profiles.toml").write_text('active = "work"\n[profiles.work]\n'
                                            'PREFECT_API_URL = "http://10.0.0.1:4200/api"\n')
    with server.temporary():
        assert not os.environ["PREFECT_API_URL"]  # left to the profile: Prefect reads it there
    assert not (tmp_path / server.TEMPORARY_LOG_NAME).exists()  # nothing was started
    monkeypatch.setenv("PREFECT_PROFILE", "default")  # a profile without a URL: no server named
    assert server._profile_api_url() is None


def test_a_dead_server_is_forgotten_with_a_warning(tmp_path, monkeypatch):
    from flows import server

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "")  # unset for the code under test; monkeypatch restores it after
    dead = subprocess.Popen(["true"])  # a pid that has certainly exited
    dead.wait()
    server.ServerState(pid=dead.pid, url="http://127.0.0.1:1", api_url="http://127.0.0.1:1/api", log="",
                       database="sqlite").write()
    assert "no longer running" in server.use_server_from_state()
    assert not os.environ["PREFECT_API_URL"] and not server.ServerState.path().exists()
    # a live one: the CLI's Prefect client is pointed at it
    server.ServerState(pid=os.getpid(), url="http://127.0.0.1:1", api_url="http://127.0.0.1:1/api", log="",
                       database="sqlite").write()
    assert server.use_server_from_state() is None and os.environ["PREFECT_API_URL"] == "http://127.0.0.1:1/api"


def test_server_is_on_postgres_and_refuses_clients_without_credentials(server, postgres):
    env, url = server
    assert api(url, "/health", auth=None)[0] == 200  # open on purpose: load balancers probe it
    assert api(url, "/flows/filter", {}, auth=None)[0] == 401
    assert api(url, "/flows/filter", {}, auth="crawl2chat:wrong")[0] == 401
    assert api(url, "/flows/filter", {})[0] == 200
    # Prefect's own client, through our CLI: refused without the credentials, with an error that names the fix
    no_creds = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    refused = crawl2chat("schedule", "list", env=no_creds)
    assert refused.returncode == 1
    assert "PREFECT_API_AUTH_STRING" in refused.stdout, refused.stdout + refused.stderr
    status = crawl2chat("server", "status", env=env)
    assert "healthy" in status.stdout and "postgresql+asyncpg://prefect:***@" in status.stdout, status.stdout
    # the server's tables are in PostgreSQL, not in a SQLite file under PREFECT_HOME
    assert not (Path(env["PREFECT_HOME"]) / "prefect.db").exists()
    tables = subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(postgres[1]), "-U", "prefect",
                             "-d", "prefect", "-Atc", "select count(*) from flow_run"], capture_output=True,
                            text=True, env={**os.environ, "PGPASSWORD": PG_PASSWORD})
    assert tables.returncode == 0, tables.stderr


@pytest.fixture(scope="module")
def deployed(server):
    env, url = server
    result = crawl2chat("deploy", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return env, url


def _deployment(url: str, name: str) -> dict:
    status, dep = api(url, f"/deployments/name/{name}")
    assert status == 200, (name, dep)
    return dep


def test_deploy_and_schedule_checked_through_the_api(deployed):
    env, url = deployed
    pools = {p["name"]: p["type"] for p in api(url, "/work_pools/filter", {})[1]}
    assert pools == {"cpu": "process", "gpu": "process"}
    e2e, train = _deployment(url, "crawl2chat/end-to-end"), _deployment(url, "crawl2chat-train/train")
    assert (e2e["work_pool_name"], e2e["entrypoint"]) == ("cpu", "flows/pipeline.py:end_to_end")
    assert (train["work_pool_name"], train["entrypoint"]) == ("gpu", "flows/deploy.py:train")
    assert e2e["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert {"preset", "until", "overrides", "root"} <= set(e2e["parameter_openapi_schema"]["properties"])

    # schedule by the bare deployment name (the data-refresh deployment will be scheduled the same way)
    made = crawl2chat("schedule", "end-to-end", "--cron", CRON, env=env)
    assert made.returncode == 0 and "scheduled end-to-end" in made.stdout, made.stdout + made.stderr
    schedules = api(url, f"/deployments/{e2e['id']}/schedules")[1]
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in schedules] == \
        [(CRON, "UTC", True)]
    # the server's scheduler turns it into runs: the first one next Monday 03:00 UTC
    now = datetime.now(timezone.utc)
    monday = (now + timedelta(days=(7 - now.weekday()) % 7)).replace(hour=3, minute=0, second=0, microsecond=0)
    if monday <= now:
        monday += timedelta(days=7)
    runs = _scheduled_runs(url, e2e["id"])
    assert runs and datetime.fromisoformat(runs[0]["expected_start_time"]) == monday, runs[:1]
    again = crawl2chat("schedule", "end-to-end", "--cron", CRON, env=env)
    assert "already scheduled" in again.stdout and len(api(url, f"/deployments/{e2e['id']}/schedules")[1]) == 1

    listed = crawl2chat("schedule", "list", env=env)
    assert "crawl2chat/end-to-end" in listed.stdout and CRON in listed.stdout, listed.stdout
    assert crawl2chat("schedule", "pause", "end-to-end", env=env).returncode == 0
    assert [s["active"] for s in api(url, f"/deployments/{e2e['id']}/schedules")[1]] == [False]
    crawl2chat("deploy", env=env)  # a re-deploy keeps the (paused) schedule
    e2e = _deployment(url, "crawl2chat/end-to-end")
    assert [(s["schedule"]["cron"], s["active"]) for s in api(url, f"/deployments/{e2e['id']}/schedules")[1]] \
        == [(CRON, False)]
    assert crawl2chat("schedule", "resume", "crawl2chat/end-to-end", env=env).returncode == 0
    assert [s["active"] for s in api(url, f"/deployments/{e2e['id']}/schedules")[1]] == [True]
    assert crawl2chat("schedule", "delete", "end-to-end", env=env).returncode == 0
    assert api(url, f"/deployments/{e2e['id']}/schedules")[1] == []

    refresh = _deployment(url, "data-refresh/data-refresh")
    assert (refresh["work_pool_name"], refresh["entrypoint"]) == ("cpu", "flows/data_refresh.py:data_refresh")
    made = crawl2chat("schedule", "data-refresh", "--cron", CRON, env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    assert [s["schedule"]["cron"] for s in api(url, f"/deployments/{refresh['id']}/schedules")[1]] == [CRON]

    bad = crawl2chat("schedule", "no-such-flow", "--cron", CRON, env=env)
    assert bad.returncode == 1 and "no deployment 'no-such-flow'" in bad.stdout and "end-to-end" in bad.stdout


def _scheduled_runs(url: str, deployment_id: str, wait_s: float = 60) -> list[dict]:
    """The deployment's scheduled runs, soonest first, once the scheduler (every 2 s here) has made them."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}},
                                              "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                                              "sort": "EXPECTED_START_TIME_ASC"})[1]
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(1)


def test_run_through_the_deployment_on_a_worker(deployed, tmp_path):
    """`run --deployment` creates the run and waits; a process worker on the cpu pool executes it."""
    env, url = deployed
    root = tmp_path / "artifacts"
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--deployment", "--until", "download",
                            "--root", str(root)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        first = cli.stdout.readline()  # "flow run created: <UI link>", then it waits
        assert "/runs/flow-run/" in first, first + cli.stdout.read()
        run_id = first.split("/runs/flow-run/")[1].split()[0]
        # --run-once: the worker takes the runs that are due, waits for them, and exits
        worker = crawl2chat("worker", "cpu", "--run-once", env=env)
        rest = cli.communicate(timeout=60)[0]
    finally:
        cli.kill()
    assert cli.returncode == 0 and "done" in rest, rest + worker.stdout[-3000:] + worker.stderr[-3000:]
    status, run = api(url, f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED"
    assert run["name"].startswith("tiny-") and run["parameters"]["until"] == "download"
    assert f"done flow run {run['name']}" in rest  # the name the run took on starting, as the UI shows it
    assert "no worker polls the gpu pool yet" in rest  # none in this test: said before the wait
    assert ArtifactStore(str(root)).read_alias("download", "latest")  # the worker committed it where we said
    artifacts = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})[1]
    assert sorted(a["key"] for a in artifacts) == ["download", "download-progress"]  # stats, and progress


def test_training_stage_runs_as_its_own_deployment_on_the_gpu_pool(deployed, tmp_path):
    """The end-to-end run (cpu worker) hands pretrain to the `train` deployment (gpu worker) and waits for it;
    its own pretrain task then finds the artifact that run committed and reuses it."""
    env, url = deployed
    root = tmp_path / "artifacts"
    gpu = subprocess.Popen([sys.executable, "-m", "flows.cli", "worker", "gpu"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        made = crawl2chat("run", "--deployment", "--no-wait", "--until", "pretrain", "--root", str(root),
                          "--set", "pretrain.steps=2", "--set", "pretrain.warmup_steps=1",
                          "--set", "pretrain.eval_sequences=16", env=env)
        assert made.returncode == 0 and "/runs/flow-run/" in made.stdout, made.stdout + made.stderr
        run_id = made.stdout.split("/runs/flow-run/")[1].split()[0]
        worker = crawl2chat("worker", "cpu", "--run-once", env=env)
    finally:
        gpu.terminate()
        gpu_log = gpu.communicate(timeout=60)[0]
    status, run = api(url, f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED", worker.stdout[-3000:] + worker.stderr[-3000:] + gpu_log[-3000:]
    train = _deployment(url, "crawl2chat-train/train")
    runs = api(url, "/flow_runs/filter", {"deployments": {"id": {"any_": [train["id"]]}}})[1]
    assert [(r["parameters"]["stage"], r["state"]["type"]) for r in runs] == [("pretrain", "COMPLETED")], gpu_log
    assert runs[0]["parent_task_run_id"]  # a subflow of the end-to-end run: cancel or retry it on its own
    store = ArtifactStore(str(root))
    built_by_train = store.read_alias("pretrain", "latest")
    assert built_by_train and store.manifest("pretrain", built_by_train)["stats"]["steps"] == 2
    published = api(url, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]},
                                                             "key": {"any_": ["pretrain"]}}})[1]
    assert published and "Reused the committed artifact" in published[0]["data"]  # not trained twice


def test_prefect_yaml_registers_the_same_deployments(deployed):
    """infra/prefect.yaml through Prefect's own `prefect deploy` gives what `crawl2chat deploy` gives."""
    from flows.deploy import DEPLOYMENTS

    env, url = deployed
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                             "infra/prefect.yaml"], cwd=REPO, env={**env, "PREFECT_API_URL": url, "PWD": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for spec in DEPLOYMENTS:
        flow_name = {"end-to-end": "crawl2chat", "train": "crawl2chat-train",
                     "data-refresh": "data-refresh"}[spec.name]
        dep = _deployment(url, f"{flow_name}/{spec.name}")
        assert (dep["entrypoint"], dep["work_pool_name"], dep["parameters"]) == \
            (spec.entrypoint, spec.pool, spec.parameters), spec.name
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                      {"directory": str(REPO)}}]


def test_compose_runs_the_configuration_tested_here():
    """infra/compose.yaml cannot run here (no container engine): check it sets what the tests above use."""
    import yaml

    from flows.deploy import POOLS

    services = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())["services"]
    server = services["server"]["environment"]
    assert server["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://prefect:")
    assert server["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH:?")  # required, no default
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    pools = {s["command"][s["command"].index("--pool") + 1] for s in workers.values()}
    assert pools == set(POOLS)
    for s in [*workers.values(), services["deploy"]]:
        assert s["environment"]["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"]
        assert s["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    assert all(s["command"][:2] == ["worker", "start"] and "process" in s["command"] for s in workers.values())
    assert services["deploy"]["command"] == ["deploy", "--workdir", "/app"]  # the image's WORKDIR
