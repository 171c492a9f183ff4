"""How stages/extract.py runs its datatrove pipelines: one executor per pipeline (local processes, Slurm job arrays or
Ray), waiting for Slurm, and datatrove's per-task stats summed for the funnel."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from copy import deepcopy
from pathlib import Path

import loguru._better_exceptions
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from stages.common import StageError, progress

log = logging.getLogger("crawl2chat")

PROGRESS_EVERY_S = 2.0  # how often finished tasks are counted (a glob per pipeline)
SLURM_POLL_S = 30.0  # Slurm's own scheduling granularity is tens of seconds; polling faster gains nothing
SQUEUE_TRIES = 10  # squeue failing this many polls in a row (5 min at 30 s: slurmctld down, not restarting) is fatal
SQUEUE_TIMEOUT_S = 120  # one squeue call; it waits for an unreachable slurmctld MessageTimeout at a time, retrying

# datatrove adds three loguru handlers per task (stderr and the task's log file, then stderr again when the task
# ends), and loguru builds an ExceptionFormatter for each, which asks sysconfig for the standard library's
# directories under every install scheme: 52 lookups, ~3 ms a handler, ~0.3 of the 5.5 CPU-s that
# bench/extract_speed.py's pages take with resiliparse (33 tasks). The answer cannot change within a process, so it is
# computed once. loguru only reads the list. Guarded: a loguru without this private method just stays slower.
_FORMATTER = getattr(loguru._better_exceptions, "ExceptionFormatter", None)
if _FORMATTER is not None and callable(getattr(_FORMATTER, "_get_lib_dirs", None)):
    _FORMATTER._get_lib_dirs = staticmethod(functools.cache(_FORMATTER._get_lib_dirs))


class LocalExecutor(LocalPipelineExecutor):
    """datatrove's LocalPipelineExecutor, except that one worker runs its tasks without a multiprocess Manager.

    datatrove starts a Manager, a server process forked from this one, on every run, only to hand local ranks to a
    pool's workers. One worker has no pool, yet paid for a fork of a process that holds spaCy, torch and the URL
    lists: page tables copied, copy-on-write faults while the server lives, its exit. Measured on
    bench/extract_speed.py's pages with one worker (seven pipelines): 4.1-4.5 CPU-s with datatrove's executor,
    3.6-3.9 with this one, mostly system time (0.75 -> 0.15 s). Every run's one-task pipelines (exact_find,
    minhash_cluster) run with one worker. Otherwise the same steps as datatrove's run(): skip finished tasks,
    executor.json, a fresh copy of the pipeline per task, stats.json."""

    def run(self):
        if self.workers != 1 or self.depends:
            return super().run()
        self._launched = True
        ranks = self.get_incomplete_ranks(range(self.local_rank_offset, self.local_rank_offset + self.local_tasks))
        if not ranks:
            logger.info(f"Not doing anything as all {self.local_tasks} tasks have already been completed.")
            return
        if (skipped := self.local_tasks - len(ranks)) > 0:
            logger.info(f"Skipping {skipped} already completed tasks")
        self.save_executor_as_json()
        free = queue.SimpleQueue()  # _launch_run_for_rank takes a local rank from it and puts it back
        free.put(0)
        pipeline, stats = self.pipeline, []
        for rank in ranks:
            self.pipeline = deepcopy(pipeline)
            stats.append(self._launch_run_for_rank(rank, free))
        stats = sum(stats, start=PipelineStats())
        with self.logging_dir.open("stats.json", "wt") as statsfile:
            stats.save_to_disk(statsfile)
        logger.success(stats.get_repr(f"All {self.local_tasks} tasks"))
        return stats


class SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's SlurmPipelineExecutor without its merge_stats job: the stage sums logs/<pipeline>/stats/*.json itself
    (stage_totals), and after a failed task that job would stay queued forever, waiting on its afterok dependency."""

    def launch_merge_stats(self):
        pass


def make_executor(cfg, stage: str, steps: list, tasks: int, logs: Path, depends):
    """One datatrove executor per stage; `depends` makes it wait for (and, if not yet launched, launch) the previous."""
    if cfg.executor == "local":
        return LocalExecutor(steps, tasks=tasks, workers=min(cfg.workers, tasks), logging_dir=str(logs),
                             depends=depends)
    if cfg.executor == "ray":
        try:
            from datatrove.executor import RayPipelineExecutor
            import ray  # noqa: F401  (datatrove imports it lazily: it would fail only once the stage runs)
        except ImportError:
            raise StageError("executor='ray' needs Ray: `pip install ray`, then `ray start --head` (or point "
                             "RAY_ADDRESS at a cluster whose nodes share out.path); or use executor=local") from None
        # datatrove asks Ray for 2 GB per task by default; a node that cannot offer it would queue tasks forever
        return RayPipelineExecutor(steps, tasks=tasks, workers=-1, logging_dir=str(logs), depends=depends,
                                   cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb)
    activate = Path(sys.prefix) / "bin" / "activate"  # the compute nodes run this same venv (on shared storage)
    # sbatch passes this process's environment on (datatrove adds --export=ALL), SLURM_CONF included, so the tasks'
    # srun and scontrol find the same cluster
    return SlurmExecutor(steps, tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
                         cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb,
                         job_name=f"extract-{stage}", logging_dir=str(logs), depends=depends,
                         venv_path=str(activate) if activate.is_file() else None, mail_type="NONE")


def wait_for_slurm(executors: list, logs: Path) -> None:
    """sbatch returns at once; the stage contract wants finished work, so poll until the last pipeline's completion
    markers are all there. Stop with an error once a job array of the chain has left the queue unfinished or can
    never start (afterok on an array with a failed or cancelled task), cancelling the arrays queued behind it, which
    could never start either; and when squeue fails SQUEUE_TRIES polls in a row. A failed squeue is retried, never
    read as an empty queue."""
    jobs = {str(e.job_id): e for e in executors if e.job_id not in (None, -1)}  # -1: all done, nothing submitted
    failures = 0
    # Arrays that had left the queue with tasks unfinished at the previous poll. One sighting is not enough: on
    # shared storage (NFS caches attributes and lookups) the completion markers a node just wrote can show here a
    # little later than Slurm reports the job gone.
    gone_unfinished: set[str] = set()
    while executors[-1].get_incomplete_ranks():
        time.sleep(SLURM_POLL_S)
        # Every job of this user, filtered here: `squeue -j` fails for a job slurmctld has forgotten (MinJobAge,
        # 300 s by default, after it ended), which would look like slurmctld being down. One line per pending
        # array or running task: the array's job id (%F) and why it waits (Dependency, DependencyNeverSatisfied, ...).
        try:
            squeue = subprocess.run(["squeue", "--me", "-h", "-o", "%F %r"], capture_output=True, text=True,
                                    timeout=SQUEUE_TIMEOUT_S)
            error = (squeue.stderr.strip() or f"exit status {squeue.returncode}") if squeue.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as e:
            error = str(e)
        if error:
            failures += 1
            if failures >= SQUEUE_TRIES:
                raise StageError(f"squeue failed {failures} times in a row ({error}), so the stage cannot tell "
                                 f"whether Slurm jobs {', '.join(jobs)} still run: check slurmctld (`scontrol ping`), "
                                 f"then re-run the stage (finished tasks are skipped)")
            log.warning("squeue failed (%s); asking again in %.0f s", error, SLURM_POLL_S)
            continue
        failures = 0
        queued: dict[str, set[str]] = {}
        for line in squeue.stdout.splitlines():
            job, _, reason = line.strip().partition(" ")
            queued.setdefault(job, set()).add(reason)
        gone = {job for job, e in jobs.items() if job not in queued and e.get_incomplete_ranks()}
        stuck = [job for job in jobs if "DependencyNeverSatisfied" in queued.get(job, ())
                 or job in gone & gone_unfinished]
        gone_unfinished = gone
        if stuck:
            behind = [job for job in list(jobs)[list(jobs).index(stuck[0]):] if job in queued]
            if behind:
                subprocess.run(["scancel", *behind], capture_output=True, timeout=SQUEUE_TIMEOUT_S)
            names = ", ".join(f"{jobs[job].job_name} ({job})" for job in stuck)
            # arrays before the stuck one may still run tasks; a re-run now would submit those tasks a second time
            running = [job for job in jobs if job in queued and job not in behind]
            wait = (f"wait until jobs {', '.join(running)} have left the queue (`squeue --me`), then " if running
                    else "")
            raise StageError(f"Slurm job array {names} cannot finish: a task failed or was cancelled (read "
                             f"{logs}/<pipeline>/slurm_logs and logs/); cancelled the arrays queued behind it "
                             f"({', '.join(behind) or 'none'}); {wait}re-run the stage (finished tasks are skipped)")


def stage_totals(stats_dir: Path) -> list[Counter]:
    """datatrove's per-task stats (stats/*.json: one {"name", "stats": {key: n | {"total": n, ...}}} per step) summed
    over tasks into one Counter per step."""
    totals: list[Counter] = []
    for path in sorted(stats_dir.glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text())):
            if i == len(totals):
                totals.append(Counter())
            for key, value in step["stats"].items():
                totals[i][key] += int(value["total"] if isinstance(value, dict) else value)
    return totals


def finished_tasks(logs: Path, tasks: dict[str, int]) -> int:
    """Completion markers (logs/<pipeline>/completions/<rank>) over every pipeline: written by each task as it
    ends, wherever it ran (here, on Slurm nodes, on Ray workers), so one count serves every executor."""
    return sum(min(n, sum(1 for _ in (logs / name / "completions").glob("*"))) for name, n in tasks.items())


@contextlib.contextmanager
def reporting_finished_tasks(logs: Path, tasks: dict[str, int]):
    """While the block runs, report progress as finished datatrove tasks of all pipelines ({pipeline: tasks}).

    From a thread: the executors' run() blocks until a pipeline is done, and a pipeline's tasks report nothing
    on their own until they end. A task is the unit (one WARC file's filtering, one MinHash bucket), so a huge
    WARC shows as one step; datatrove's own per-task logs are in logs/<pipeline>/logs."""
    total = sum(tasks.values())
    stop = threading.Event()

    def watch():
        while not stop.wait(PROGRESS_EVERY_S):
            progress(finished_tasks(logs, tasks), total, "datatrove tasks")

    watcher = threading.Thread(target=watch, name="extract-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        progress(finished_tasks(logs, tasks), total, "datatrove tasks")
