
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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the integration tests of one module (2 CPUs, like CI); shut down
    after the module, so that a test starting its own Ray head has the machine to itself.
    ``address="local"``: a new instance even when another Ray runs on this machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=True, runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    yield ray
    ray.shutdown()


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
    if _FAULT_LINES:
        terminalreporter.section("faults injected and recovered")
        for line in _FAULT_LINES:
            terminalreporter.write_line(line)
