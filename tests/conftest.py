
import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest

import methods  # noqa: F401  (fills the registries)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder with the default (local SQLite) MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DYNLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _no_outside_ray():
    """The tests start their own Ray: a ``RAY_ADDRESS`` in the developer's shell (or a head left
    running by the README's "a head on this machine" recipe) must not be joined by the fixtures,
    the pipelines run in-process or the subprocesses they start. Tests that need an address set
    it themselves (monkeypatch)."""
    import os

    saved = os.environ.pop("RAY_ADDRESS", None)
    yield
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved


ROOT = Path(__file__).resolve().parent.parent
_SHARED_RAY: list[bool] = []  # [True] while the Ray started by ray_local runs


@pytest.fixture
def ray_local():
    """A local Ray instance (2 CPUs, like CI) shared by the integration tests that ask for it: the
    tests that use it run last and one after another (``pytest_collection_modifyitems``), so Ray
    starts once for all of them, not once per module (about 8 s each on 2 cores). Any other test
    gets the machine to itself: a Ray left running is shut down before it starts
    (``pytest_runtest_setup``). ``address="local"``: a new instance even when another Ray runs on
    this machine; no dashboard (no test of this fixture submits a job)."""
    import ray

    if not ray.is_initialized():
        # PYTHONPATH: Ray's workers import the tests' step functions by module name (tests.test_dag),
        # whatever folder the test that happened to start Ray had changed into
        env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
        _SHARED_RAY.append(True)
    return ray


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """CI has 2 cores: one torch thread per test process avoids oversubscription with Ray workers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The fault tests print one "[faults] ..." line of counts each; pytest hides a passing test's
# output, so the lines are gathered here and shown at the end of every run (CI's log included).
_FAULT_LINES: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _FAULT_LINES.extend(line for line in report.capstdout.splitlines() if line.startswith("[faults]"))


def pytest_terminal_summary(terminalreporter):
    ran = {r.nodeid for r in terminalreporter.stats.get("passed", [])}
    unjustified = [n for n in _SLOW_ITEMS if n in ran and n not in _SLOW_STARTED]
    if unjustified:  # a slow mark keeps a test out of the fast loop: it should start something
        terminalreporter.section("marked slow but started no Ray, cluster or pipeline process")
        for nodeid in unjustified:
            terminalreporter.write_line(nodeid)
    if _FAULT_LINES:
        terminalreporter.section("faults injected and recovered")
        for line in _FAULT_LINES:
            terminalreporter.write_line(line)


# `pytest -m "not slow"` is the developers' inner loop: it must start no Ray, no cluster and no
# pipeline process. A test that does (in its body or in any fixture it sets up, module-scoped ones
# included) and is not marked slow fails, so the marker stays true.
SLOW_COMMAND = re.compile(r"-m pipelines\.|\bray\b.*\b(start|job)\b|moto\.server|mlflow\b.*\b(server|ui)\b")


_SLOW_STARTED: set[str] = set()  # slow tests seen starting something (or using a fixture that does)


@contextlib.contextmanager
def _watching_slow_starts(item):
    """Unmarked: starting Ray, a cluster or a pipeline process fails the test. Marked slow: the
    start is only recorded, so that the summary can list slow marks that nothing justifies."""
    import ray._private.node

    started: list[str] = []
    marked = item.get_closest_marker("slow") is not None

    def refuse(what: str) -> None:
        started.append(what)
        if marked:
            _SLOW_STARTED.add(item.nodeid)
            return
        pytest.fail(f"{item.nodeid} starts {what}: mark it @pytest.mark.slow (pytest -m 'not slow' runs only tests that start none)", pytrace=False)

    def no_ray_node(*args, **kwargs):
        refuse("a Ray node")
        return node_init(*args, **kwargs)

    node_init, popen_init = ray._private.node.Node.__init__, subprocess.Popen.__init__

    def checked_popen(self, args, *rest, **kwargs):
        shown = args if isinstance(args, str) else " ".join(map(str, args))
        if SLOW_COMMAND.search(shown) and not re.match(r"\S*bash -n ", shown):  # bash -n only parses
            refuse(f"a process ({shown[:80]})")
        popen_init(self, args, *rest, **kwargs)

    ray._private.node.Node.__init__, subprocess.Popen.__init__ = no_ray_node, checked_popen
    try:
        yield
    finally:
        ray._private.node.Node.__init__, subprocess.Popen.__init__ = node_init, popen_init
    if started and not marked:  # the failure was caught on the way (a CLI that turns errors into exit codes)
        pytest.fail(f"{item.nodeid} started {started[0]}: mark it @pytest.mark.slow", pytrace=False)


# Fixtures that start Ray, a cluster or a server process: a test that uses one is slow.
SLOW_FIXTURES = {"ray_local", "two_nodes", "worker_nodes_cluster", "s3_server", "ray_head"}


_SLOW_ITEMS: list = []


def _uses_ray_local(item) -> bool:
    return "ray_local" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
            _SLOW_STARTED.add(item.nodeid)
    _SLOW_ITEMS[:] = [i.nodeid for i in items if i.get_closest_marker("slow")]
    items.sort(key=_uses_ray_local)  # stable: the shared-Ray tests last, in their usual order


def _shut_down_shared_ray(item) -> None:
    """A test that does not use the shared Ray runs without it (it may start its own cluster, or
    time something); after the last test, nothing is left running."""
    import sys

    ray = sys.modules.get("ray")
    if _SHARED_RAY and (item is None or not _uses_ray_local(item)):  # only the Ray ray_local started
        _SHARED_RAY.clear()
        if ray is not None and ray.is_initialized():
            ray.shutdown()


def pytest_sessionfinish(session):
    _shut_down_shared_ray(None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _shut_down_shared_ray(item)
    with _watching_slow_starts(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _watching_slow_starts(item):
        return (yield)
