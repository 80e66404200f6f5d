"""The cluster path: a real Ray head started here, the pipeline submitted with `ray job submit`.

A fresh head answers job submissions with "No available agent to submit job, please try again
later" until its job agent (started after the dashboard) has registered; on a loaded machine that
takes longer than the head's own 10 s wait. So the fixture waits for the dashboard to answer, and a
submission that meets that message is made again, within a bounded time (AGENT_WAIT_S)."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

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


@pytest.fixture
def ray_head(tmp_path):
    # token authentication on, with a token of this test's own: a fresh machine has none in ~/.ray
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180)
    try:
        wait_for_dashboard(f"http://127.0.0.1:{dash}", env)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_job_submit_runs_the_temperature_ablation(tmp_path, ray_head):
    address, env = ray_head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "-m", "pipelines.ablation_temperature", "sweep.values=[0.5]", "sweep.baseline=false", "epochs=1",
        "msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "eval.num_budgets=2", f"run.storage_path={tmp_path / 'runs'}",
    ]  # fmt: skip
    # without the token the cluster refuses the client
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)}
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=stranger, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    proc = ray_job_cli(cmd, env)  # again while the head's job agent is not up yet
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ablation_temperature")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == 1 and kids[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert "report/comparison.csv" in {f.path for f in client.list_artifacts(parents[0].info.run_id, "report")}


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
