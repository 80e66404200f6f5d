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

from dynlab import config, sweeps, tracking

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


def pipeline_env(tmp: Path, uri: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DYNLAB_CACHE")}
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'platform'}")
    return env


@pytest.mark.slow
def test_driver_killed_then_interrupted_then_rerun_continues_one_curve(tmp_path):
    """SIGKILL of the driver mid-sweep, the same command interrupted by Ctrl-C (SIGINT), then the
    same command to the end: one child run continues the trial's curve, every run is closed."""
    epochs, storage, uri = 5, tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args, env = [*SWEEP, f"epochs={epochs}", f"run.storage_path={storage}"], pipeline_env(tmp_path, uri)

    killed = start(args, tmp_path, env, tmp_path / "killed.log")
    wait_for(lambda: "epoch_0000" in checkpoints(storage), 180, "the first epoch's checkpoint", killed)
    killed.send_signal(signal.SIGKILL)
    reap(killed)

    interrupted = start(args, tmp_path, env, tmp_path / "interrupted.log")
    # the killed driver's last worker may still write a checkpoint while it dies: wait for this
    # invocation's own worker to resume before looking for its new checkpoint
    wait_for(lambda: "resumed from checkpoint" in (tmp_path / "interrupted.log").read_text(), 180, "the trial to resume", interrupted)
    before = checkpoints(storage)
    wait_for(lambda: checkpoints(storage) - before, 180, "a checkpoint of the resumed trial", interrupted)
    interrupted.send_signal(signal.SIGINT)
    assert interrupted.wait(timeout=120) == 130
    reap(interrupted)
    out = (tmp_path / "interrupted.log").read_text()
    assert "finished" not in out
    mid = mlflow_counts(uri, "ablation_temperature", epochs)
    assert mid["status"].get("RUNNING", 0) == 0 and sum(mid["children_per_trial"].values()) == 1

    again = start(args, tmp_path, env, tmp_path / "again.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    reap(again)
    counts = mlflow_counts(uri, "ablation_temperature", epochs)
    assert_clean(counts, trials=1, epochs=epochs, fault="driver SIGKILL + SIGINT + rerun")
    parents = [r for r in counts["runs"] if "dynlab.trial" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED"]  # killed, interrupted, final
    (child,) = [r for r in counts["runs"] if "dynlab.trial" in r.data.tags]
    assert child.info.status == "FINISHED" and int(child.data.tags["dynlab.resumed_at_epoch"]) >= 2  # not retrained from scratch
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
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=(tmp / "server.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True)
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


@pytest.mark.slow
def test_tracking_server_stopped_during_training_loses_no_metric(tmp_path):
    epochs, storage, port = 4, tmp_path / "runs", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(tmp_path, port)
    train = start([*TINY, f"epochs={epochs}", f"run.storage_path={storage}", "run.name=outage"], tmp_path, pipeline_env(tmp_path, uri), tmp_path / "train.log", module="pipelines.train")
    try:
        wait_for(lambda: "epoch_0000" in checkpoints(storage), 180, "epoch 1's checkpoint", train)
        stop_mlflow(server)
        wait_for(lambda: "epoch_0002" in checkpoints(storage), 120, "two epochs trained with the server down", train)
        server = start_mlflow(tmp_path, port)
        assert train.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        reap(train) if train.poll() is not None else train.kill()
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("dynlab-train").experiment_id])
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "best_score"))
    print(f"[faults] tracking server outage: epochs logged {len(set(steps))}/{epochs}, duplicated {len(steps) - len(set(steps))}, run {run.info.status}")
    assert steps == list(range(epochs)) and run.info.status == "FINISHED"
    assert "metric points kept" in (tmp_path / "train.log").read_text()  # the outage was felt, and buffered
    stop_mlflow(server)


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
def worker_nodes_cluster():
    """A head without CPUs and three worker nodes of 1 CPU each, all on this machine (shared
    storage: a local folder). A trial holds 1 CPU (sweep.trial_cpus=1) and its Train worker
    another, so the worker never shares a node with the trial and its Train controller (pinned to
    the trial's node), and never sits on the head (which cannot be removed): removing the worker's
    node is a node loss the trial must survive, on the third node."""
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
def test_node_removed_during_a_sweep_retries_its_trial_on_another_node(in_tmp, worker_nodes_cluster):
    cluster, workers = worker_nodes_cluster
    epochs = 8  # about a second each: leaves the node remover a window after the first checkpoint
    # a worker group (not an in-process trial): the node lost is the Train worker's, the trial's driver survives it
    base = config.cli_config([*TINY, f"epochs={epochs}", f"run.storage_path={in_tmp / 'shared'}", "sweep.trial_cpus=1", "sweep.in_process=false"])
    (trial,) = sweeps.expand(base, grid={"boostnet.temperature": [0.5]})
    parent = tracking.open_run("node-loss", "sweep")
    removed = []

    def remove_when_checkpointed():
        wait_for(lambda: "epoch_0000" in checkpoints(in_tmp / "shared") and train_worker_node(workers), 240, "the first checkpoint")
        node = train_worker_node(workers)
        cluster.remove_node(node)
        removed.append(node)

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
    assert int(child.data.tags["dynlab.resumed_at_epoch"]) >= 1  # resumed from its checkpoint, not from scratch
