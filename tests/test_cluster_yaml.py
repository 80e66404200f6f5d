"""cluster.yaml as written, run on this machine: its settings line (setup_commands) and the head's
and a worker's start commands, read from the file with ports and paths substituted, start a
two-node Ray cluster with token authentication. The token reaches a node only where the file
mounts put it; a node without it, or with another, is refused.

Run the way the launcher runs them: every node gets a HOME of its own (the token where
``file_mounts`` places it), the launcher's environment (``RAY_HEAD_IP`` on workers, the node
type's ``resources`` as ``RAY_OVERRIDE_RESOURCES``), one shell per command. Left out: the
``ray stop`` lines (here they would stop every Ray on the machine, other tests' too), the install
lines (apt, EFS, uv, pip), the autoscaler's config (``ray up`` writes it) and the MLflow server
(half a minute to start on a busy 2-core machine; the settings it reads are checked). On one
machine the nodes also need ports of their own: free ones are added to each ``ray start``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from dynlab import cluster_token
from tests.test_job_submit import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CFG = yaml.safe_load((ROOT / "cluster.yaml").read_text())
HEAD_PRIVATE_IP = "$(hostname -I | awk '{print $1}')"  # what the head's settings line takes for its private address
SETTINGS = ("RAY_AUTH_MODE", "DYNLAB_STORAGE", "DYNLAB_STEP_CACHE", "DYNLAB_SHARED_FS", "MLFLOW_TRACKING_URI")


def token_mount() -> str:
    """Where ``file_mounts`` puts the token file on every node."""
    remote = [r for r, local in CFG["file_mounts"].items() if local == cluster_token.DEFAULT_PATH]
    assert len(remote) == 1, CFG["file_mounts"]
    return remote[0]


def settings_line() -> str:
    lines = [c for c in CFG["setup_commands"] if "> ~/dynlab.env" in c]
    assert len(lines) == 1
    return lines[0]


def start_commands(key: str) -> list[str]:
    """The node's start commands after its leading ``ray stop`` (checked, not run)."""
    cmds = CFG[key]
    assert cmds[0].strip() == "~/venv/bin/ray stop"  # a re-run of `ray up` restarts Ray cleanly
    return cmds[1:]


def localize(cmd: str, ports: dict[str, int], efs: Path) -> str:
    """``cmd`` for this machine: this venv's executables, free ports for the cluster's, the head's
    private address 127.0.0.1, EFS a folder of the test's."""
    cmd = cmd.replace("~/venv/bin", str(BIN)).replace(HEAD_PRIVATE_IP, "127.0.0.1").replace("/mnt/efs", str(efs))
    cmd = cmd.replace(" --autoscaling-config=~/ray_bootstrap_config.yaml", "")  # written by `ray up`; no autoscaler here
    for port, free in ports.items():
        cmd = re.sub(rf"\b{port}\b", str(free), cmd)
    leftover = [p for p in ("~/venv", "hostname -I", "/mnt/efs", "bootstrap", *map(str, ports)) if re.search(rf"(?<!\d){re.escape(p)}(?!\d)", cmd)]
    assert not leftover, f"cluster.yaml changed: {leftover} left in {cmd!r}"
    return cmd


def node_ports(temp_dir: str) -> str:
    """What one machine needs for several nodes: a temp dir of the test's, the default fixed ports moved to free ones."""
    fixed = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    return f"--temp-dir={temp_dir} " + " ".join(f"--{flag}={free_port()}" for flag in fixed)


def node_env(home: Path, resources: dict, head_ip: str | None = None, **extra: str) -> dict:
    """The environment the launcher gives a node's commands: HOME, the node type's resources, and
    on workers the head's address; nothing of this test's own Ray, MLflow or dynlab settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DYNLAB_", "MLFLOW_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)  # the node's settings add it
    env |= {"HOME": str(home), "RAY_OVERRIDE_RESOURCES": json.dumps(resources, separators=(",", ":")), "RAY_USAGE_STATS_ENABLED": "0", **extra}
    if head_ip:
        env["RAY_HEAD_IP"] = head_ip
    return env


def node_home(root: Path, name: str, token: str | None) -> Path:
    home = root / name
    home.mkdir()
    if token is not None:  # as the file mount places it (rsync keeps the mode; the settings line narrows it)
        path = Path(token_mount().replace("~", str(home), 1))
        path.parent.mkdir(parents=True)
        path.write_text(token)
        path.chmod(0o644)
    return home


class Nodes:
    """Shell commands in sessions of their own, so that everything a ``ray start`` leaves running
    (GCS, raylet, dashboard, agents, workers) is stopped by killing the session's process group."""

    def __init__(self):
        self.groups: list[int] = []

    def run(self, cmd: str, env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(["bash", "-c", cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.groups.append(proc.pid)
        return proc

    def stop(self) -> None:
        for pgid in self.groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_all(nodes: Nodes, cmds: list[str], env: dict) -> tuple[int, str]:
    """A node's commands one after the other, each in a shell of its own (as the launcher runs them)."""
    rc, log = 0, ""
    for cmd in cmds:
        rc, out = finish(nodes.run(cmd, env))
        log += out
        if rc:
            break
    return rc, log


DRIVER = """
import json, os, sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 60
while len(alive := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)

@ray.remote(num_cpus=0)
def settings(keys):
    import shutil
    return {k: os.environ.get(k) for k in keys} | {"python": shutil.which("python")}

on = lambda n: settings.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(sys.argv[2].split(","))
print("RESULT", json.dumps([{"resources": n["Resources"], "env": ray.get(on(n), timeout=120)} for n in alive]))
"""


@pytest.mark.slow
def test_cluster_yaml_starts_a_token_authenticated_cluster_and_refuses_nodes_without_the_token(tmp_path):
    types = CFG["available_node_types"]
    head_type = CFG["head_node_type"]
    worker_type = next(name for name in types if name != head_type)
    token = secrets.token_hex(32)
    ports = {6379: free_port(), 8265: free_port(), 5000: free_port()}  # GCS, dashboard, MLflow
    efs = tmp_path / "efs"
    temp_dir = tempfile.mkdtemp(prefix="dynlab-ray-")  # short: Ray's socket paths must stay under 108 characters
    gcs = f"127.0.0.1:{ports[6379]}"
    homes = {name: node_home(tmp_path, name, tok) for name, tok in (("head", token), ("worker", token), ("stranger", None), ("impostor", secrets.token_hex(32)))}
    head_env = node_env(homes["head"], types[head_type]["resources"])
    nodes = Nodes()
    try:
        # the settings line, then the head's start command
        settings, start_head = localize(settings_line(), ports, efs), [localize(c, ports, efs) for c in start_commands("head_start_ray_commands")]
        ray_start_head = [c for c in start_head if "ray start --head" in c]
        assert len(ray_start_head) == 1 and "mlflow server" in " ".join(start_head)
        rc, log = run_all(nodes, [settings, ray_start_head[0].replace("ray start", f"ray start {node_ports(temp_dir)}")], head_env)
        assert rc == 0, log[-3000:]
        env_file = (homes["head"] / "dynlab.env").read_text()
        assert "DYNLAB_STORAGE=s3://" in env_file and "DYNLAB_MLFLOW_ARTIFACTS=s3://" in env_file  # object storage by default
        assert stat.S_IMODE((homes["head"] / ".ray" / "auth_token").stat().st_mode) == 0o600
        assert token not in log

        # the worker's start commands, and two nodes that must not join: no token, another token
        worker_cmds = [localize(c, ports, efs) for c in start_commands("worker_start_ray_commands")]
        assert len(worker_cmds) == 1
        joins = {}
        for name in ("worker", "stranger", "impostor"):
            env = node_env(homes[name], types[worker_type]["resources"], head_ip="127.0.0.1")
            if name == "worker":
                rc, log = finish(nodes.run(settings, env))
                assert rc == 0, log
            else:  # the same settings as the worker, only the token differs; refused, it gives up after 3 s of retries instead of 20
                shutil.copy(homes["worker"] / "dynlab.env", homes[name] / "dynlab.env")
                env["RAY_gcs_server_port_wait_time_s"] = "3"
            joins[name] = nodes.run(worker_cmds[0].replace("ray start", f"ray start {node_ports(temp_dir)}"), env)
        outcome = {name: finish(proc) for name, proc in joins.items()}
        assert outcome["worker"][0] == 0, outcome["worker"][1][-3000:]
        rc, log = outcome["stranger"]
        assert rc != 0 and "AuthenticationError" in log and "no authentication token was found" in log, log[-2000:]
        rc, log = outcome["impostor"]
        assert rc != 0 and "InvalidAuthToken" in log, log[-2000:]  # the head's answer
        assert not [name for name, (_, log) in outcome.items() if token in log]

        # a driver with the token: two nodes as the file describes them, and the settings every process on them inherits
        driver_env = {k: v for k, v in head_env.items() if k != "RAY_OVERRIDE_RESOURCES"} | {"RAY_AUTH_MODE": "token"}
        proc = subprocess.run([sys.executable, "-c", DRIVER, gcs, ",".join(SETTINGS)], env=driver_env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        found = json.loads(proc.stdout.split("RESULT ", 1)[1])
        assert len(found) == 2  # head and worker; neither refused node joined
        by_cpu = sorted(found, key=lambda n: n["resources"].get("CPU", 0))
        assert by_cpu[0]["resources"].get("CPU", 0) == 0  # the head: nothing trains there
        assert {k: by_cpu[1]["resources"].get(k) for k in types[worker_type]["resources"]} == types[worker_type]["resources"]
        expected = {
            "RAY_AUTH_MODE": "token",
            "DYNLAB_STORAGE": re.search(r"B=(s3://\S+) ", settings_line()).group(1) + "/runs",
            "DYNLAB_STEP_CACHE": f"{efs}/dynlab/cache",
            "DYNLAB_SHARED_FS": str(efs),
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports[5000]}",  # the head's private address
            "python": str(BIN / "python"),  # `python -m pipelines.x` in a job is the venv's
        }
        assert [n["env"] for n in found] == [expected, expected]
    finally:
        nodes.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- the token file --------------------------------------------------------------------------------


def test_the_token_is_created_once_private_and_never_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    path = tmp_path / ".ray" / "auth_token"
    assert cluster_token.main([]) == 0
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and stat.S_IMODE(path.stat().st_mode) == 0o600
    out = capsys.readouterr()
    assert "created" in out.out and str(path) in out.out and token not in out.out + out.err

    path.chmod(0o644)  # kept (a running cluster uses it), its mode narrowed
    assert cluster_token.main([]) == 0
    assert path.read_text() == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "kept" in capsys.readouterr().out

    monkeypatch.setenv("RAY_AUTH_TOKEN", "something-else")  # would shadow the file for Ray clients here
    cluster_token.main([])
    assert "RAY_AUTH_TOKEN" in capsys.readouterr().err


def test_cluster_yaml_mounts_the_token_where_ray_reads_it_and_names_each_value_to_fill_in_once():
    # the token file the module writes is the one copied to every node, at Ray's default path there
    assert token_mount() == cluster_token.DEFAULT_PATH == "~/.ray/auth_token"
    assert not cluster_token.DEFAULT_PATH.startswith(".")  # outside the repository
    settings = settings_line()
    assert "RAY_AUTH_MODE=token" in settings and HEAD_PRIVATE_IP in settings and "RAY_HEAD_IP" in settings
    # every node: the project installed, its settings sourced before `ray start`
    assert any("pip install" in c and "-e ~/dynlab" in c for c in CFG["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all(c.startswith(". ~/dynlab.env && ") for c in start_commands(key))
    mlflow = next(c for c in CFG["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host $DYNLAB_HEAD_IP" in mlflow and "--artifacts-destination $DYNLAB_MLFLOW_ARTIFACTS" in mlflow
    # GPU workers declare their GPUs; the head none and no CPUs
    types = CFG["available_node_types"]
    assert types[CFG["head_node_type"]]["resources"] == {"CPU": 0}
    assert all(t["resources"].get("GPU", 0) >= 1 for name, t in types.items() if name != CFG["head_node_type"])
    # every command is valid shell once YAML has folded it (bash -n parses without running)
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in CFG[key]:
            proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert proc.returncode == 0, f"{key}: {cmd!r}: {proc.stderr}"
    # each placeholder once outside the comments, so one edit fills it in everywhere
    body = "\n".join(line.split(" #")[0] for line in (ROOT / "cluster.yaml").read_text().splitlines() if not line.lstrip().startswith("#"))
    assert {p: body.count(p) for p in ("YOUR-BUCKET", "fs-XXXXXXXX", "ACCOUNT-ID", "ami-FILL-IN")} == dict.fromkeys(("YOUR-BUCKET", "fs-XXXXXXXX", "ACCOUNT-ID", "ami-FILL-IN"), 1)
