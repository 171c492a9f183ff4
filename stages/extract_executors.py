"""How stages/extract.py runs its datatrove pipelines: one executor per pipeline (local processes, Slurm job arrays or
Ray), waiting for Slurm, and datatrove's per-task stats summed for the funnel."""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from copy import deepcopy
from pathlib import Path

import loguru._better_exceptions
from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.logging import logger
from datatrove.utils.stats import PipelineStats

from stages.common import StageError, progress

PROGRESS_EVERY_S = 2.0  # how often finished tasks are counted (a glob per pipeline)

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
    from datatrove.executor import SlurmPipelineExecutor

    activate = Path(sys.prefix) / "bin" / "activate"  # the compute nodes run this same venv (on shared storage)
    return SlurmPipelineExecutor(steps, tasks=tasks, time=cfg.slurm_time, partition=cfg.slurm_partition,
                                 cpus_per_task=cfg.slurm_cpus_per_task, mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb,
                                 job_name=f"extract-{stage}", logging_dir=str(logs), depends=depends,
                                 venv_path=str(activate) if activate.is_file() else None, mail_type="NONE")


def wait_for_slurm(last, logs: Path) -> None:
    """sbatch returns at once; the stage contract wants finished work, so poll the last stage's completion markers
    and stop with an error once its job array has left the queue unfinished, or waits on a stage that failed."""
    while last.get_incomplete_ranks():
        time.sleep(30)  # Slurm's own scheduling granularity is tens of seconds; polling faster gains nothing
        reasons = subprocess.run(["squeue", "-h", "-j", str(last.job_id), "-o", "%r"], capture_output=True,
                                 text=True).stdout  # one line per pending or running task; empty once it left
        if "DependencyNeverSatisfied" in reasons or (not reasons.strip() and last.get_incomplete_ranks()):
            raise StageError(f"Slurm job {last.job_id} cannot finish (a stage before it failed, or it left the queue "
                             f"unfinished): read {logs}/*/slurm_logs, `scancel {last.job_id}` if it is still queued, "
                             f"and re-run the stage (finished tasks are skipped)")


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
