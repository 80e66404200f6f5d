"""Security basics: checkpoints are read with ``weights_only=True``, the Ray auth token never reaches
MLflow or the console, and a local Ray's dashboard listens on 127.0.0.1 only."""

from __future__ import annotations

import ast
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from dynlab import cluster

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("platform", "methods", "pipelines", "benchmarks", "tests")


# --- torch.load ------------------------------------------------------------------------------------


def _torch_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the torch module (``import torch as th``) and to ``torch.load`` itself."""
    modules, loads = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            loads |= {a.asname or a.name for a in node.names if a.name == "load"}
    return modules, loads


def unsafe_loads(source: str, where: str = "<source>") -> list[str]:
    """``where:line`` of every call of ``torch.load`` (under any alias) without a literal ``weights_only=True``."""
    tree = ast.parse(source)
    modules, loads = _torch_names(tree)
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_load = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id in modules) or (
            isinstance(f, ast.Name) and f.id in loads
        )
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
        if is_load and not safe:
            bad.append(f"{where}:{node.lineno}")
    return bad


def test_the_check_catches_every_unsafe_form():
    assert unsafe_loads("import torch\ntorch.load('x.pt')\n") == ["<source>:2"]
    assert unsafe_loads("import torch\ntorch.load('x.pt', weights_only=False)\n") == ["<source>:2"]
    assert unsafe_loads("import torch as th\nth.load('x.pt', map_location='cpu')\n") == ["<source>:2"]
    assert unsafe_loads("from torch import load as L\nL('x.pt')\n") == ["<source>:2"]
    assert unsafe_loads("import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)\n") == []
    assert unsafe_loads("import json\njson.load(open('x'))\n") == []


def test_every_torch_load_in_the_project_is_weights_only():
    files = [p for top in SCANNED for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 40  # the scan really covers the project
    bad = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert bad == []


# --- where services listen -------------------------------------------------------------------------


def test_a_local_ray_dashboard_binds_to_localhost(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.init_options()["dashboard_host"] == "127.0.0.1"
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.1:10001")  # a cluster: its head decides, we only connect
    assert "dashboard_host" not in cluster.init_options()


# --- the Ray auth token ----------------------------------------------------------------------------


def _artifact_files(client, run_id: str, folder: Path) -> list[Path]:
    local = Path(client.download_artifacts(run_id, "", str(folder)))
    return [p for p in local.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_the_ray_auth_token_never_reaches_mlflow_or_the_console(tmp_path):
    """The pipeline in its own process (Ray reads its auth mode once per process), with token
    authentication on and a fresh token in the environment, as a user runs it."""
    from mlflow import MlflowClient

    token = secrets.token_hex(32)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "MLFLOW_TRACKING_URI": uri, "DYNLAB_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    tiny = ["workers=0", "epochs=1", "msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "eval.num_budgets=2", "run.name=secret"]
    proc = subprocess.run([sys.executable, "-m", "pipelines.train", *tiny], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert token not in console
    dashboard = re.findall(r"dashboard at .*?(\d+\.\d+\.\d+\.\d+)", console, flags=re.IGNORECASE)
    assert all(host == "127.0.0.1" for host in dashboard)

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        logged = [*run.data.params.items(), *run.data.tags.items(), *((k, str(v)) for k, v in run.data.metrics.items())]
        assert logged and not [k for k, v in logged if token in k or token in v]
        files = _artifact_files(client, run.info.run_id, tmp_path / "artifacts" / run.info.run_id)
        assert any(p.name == "config.yaml" for p in files)
        assert not [p.name for p in files if token.encode() in p.read_bytes()]
