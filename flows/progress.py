"""A stage's progress, shown while it works: a progress artifact in the Prefect UI and a rich bar on the terminal.

Stages call stages.common.progress(done, total, unit); flows/tasks.py installs a StageProgress for each build.
"""

from __future__ import annotations

import contextvars
import sys
import threading
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MIN_INTERVAL_S = 2.0  # at most one UI update per stage every 2 s (and one per percent): the API is not a log


class StageProgress:
    """Reporter for stages.common.reporting(): thread-safe, since download reports from a thread pool."""

    def __init__(self, label: str, key: str):
        self.label, self.key = label, key
        self._lock = threading.Lock()
        # Prefect finds its run (and its API) through context variables, which the stage's worker threads do
        # not inherit: every update runs in a copy of the context of the thread that built this reporter.
        self._context = contextvars.copy_context()
        self._artifact = None
        self._last_pct, self._last_t = -1.0, 0.0
        self._bar = self._task = None
        if sys.stderr.isatty():
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), transient=False)

    def __call__(self, done: float, total: float, unit: str) -> None:
        with self._lock:
            if self._bar is not None:
                if self._task is None:
                    self._bar.start()
                    self._task = self._bar.add_task(f"{self.label} ({unit})", total=total)
                self._bar.update(self._task, completed=done, total=total)
            pct = 100.0 * done / total if total else 100.0
            now = time.monotonic()
            if pct < 100.0 and (pct - self._last_pct < 1.0 or now - self._last_t < MIN_INTERVAL_S):
                return
            self._last_pct, self._last_t = pct, now
            self._context.copy().run(self._publish, pct, f"{self.label}: {done:g}/{total:g} {unit}")

    def _publish(self, pct: float, description: str) -> None:
        if self._artifact is None:
            self._artifact = create_progress_artifact(pct, key=self.key, description=description)
        else:
            update_progress_artifact(self._artifact, pct, description=description)

    def close(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.stop()
