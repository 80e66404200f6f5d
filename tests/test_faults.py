"""Faults injected into real runs (real Ray, real MLflow), each counted: every trial ends trained to
its configured epochs, no MLflow run is left RUNNING, each trial has one child run, and every
epoch's metrics arrive exactly once. Each test prints its counts (gathered by conftest.py and shown at the end of the run)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from dynlab import config, sweeps, tracking, training

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "eval.num_budgets=2", "eval.p_grid=false"]
SWEEP = [*TINY, "sweep.values=[0.5]", "sweep.baseline=false"]
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ what every fault test counts


def mlflow_counts(uri: str, experiment: str, epochs: int) -> dict:
    """Runs by status, child runs per trial, and per child the epochs logged (steps of best_score)."""
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if "dynlab.trial" in r.data.tags]
    steps = {r.data.tags["dynlab.trial"]: sorted(m.step for m in c.get_metric_history(r.info.run_id, "best_score")) for r in children}
    return {
        "status": Counter(r.info.status for r in runs),
        "children_per_trial": Counter(r.data.tags["dynlab.trial"] for r in children),
        "steps": steps,
        "lost": sum(len(set(range(epochs)) - set(s)) for s in steps.values()),
        "duplicated": sum(len(s) - len(set(s)) for s in steps.values()),
        "runs": runs,
    }


def assert_clean(counts: dict, trials: int, epochs: int, fault: str) -> None:
    running = counts["status"].get("RUNNING", 0)
    dup_children = sum(n - 1 for n in counts["children_per_trial"].values())
    print(f"[faults] {fault}: trials {len(counts['children_per_trial'])}/{trials}, epochs logged {sum(len(set(s)) for s in counts['steps'].values())}/{trials * epochs}, "
          f"metrics lost {counts['lost']}, duplicated {counts['duplicated']}, runs RUNNING {running}, duplicate children {dup_children}")
    assert running == 0
    assert dup_children == 0 and len(counts["children_per_trial"]) == trials
    assert counts["lost"] == 0 and counts["duplicated"] == 0


# ------------------------------------------------------------------ a pipeline in its own process


def start(args: list[str], cwd: Path, env: dict, log: Path, module: str = "pipelines.ablation_temperature") -> subprocess.Popen:
    """The pipeline as a user runs it, in its own session (so its Ray processes can be reaped)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def reap(proc: subprocess.Popen) -> None:
    """End what is left of a pipeline process's session (Ray agents outliving a killed driver)."""
    proc.wait(timeout=60)
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the pipeline exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def checkpoints(storage: Path) -> set[str]:
    return {p.parent.name for p in storage.glob("*/epoch_*/state.pt")}


def pipeline_env(tmp: Path, uri: str, gate: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DYNLAB_CACHE", training.TEST_GATE_ENV)}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'platform'}")
    if gate is not None:
        env[training.TEST_GATE_ENV] = str(gate)
    return env


def open_gate(gate: Path, epochs: int | None) -> Path:
    """Let the training that reads ``gate`` run ``epochs`` epochs in all, then wait there (None: to
    the end); see training.hold_at_test_gate. A fault injected while training waits at the gate
    lands between two known epochs, however fast or slow the machine."""
    if epochs is None:
        gate.unlink(missing_ok=True)
    else:
        part = gate.with_name(gate.name + ".part")
        part.write_text(str(epochs))
        os.replace(part, gate)  # read whole or not at all
    return gate


@pytest.mark.slow
def test_driver_killed_then_interrupted_then_rerun_continues_one_curve(tmp_path):
    """SIGKILL of the driver after epoch 1, the same command interrupted by Ctrl-C (SIGINT) after
    epoch 2, then the same command to the end: one child run continues the trial's curve, every run
    is closed. The first two invocations' training waits at a gate of its own after its epoch, so
    each signal lands between known epochs (a dying worker cannot train on), whatever the speed."""
    epochs, storage, uri = 3, tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*SWEEP, f"epochs={epochs}", f"run.storage_path={storage}"]

    killed = start(args, tmp_path, pipeline_env(tmp_path, uri, open_gate(tmp_path / "killed.gate", 1)), tmp_path / "killed.log")
    wait_for(lambda: "epoch_0000" in checkpoints(storage), 180, "epoch 1's checkpoint", killed)
    killed.send_signal(signal.SIGKILL)
    reap(killed)
    assert checkpoints(storage) == {"epoch_0000"}

    interrupted = start(args, tmp_path, pipeline_env(tmp_path, uri, open_gate(tmp_path / "interrupted.gate", 2)), tmp_path / "interrupted.log")
    wait_for(lambda: "epoch_0001" in checkpoints(storage), 180, "epoch 2's checkpoint, from the resumed trial", interrupted)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=120) == 130
    reap(interrupted)
    out = (tmp_path / "interrupted.log").read_text()
    assert "finished" not in out and "resumed from checkpoint after epoch 1" in out
    assert checkpoints(storage) == {"epoch_0000", "epoch_0001"}
    mid = mlflow_counts(uri, "ablation_temperature", epochs)
    assert mid["status"].get("RUNNING", 0) == 0 and sum(mid["children_per_trial"].values()) == 1

    again = start(args, tmp_path, pipeline_env(tmp_path, uri), tmp_path / "again.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    reap(again)
    counts = mlflow_counts(uri, "ablation_temperature", epochs)
    assert_clean(counts, trials=1, epochs=epochs, fault="driver SIGKILL + SIGINT + rerun")
    parents = [r for r in counts["runs"] if "dynlab.trial" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED"]  # killed, interrupted, final
    (child,) = [r for r in counts["runs"] if "dynlab.trial" in r.data.tags]
    assert child.info.status == "FINISHED" and child.data.tags["dynlab.resumed_at_epoch"] == "2"  # after the interrupted invocation's epoch
    final = next(r for r in parents if r.info.status == "FINISHED")
    assert child.data.tags["mlflow.parentRunId"] == final.info.run_id
    assert len(child.data.tags[tracking.PARENTS_TAG].split(",")) == 2  # the killed and the interrupted invocations


@pytest.mark.slow
def test_worker_killed_inside_a_sweep_is_retried_from_its_checkpoint(in_tmp, ray_local):
    epochs = 2
    base = config.cli_config([*TINY, f"epochs={epochs}"])
    (trial,) = sweeps.expand(base, grid={"boostnet.temperature": [0.5]})
    killed = sweeps.Trial(**{**trial.__dict__, "config": trial.cfg().with_overrides(["run.kill_after_epoch=0"]).to_dict()})
    parent = tracking.open_run("worker-kill", "sweep")
    result = sweeps.run(base, [killed], parent, "worker-kill")
    parent.end()
    assert list(result.table["status"]) == ["ok"] and result.trained == [trial.id]
    counts = mlflow_counts(tracking.tracking_uri(), "worker-kill", epochs)
    assert_clean(counts, trials=1, epochs=epochs, fault="worker kill in a sweep")
    (child,) = [r for r in counts["runs"] if "dynlab.trial" in r.data.tags]
    assert child.data.tags["dynlab.resumed_at_epoch"] == "1"  # retried from epoch 0's checkpoint


# ------------------------------------------------------------------ a tracking server that goes away


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(tmp: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts")]
    # without MLflow 3's job runners (8 more processes importing MLflow: on 2 cores they starved the
    # training's Ray node until it was declared dead, and they outlive a SIGTERM)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=(tmp / "server.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: _answers(port), 120, "the MLflow server", proc)
    return proc


def _answers(port: int) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except OSError:
        return False


def stop_mlflow(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group outlived the SIGTERM
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_tracking_server_stopped_during_training_loses_no_metric(tmp_path):
    """Epoch 1 logged to the server, epochs 2 and 3 trained while it is down, epoch 4 after it is
    back: training waits at a gate while the test stops and starts the server."""
    epochs, storage, port = 4, tmp_path / "runs", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(tmp_path, port)
    gate = open_gate(tmp_path / "gate", 1)
    train = start([*TINY, f"epochs={epochs}", f"run.storage_path={storage}", "run.name=outage"], tmp_path, pipeline_env(tmp_path, uri, gate), tmp_path / "train.log", module="pipelines.train")
    try:
        wait_for(lambda: "epoch_0000" in checkpoints(storage), 180, "epoch 1's checkpoint", train)
        stop_mlflow(server)
        open_gate(gate, 3)
        wait_for(lambda: "epoch_0002" in checkpoints(storage), 180, "two epochs trained with the server down", train)
        server = start_mlflow(tmp_path, port)
        open_gate(gate, None)
        assert train.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
        c = MlflowClient(uri)
        (run,) = c.search_runs([c.get_experiment_by_name("dynlab-train").experiment_id])
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "best_score"))
    finally:
        reap(train) if train.poll() is not None else os.killpg(train.pid, signal.SIGKILL)
        if server.poll() is None:
            stop_mlflow(server)
    print(f"[faults] tracking server outage: epochs logged {len(set(steps))}/{epochs}, duplicated {len(steps) - len(set(steps))}, run {run.info.status}")
    assert steps == list(range(epochs)) and run.info.status == "FINISHED"
    assert "metric points kept" in (tmp_path / "train.log").read_text()  # the outage was felt, and buffered


def test_metrics_logged_while_the_server_is_unreachable_are_buffered_and_sent_later(in_tmp):
    live = tracking.open_run("buffer-test", "run")
    dead = tracking.RunHandle(f"http://127.0.0.1:{free_port()}", live.run_id, live.experiment_id)
    t0 = time.monotonic()
    assert dead.log_points([("loss", 1.0, 0)], retry_seconds=1.0) is False  # retried for a bounded time, then kept
    assert dead.log_points([("loss", 0.5, 1)]) is False  # known outage: one quick attempt
    elapsed = time.monotonic() - t0
    assert elapsed < 6, elapsed  # seconds, not MLflow's minutes of HTTP retries
    dead.uri = live.uri  # the server is back
    assert dead.log_points([("loss", 0.25, 2)]) is True
    steps = [m.step for m in tracking.client().get_metric_history(live.run_id, "loss")]
    assert sorted(steps) == [0, 1, 2]


# ------------------------------------------------------------------ a node removed during a sweep


@pytest.fixture
def epoch_gate(tmp_path, monkeypatch):
    """Training started from this process (the Ray nodes it starts next included) waits after its
    first epoch until the test opens the gate."""
    monkeypatch.setenv(training.TEST_GATE_ENV, str(tmp_path / "gate"))
    return open_gate(tmp_path / "gate", 1)


@pytest.fixture
def worker_nodes_cluster(epoch_gate):
    """A head without CPUs and three worker nodes of 1 CPU each, all on this machine (shared
    storage: a local folder). A trial holds 1 CPU (sweep.trial_cpus=1) and its Train worker
    another, so the worker never shares a node with the trial and its Train controller (pinned to
    the trial's node), and never sits on the head (which cannot be removed): removing the worker's
    node is a node loss the trial must survive, on the third node. The nodes train behind
    ``epoch_gate``."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def train_worker_node(workers) -> object | None:
    """The worker node on which a Ray Train worker is alive, if any."""
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    ids = {a.node_id for a in alive}
    return next((n for n in workers if n.node_id in ids), None)


@pytest.mark.slow
def test_node_removed_during_a_sweep_retries_its_trial_on_another_node(in_tmp, worker_nodes_cluster, epoch_gate):
    """The Train worker's node is removed while the worker waits at the gate after epoch 1 (its
    checkpoint written): the trial resumes on another node from that checkpoint."""
    cluster, workers = worker_nodes_cluster
    epochs = 2
    # a worker group (not an in-process trial): the node lost is the Train worker's, the trial's driver survives it
    base = config.cli_config([*TINY, f"epochs={epochs}", f"run.storage_path={in_tmp / 'shared'}", "sweep.trial_cpus=1", "sweep.in_process=false"])
    (trial,) = sweeps.expand(base, grid={"boostnet.temperature": [0.5]})
    parent = tracking.open_run("node-loss", "sweep")
    removed = []

    def remove_when_checkpointed():
        try:
            wait_for(lambda: "epoch_0000" in checkpoints(in_tmp / "shared") and train_worker_node(workers), 240, "the first checkpoint")
            node = train_worker_node(workers)
            cluster.remove_node(node)
            removed.append(node)
        finally:
            open_gate(epoch_gate, None)  # the retried worker trains to the end (and so does one the remover missed)

    import threading

    killer = threading.Thread(target=remove_when_checkpointed, daemon=True)
    killer.start()
    result = sweeps.run(base, [trial], parent, "node-loss")
    parent.end()
    killer.join(timeout=5)
    assert removed, "the node was not removed while the trial trained"
    assert list(result.table["status"]) == ["ok"]
    counts = mlflow_counts(tracking.tracking_uri(), "node-loss", epochs)
    assert_clean(counts, trials=1, epochs=epochs, fault="node removed")
    (child,) = [r for r in counts["runs"] if "dynlab.trial" in r.data.tags]
    assert child.data.tags["dynlab.resumed_at_epoch"] == "1"  # resumed from epoch 1's checkpoint, not from scratch
