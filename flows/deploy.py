"""Deployments, schedules and server-side runs: `crawl2chat deploy | schedule | run --deployment`.

Two work pools match the hardware: `cpu` for the data stages and the end-to-end flow, `gpu` for the training
stages. Both are Prefect `process` pools: a worker (`prefect worker start --pool cpu`, see infra/compose.yaml)
runs each flow run as a subprocess in its working directory, the repository.

    DEPLOYMENTS  one line per deployment (name, entrypoint, pool); adding one is adding a line
    deploy()     creates the pools if missing and registers every deployment, keeping schedules set before
    train        the flow behind the `train` deployment: one training stage on its own, cancellable and
                 retryable by itself (see run_training for how the end-to-end flow would hand it off)

The entrypoints are read as source (flow name and parameter schema), not imported, so deploying needs no torch.
Everything here talks to the server in PREFECT_API_URL (the CLI sets it from `crawl2chat server start`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow

from stages.common import StageError

REPO = Path(__file__).resolve().parent.parent
POOLS = {"cpu": "data stages and the end-to-end flow", "gpu": "training stages (pretrain, sft, reward_model, rl)"}
TRAINING = ("pretrain", "sft", "reward_model", "rl")


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # path relative to the repository : flow function
    pool: str        # a key of POOLS
    description: str
    parameters: dict = field(default_factory=dict)  # defaults a run starts with; a run may override any


DEPLOYMENTS = [
    DeploymentSpec("end-to-end", "flows/pipeline.py:end_to_end", "cpu",
                   "The whole DAG, Common Crawl -> assistant; unchanged stages are reused; the training stages "
                   "run as runs of the train deployment on the gpu pool.",
                   {"preset": "tiny", "train_on": "crawl2chat-train/train"}),
    DeploymentSpec("train", "flows/deploy.py:train", "gpu",
                   "One training stage (pretrain, sft, reward_model or rl) on its own, upstream stages reused.",
                   {"preset": "tiny", "stage": "pretrain"}),
    DeploymentSpec("data-refresh", "flows/data_refresh.py:data_refresh", "cpu",
                   "A new dataset version from the WARC files of the newest crawl that no version holds yet.",
                   {"preset": "small", "crawl": "latest"}),
]
END_TO_END = "crawl2chat/end-to-end"  # flow name / deployment name, as `run --deployment` triggers it
TRAIN = "crawl2chat-train/train"


@flow(name="crawl2chat-train", flow_run_name="{stage}-{preset}", validate_parameters=False)
def train(stage: str = "pretrain", preset: str = "tiny", overrides: list[str] = (), source: str | None = None,
          root: str = "artifacts") -> list[str]:
    """Build one training stage: the DAG up to `stage`, where every upstream stage is already committed and
    therefore reused (a plan and a manifest read each), so only `stage` itself runs on this worker."""
    if stage not in TRAINING:
        raise StageError(f"train runs one of {', '.join(TRAINING)}, not '{stage}': pick one of those")
    from prefect.runtime import flow_run

    from flows.pipeline import end_to_end  # torch and the stages: only on the worker that runs it
    from stages.artifacts import ArtifactStore

    built = end_to_end(preset=preset, overrides=list(overrides), source=source, until=stage, root=root)
    # for run_training on the cpu pool: which version this run made (see there why it must ask)
    ArtifactStore(root).set_alias(stage, run_alias(flow_run.get_id()), built[-1].split("/")[1])
    return built


def run_alias(run_id) -> str:
    return f"run-{run_id}"


def run_training(stage: str, cfg, preset: str, overrides: list[str], source: str | None, root: str,
                 deployment: str = TRAIN):
    """From inside the end-to-end flow: run `stage` as a run of the `train` deployment (gpu pool) and wait; returns
    `cfg` as that run resolved it.

    The end-to-end flow then calls run_stage for the same stage as always, which finds the artifact this run
    committed and reuses it. That needs the same version, and precision="auto" enters the version as the machine
    that builds resolves it (bf16 on the GPU worker, fp32 on this CPU one), so the precision comes from the
    artifact's manifest, found through the alias run-<id> the train run set. Needs an artifact root both pools
    reach (a shared volume, or an fsspec URL such as s3://...). The run is a subflow of the caller's run in the
    UI, and can be cancelled or retried alone.
    """
    from prefect import get_run_logger
    from prefect.deployments import run_deployment

    if not online_workers("gpu"):  # the run would wait, Late, with nothing on screen to say why
        get_run_logger().warning("no worker polls the gpu pool: the %s run waits until one does. Start "
                                 "`crawl2chat worker gpu` on a GPU host (or on this one, to train on its CPU)", stage)
    run = run_deployment(deployment, parameters=dict(stage=stage, preset=preset, overrides=list(overrides),
                                                     source=source, root=root))
    if not run.state or not run.state.is_completed():
        raise StageError(f"the {stage} run {run.name} on the gpu pool ended {run.state.name if run.state else '?'}"
                         f": see it in the Prefect UI, fix it, and run again (committed stages are reused)")
    from stages.artifacts import ArtifactStore

    store = ArtifactStore(root)
    version = store.read_alias(stage, run_alias(run.id))
    if version is None:
        raise StageError(f"the {stage} run {run.name} completed but left no alias {stage}/{run_alias(run.id)} in "
                         f"{store.location}: do both pools use the same artifact root?")
    return replace(cfg, precision=store.manifest(stage, version)["config"]["precision"])


# ---- talking to the server -----------------------------------------------------------------------------------
def require_server() -> str:
    """The server's API URL; a clear error when the CLI would otherwise use Prefect's throwaway embedded API."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url  # a Prefect profile may set it
    if not url:
        raise StageError("no Prefect server: start one with `crawl2chat server start` (or set PREFECT_API_URL "
                         "to a running server's /api address)")
    return url


def online_workers(pool: str) -> int:
    """How many workers of `pool` the server counts as online (a heartbeat within its interval)."""
    from prefect.client.schemas.objects import WorkerStatus

    with _client() as client:
        return sum(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool))


def _client():
    from prefect import get_client

    require_server()
    return get_client(sync_client=True)


def _ensure_pools(client) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    for name, description in POOLS.items():
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type, description=description,
                base_job_template=ProcessWorker.get_default_base_job_template()))


def deploy(workdir: str | None = None, only: list[str] | None = None) -> list[str]:
    """Create the work pools and register DEPLOYMENTS (or those named in `only`); returns "flow/name" each.

    workdir: where workers find the repository (default: this checkout; /app in the compose image). A
    re-deploy keeps the schedules the deployment had (Prefect's upsert would otherwise drop them).
    """
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_arguments_from_entrypoint
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    specs = DEPLOYMENTS if not only else [d for d in DEPLOYMENTS if d.name in only]
    unknown = set(only or ()) - {d.name for d in DEPLOYMENTS}
    if unknown:
        raise StageError(f"unknown deployment {', '.join(sorted(unknown))}: choose from "
                         f"{', '.join(d.name for d in DEPLOYMENTS)}")
    workdir = workdir or str(REPO)
    done = []
    with _client() as client:
        _ensure_pools(client)
        for spec in specs:
            path, func = spec.entrypoint.split(":")
            source = f"{REPO / path}:{func}"  # read here; workers resolve the relative entrypoint in workdir
            flow_name = load_flow_arguments_from_entrypoint(source, ["name"]).get("name") or func
            try:
                old = client.read_deployment_by_name(f"{flow_name}/{spec.name}")
                keep = [DeploymentScheduleCreate(schedule=s.schedule, active=s.active, parameters=s.parameters,
                                                 slug=s.slug) for s in old.schedules]
            except ObjectNotFound:
                keep = []
            client.create_deployment(
                flow_id=client.create_flow_from_name(flow_name), name=spec.name, entrypoint=spec.entrypoint,
                work_pool_name=spec.pool, description=spec.description, parameters=spec.parameters,
                parameter_openapi_schema=parameter_schema_from_entrypoint(source).model_dump(),
                pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}],
                schedules=keep, tags=["crawl2chat", spec.pool])
            done.append(f"{flow_name}/{spec.name}")
    return done


def resolve(client, name: str):
    """A deployment by `flow/name`, or by its bare name when only one flow has a deployment of that name."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    if "/" in name:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            found = []
    else:
        found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise StageError(f"several flows have a deployment '{name}': name one as flow/deployment")
    known = sorted(d.name for d in client.read_deployments())
    raise StageError(f"no deployment '{name}' on {require_server()}: deployments there: "
                     f"{', '.join(known) or 'none'}; run `crawl2chat deploy` first")


# ---- schedules -----------------------------------------------------------------------------------------------
def add_schedule(name: str, cron: str, timezone: str = "UTC") -> tuple[str, bool]:
    """A cron schedule on deployment `name`; returns (schedule id, created). An identical cron already there
    is switched on rather than duplicated."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValueError as e:
        raise StageError(f"bad schedule --cron '{cron}' --timezone '{timezone}': give five cron fields such as "
                         f"'0 3 * * 1' (03:00 on Mondays) and an IANA zone such as UTC ({e.errors()[0]['msg']})")
    with _client() as client:
        dep = resolve(client, name)
        for s in client.read_deployment_schedules(dep.id):
            if isinstance(s.schedule, CronSchedule) and (s.schedule.cron, s.schedule.timezone) == (cron, timezone):
                client.update_deployment_schedule(dep.id, s.id, active=True)
                return str(s.id), False
        created = client.create_deployment_schedules(dep.id, [(schedule, True)])
        return str(created[0].id), True


def list_schedules(name: str | None = None) -> list[dict]:
    """Rows of (deployment, schedule id, schedule, timezone, active, next run) for one or every deployment."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    rows = []
    with _client() as client:
        deployments = [resolve(client, name)] if name else client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
        for dep in deployments:
            upcoming = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1)
            next_run = f"{upcoming[0].expected_start_time:%Y-%m-%d %H:%M %Z}" if upcoming else ""
            for s in client.read_deployment_schedules(dep.id):
                sched = s.schedule
                rows.append(dict(deployment=f"{flows.get(dep.flow_id, '?')}/{dep.name}", id=str(s.id),
                                 schedule=getattr(sched, "cron", None) or str(sched),
                                 timezone=getattr(sched, "timezone", None) or "", active=s.active,
                                 next_run=next_run if s.active else ""))
    return rows


def set_schedules(name: str, action: str, schedule_id: str | None = None) -> int:
    """pause | resume | delete the schedules of deployment `name` (or only `schedule_id`); returns how many."""
    if action not in ("pause", "resume", "delete"):
        raise ValueError(f"unknown schedule action {action}: use pause, resume or delete")
    with _client() as client:
        dep = resolve(client, name)
        schedules = [s for s in client.read_deployment_schedules(dep.id)
                     if schedule_id is None or str(s.id).startswith(schedule_id)]
        if not schedules:
            raise StageError(f"deployment '{name}' has no schedule{' ' + schedule_id if schedule_id else ''}: "
                             f"see `crawl2chat schedule list`")
        for s in schedules:
            if action == "delete":
                client.delete_deployment_schedule(dep.id, s.id)
            else:
                client.update_deployment_schedule(dep.id, s.id, active=(action == "resume"))
        return len(schedules)


# ---- server-side runs ----------------------------------------------------------------------------------------
def trigger(name: str, parameters: dict) -> tuple[str, str, str]:
    """Create a run of deployment `name` for a worker to pick up; returns (flow run id, its name, UI link)."""
    from prefect.deployments import run_deployment

    with _client() as client:
        dep = resolve(client, name)
    # timeout=0: create the run and return; the caller decides whether to wait (see wait()).
    run = run_deployment(dep.id, parameters=parameters, timeout=0, as_subflow=False)
    ui = require_server().removesuffix("/api")
    return str(run.id), run.name, f"{ui}/runs/flow-run/{run.id}"


def wait(flow_run_id: str, poll: float = 2.0):
    """Block until the run reaches a final state (Completed, Failed, Crashed, Cancelled); returns the flow run,
    whose name is the one its flow gave it on starting (tiny-<hash>), not the placeholder it was created with."""
    import time
    from uuid import UUID

    with _client() as client:
        while True:
            run = client.read_flow_run(UUID(flow_run_id))
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(poll)
