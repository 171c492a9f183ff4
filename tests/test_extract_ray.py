"""stages.extract with executor="ray" (datatrove's RayPipelineExecutor) on a local Ray instance gives the same
documents, exclusions and funnel as the local executor, on three small WARCs where both dedups fire.

Skipped when Ray is not installed (`pip install ray`): Ray is an optional extra, only the cluster path needs it."""

from __future__ import annotations

import json

import pytest
from extract_fixture import (TASKS, assert_same_output, download_artifact, local_run,  # noqa: F401  (fixtures)
                             run_extract)

try:
    import ray
except ImportError:  # not installed, or installed but broken
    pytest.skip("Ray is not importable: `pip install ray` to test extract's executor='ray'", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:The 'registered_domain' property is deprecated")  # datatrove vs tldextract 5


@pytest.fixture(scope="module")
def local_ray():
    """A private Ray instance with 2 CPUs, shut down after the module. `memory` is Ray's logical reservation, not a
    limit: datatrove asks 2 GB per task by default, which a small CI box might not have to offer, leaving the tasks
    unscheduled; these tasks use a few hundred MB."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to the Ray project (no network here)
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, _memory=8 << 30, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


def test_ray_executor_matches_local(download_artifact, local_run, local_ray, tmp_path):
    on_ray, ray_out = run_extract(tmp_path, download_artifact, "ray", executor="ray")
    assert_same_output(on_ray, ray_out, local_run)
    for stage in TASKS:
        executor = json.loads((ray_out / "logs" / stage / "executor.json").read_text())
        assert "ray_remote_kwargs" in executor, stage  # every stage ran as Ray tasks (RayPipelineExecutor)
