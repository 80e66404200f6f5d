"""The cluster path: a real Ray head started here, the pipeline submitted with `ray job submit`,
then the head restarted and the same submission served from the cache.

A fresh head answers job submissions with "No available agent to submit job, please try again
later" until its job agent (started after the dashboard) has registered; on a loaded machine that
takes longer than the head's own 10 s wait. So the fixture waits for the dashboard to answer, and a
submission that meets that message is made again, within a bounded time (AGENT_WAIT_S)."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dynlab import storage

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 120


def ray_job_cli(args: list[str], env: dict, timeout_s: float = AGENT_WAIT_S, retry_on: str = AGENT_NOT_READY, interval_s: float = 2.0) -> subprocess.CompletedProcess:
    """``args`` (a ``ray job`` command line), run again every ``interval_s`` while its output says ``retry_on``,
    for at most ``timeout_s``; then a clear failure naming what never came up."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        if retry_on not in proc.stdout + proc.stderr:
            return proc
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray head's job agent did not come up within {timeout_s:.0f} s: '{' '.join(args[1:4])}' kept answering '{retry_on}'")
        time.sleep(interval_s)


def wait_for_dashboard(address: str, env: dict, timeout_s: float = AGENT_WAIT_S) -> None:
    """Until ``ray job list`` answers (the dashboard's job API is up), or a clear failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the Ray dashboard at {address} did not answer 'ray job list' within {timeout_s:.0f} s: {(proc.stdout + proc.stderr)[-500:]}")
        time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """A local Ray head with token authentication, started by ``ray start`` like a cluster's head,
    with the storage variables a cluster exports before ``ray start`` (here only the step cache:
    the storage takes the Ray-job default, ``~/dynlab_runs``, in a home of the test's own)."""

    def __init__(self, tmp_path: Path):
        home = tmp_path / "home"
        home.mkdir()
        # token authentication on, with a token of this test's own: a fresh machine has none in ~/.ray
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        for k in ("RAY_ADDRESS", storage.STORAGE_ENV, storage.SHARED_FS_ENV):
            self.env.pop(k, None)
        self.env.update({"HOME": str(home), storage.STEP_CACHE_ENV: str(tmp_path / "step-cache")})
        for var, cache in (("MPLCONFIGDIR", "matplotlib"), ("DYNLAB_CACHE", "dynlab")):  # the caller's caches, not rebuilt in the new home
            self.env[var] = os.environ.get(var) or str(Path.home() / ".cache" / cache)
        self.port, self.dash, self.agent = free_port(), free_port(), free_port()
        # a Ray temp folder of its own (short: Ray's socket paths must stay under 108 bytes), so the
        # address file that `ray start` writes never points another ray.init() on this machine here
        self.temp_dir = tempfile.mkdtemp(prefix="dlray-", dir="/tmp")
        self.address = f"http://127.0.0.1:{self.dash}"

    def start(self) -> None:
        """``ray start --head`` in the foreground (``--block``) in a process group of its own, so that
        :meth:`stop` ends this head's processes only (``ray stop`` would end every Ray on the machine)."""
        start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}", f"--temp-dir={self.temp_dir}",
                 f"--dashboard-agent-listen-port={self.agent}", "--num-cpus=2", "--disable-usage-stats"]  # the agent's default port (52365) may be taken by another Ray here
        self.proc = subprocess.Popen(start, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_dashboard(self.address, self.env)

    def stop(self) -> None:
        """What ``ray stop`` does, for this head only: SIGTERM to its processes, a short grace, then
        SIGKILL to what is left (the raylet outlives a SIGTERM while ``ray start --block`` lives)."""
        for sig, grace_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and _live_members(self.proc.pid):
                self.proc.poll()
                time.sleep(0.25)
        self.proc.wait(timeout=10)


def _live_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (zombies waiting to be reaped do not count)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            live.append(int(stat.parent.name))
    return live


@pytest.fixture
def ray_head(tmp_path):
    head = Head(tmp_path)
    head.start()
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_temperature_ablation_and_after_a_head_restart_is_served_from_cache(tmp_path, ray_head):
    """Submitted as the README says, with no storage key: results land outside Ray's session folder
    (the job's working folder, deleted with the session), so after ``ray stop`` / ``ray start`` the
    same submission trains nothing."""
    head, env = ray_head, ray_head.env
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", head.address, "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "-m", "pipelines.ablation_temperature", "sweep.values=[0.5]", "sweep.baseline=false", "epochs=1",
        "msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "eval.num_budgets=2",
    ]  # fmt: skip
    # without the token the cluster refuses the client
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", head.address], env=stranger, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    storage_dir, cache_dir = tmp_path / "home" / "dynlab_runs", tmp_path / "step-cache"
    where = f"[dynlab] results live at: storage {storage_dir}, step cache {cache_dir}, figure {cache_dir}/steps/"
    first = ray_job_cli(cmd, env)  # again while the head's job agent is not up yet
    out = first.stdout + first.stderr
    assert first.returncode == 0 and "succeeded" in out, out[-6000:]
    assert "[sweep] 1 of 1 trials to train" in out and where in out
    assert len(list(storage_dir.glob("*/epoch_0000/state.pt"))) == 1 and len(list((cache_dir / "train").iterdir())) == 1

    head.stop()  # the head's session folder, with the job's working folder, is gone
    head.start()
    second = ray_job_cli(cmd, env)
    out = second.stdout + second.stderr
    assert second.returncode == 0 and "succeeded" in out, out[-6000:]
    assert "[sweep] 0 of 1 trials to train (1 cached)" in out and where in out  # nothing retrained

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablation_temperature")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    assert len(kids) == 1 and kids[0].data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}  # one training, once
    for parent in parents:
        assert "report/comparison.csv" in {f.path for f in client.list_artifacts(parent.info.run_id, "report")}


def test_a_submission_is_made_again_while_the_job_agent_is_not_up(tmp_path):
    """A stand-in for ``ray job submit`` that answers like a fresh head twice, then succeeds."""
    count = tmp_path / "count"
    script = (
        "import pathlib, sys\n"
        f"p = pathlib.Path({str(count)!r}); n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1))\n"
        "if n < 2: sys.exit('RuntimeError: Request failed with status code 500: No available agent to submit job, please try again later.')\n"
        "print('succeeded')\n"
    )
    proc = ray_job_cli([sys.executable, "-c", script], dict(os.environ), interval_s=0.05)
    assert proc.returncode == 0 and "succeeded" in proc.stdout and count.read_text() == "xxx"
    with pytest.raises(pytest.fail.Exception, match=r"job agent did not come up within 0 s"):
        ray_job_cli([sys.executable, "-c", "import sys; sys.exit('No available agent to submit job')"], dict(os.environ), timeout_s=0)
