"""The cluster path: a real Ray head started here, the pipeline submitted with `ray job submit`."""

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
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
