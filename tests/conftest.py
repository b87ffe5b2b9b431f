"""Suite-wide settings: no MLflow telemetry, no Ray usage stats, and no implicit ``ray.init()`` from
library background threads (a Serve handle's metrics thread left from one test would otherwise reconnect
to Ray while the next test starts its own cluster).

At the end of the session the suite shuts down any Ray connection a test left open and then leaves the
process with pytest's own exit status, skipping interpreter finalization: once, after every test had
passed and the summary was printed, a Ray core-worker gRPC thread segfaulted while Python tore down
(exit 139, ``RestartActorForLineageReconstruction`` in the faulting frame). Nothing is skipped or hidden:
the status is the one pytest computed from the results."""

import os
import sys

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

_exit_status: list[int] = []

# Fixtures that start a local Ray cluster: every test using one is marked ``slow`` (``make test-fast`` runs
# ``-m "not slow and not gpu"``). ``_no_ray_outside_slow`` below fails a test that starts Ray without it.
RAY_FIXTURES = {"local_ray", "ray_local", "served", "actors", "ray_down"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for one test module (4 logical CPUs: a learner of up to 3 ranks, or a learner and
    rollout workers, fit in it)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_ray_outside_slow(request):
    """A test not marked ``slow`` must not start Ray (the fast lane runs without a cluster); a cluster that a
    module fixture of slow tests started before it is not its doing."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if (request.node.get_closest_marker("slow") is None and not before and ray is not None
            and ray.is_initialized()):
        pytest.fail(f"{request.node.nodeid} starts Ray but is not marked slow", pytrace=False)


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))
    ray = sys.modules.get("ray")  # only a session that used Ray (it is absent on the GPU box)
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def pytest_unconfigure(config) -> None:
    if _exit_status and not hasattr(config, "workerinput"):  # the main pytest process, after its report
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[0])
