"""The one Prefect wrapper around a stage: plan version -> reuse if committed -> run -> commit -> publish.

The work is stages.common.build (no Prefect there, so stages run the same from pytest or `python -m`); this
file only makes it a Prefect task and publishes the result to the UI. Prefect's own result caching is off:
the artifact store is the cache, keyed by the recipe's version, and it survives across servers and machines.
Retries are off too: a stage retries its own transient I/O; anything else failing is a real error.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import types

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "crawl2chat")  # stage logs appear in the flow run
# The embedded server phones home by default; offline machines would log an error on every run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import get_run_logger, task  # noqa: E402
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import task_run  # noqa: E402

from stages.artifacts import Artifact, ArtifactError, ArtifactStore  # noqa: E402
from flows.progress import StageProgress  # noqa: E402
from stages.common import StageError, build, reporting  # noqa: E402

logging.getLogger("crawl2chat").setLevel(logging.INFO)  # stages report progress (steps, files) at INFO


class NoTracebackForUserErrors(logging.Filter):
    """A StageError or ArtifactError is bad input whose message names the fix: Prefect logs it once per task and
    once per flow with the whole traceback (150 lines for a wrong crawl name), burying that message. Keep the
    message, drop the traceback; any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (StageError, ArtifactError)):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):  # the loggers of Prefect's task and flow engines
    logging.getLogger(_name).addFilter(NoTracebackForUserErrors())

# Stats shown as a table in the UI; long series (loss curves, samples) stay in manifest.json.
_LONG = (list, dict)


def stats_markdown(stage: str, art: Artifact, reused: bool, stats: dict) -> str:
    lines = [f"# {stage} `{art.version}`", "",
             f"{'Reused the committed artifact' if reused else 'Built'} at `{art.path}`", "",
             "| stat | value |", "| --- | --- |"]
    for key, value in stats.items():
        if key == "report_card":
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, _LONG):
            text = json.dumps(value, default=str)
            value = text if len(text) <= 200 else f"{text[:200]}… (see manifest.json)"
        lines.append(f"| {key} | {str(value).replace('|', '/')} |")
    if "report_card" in stats:  # evaluate: the card across the lineage, as its own table
        lines += ["", "## Report card", "", stats["report_card"]]
    return "\n".join(lines)


def _task_run_name() -> str:
    params = task_run.parameters
    return params.get("label") or params["stage"].NAME


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name=_task_run_name)
def run_stage(stage: types.ModuleType, cfg, inputs: list[Artifact], root: str, label: str | None = None) -> Artifact:
    """label names this use of a stage that the DAG runs with several configs (import_data: its slot in
    PipelineConfig, e.g. conversations): the task run, the Prefect artifact key and the store alias take it, so
    the three imports each keep an alias (import_data/conversations) instead of overwriting one `latest`.
    Without a label they take the stage's name and the alias is `latest`."""
    store = ArtifactStore(root)
    name = label or stage.NAME
    key = name.replace("_", "-")  # Prefect artifact keys allow lowercase letters, digits and dashes
    reporter = StageProgress(name, f"{key}-progress")
    try:
        with reporting(reporter):
            result = build(stage, cfg, inputs, store)
    finally:
        reporter.close()
    store.set_alias(stage.NAME, label or "latest", result.artifact.version)
    get_run_logger().info("%s %s", "reused" if result.reused else "built", result.artifact.ref)
    create_markdown_artifact(key=key, markdown=stats_markdown(name, result.artifact, result.reused, result.stats),
                             description=f"{name} {result.artifact.ref}")
    if result.stats.get("funnel"):  # extract: documents and bytes in and out of every filter, with the reasons
        create_table_artifact(key=f"{key}-funnel", table=[
            {**{k: v for k, v in row.items() if not isinstance(v, _LONG)},
             "reasons": ", ".join(f"{r}={n}" for r, n in sorted(row.get("reasons", {}).items()) if n)}
            for row in result.stats["funnel"]], description=f"{name} {result.artifact.ref}: the data funnel")
    if result.stats.get("curve"):  # training stages: the loss curve (about 100 evenly spaced steps)
        create_table_artifact(key=f"{key}-loss-curve", table=result.stats["curve"],
                              description=f"{name} {result.artifact.version}: loss per optimizer step")
    curve_png = result.artifact.path / "loss_curve.png"
    if curve_png.exists():  # written by stages/lm/trainer.fit; inlined, so the UI needs no file server
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(curve_png.read_bytes()).decode(),
                              key=f"{key}-loss-image", description=f"{name} {result.artifact.ref}: training loss")
    return result.artifact
