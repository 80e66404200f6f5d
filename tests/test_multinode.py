"""Multi-node runs on one machine: Ray's multi-node test cluster (three nodes of 1 CPU each, the
head and two workers, every node its own raylet), so where things run is forced by resources:

* DDP training with 2 Ray Train workers of 1 CPU each: on two nodes, and the update they make
  together equals one process's update on the whole batch;
* a sweep of 2 concurrent trials holding 1 CPU each: on two nodes (their Train workers, half a
  CPU each, fit on the third), with ``run.storage_path=s3://...`` on a local S3-compatible server
  (moto): checkpoints in the bucket, published into the step cache, a re-run served from it;
* preflight on that cluster: a local folder is refused unless declared shared.

All nodes share this machine's disk, so a tmp folder really is shared: it is declared so with
``$DYNLAB_SHARED_FS``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dynlab import config, preflight, storage, sweeps, tracking, training
from dynlab import data as data_mod
from dynlab.errors import ConfigError
from dynlab.predictions import GatedPredictions
from dynlab.registry import get_method, register_method
from tests.stand_ins import TwoDepthConfig, TwoDepthNet, cross_entropy_step
from tests.test_storage import bucket_files, free_port, s3_env, s3_server  # noqa: F401  (s3_server: a fixture)

REPO = Path(__file__).resolve().parents[1]
PLUGINS = ["methods", "tests.test_multinode"]  # Ray workers import this module for the method below
# 16 training images (4 more held out), batches of 8: each of 2 ranks takes exactly one batch
DATA = ["method=multinode_net", "dataset=synthetic", "data.synthetic_train=20", "data.heldout=4", "data.synthetic_test=8", "data.synthetic_classes=3", "data.batch_size=8", "epochs=1"]
SGD = ["optim.lr=0.5", "optim.momentum=0", "optim.weight_decay=0", "optim.schedule=constant"]


@register_method("multinode_net", TwoDepthConfig)
class MultiNodeNet:
    """Convolutions and a linear head, no BatchNorm (per-rank batch statistics would make DDP differ
    from one process) and no parameter left without a gradient (DDP would skip the averaging)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def build_model(self, info):
        return TwoDepthNet(info.num_classes)

    def train_step(self, model, batch, backward):
        return cross_entropy_step(model, batch, backward)

    @torch.no_grad()
    def predict(self, model, images):
        return GatedPredictions(getattr(model, "module", model)(images), torch.ones(len(images), dtype=torch.float64))


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # free ports for the dashboard (the state API behind list_actors) and its agent: the defaults may be held by another Ray here
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **s3_env(s3_server)}  # this module and the S3 server for every worker
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def actor_nodes(cluster, class_name: str) -> dict[str, str]:
    """``{actor id: node id}`` of every actor of ``class_name`` this cluster has run (alive or not);
    the address is explicit: other Ray instances may run on this machine."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(address=cluster.address, filters=[("class_name", "=", class_name)], limit=1000)}


@pytest.mark.slow
def test_ddp_workers_on_two_nodes_make_the_update_of_one_process_on_the_whole_batch(in_tmp, two_nodes):
    cluster = two_nodes
    cfg = config.cli_config([*DATA, *SGD, "workers=2", "run.cpus_per_worker=1", f"run.storage_path={in_tmp / 'runs'}"])
    before = actor_nodes(cluster, "RayTrainWorker")
    result = training.fit(cfg, "ddp-2-nodes", plugins=PLUGINS)
    nodes = [n for a, n in actor_nodes(cluster, "RayTrainWorker").items() if a not in before]
    assert len(nodes) == 2 and len(set(nodes)) == 2  # one worker on each of two nodes

    # one process, the whole training split as one batch, the same initial weights and one SGD step
    bundle = data_mod.build_datasets(cfg.data, cfg.run.seed)
    images, labels = zip(*(bundle.train[i] for i in range(len(bundle.train))))
    assert len(images) == 2 * cfg.data.batch_size
    method = get_method(cfg.method).cls(cfg)
    torch.manual_seed(cfg.run.seed)
    model = method.build_model(bundle.info)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss = F.cross_entropy(model(torch.stack(images)), torch.tensor(labels))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    trained = torch.load(Path(result.checkpoint_dir) / training.STATE_FILE, weights_only=True)["model"]
    assert grads and set(grads) == set(trained) == {k for k in trained if not torch.equal(trained[k], start[k])}  # every tensor moved
    for name, g in grads.items():  # w1 = w0 - lr * g: the DDP gradient, recovered, equals the whole batch's
        ddp_grad = (start[name] - trained[name]) / cfg.optim.lr
        torch.testing.assert_close(ddp_grad, g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_a_sweep_on_s3_runs_its_trials_on_two_nodes_and_a_rerun_is_served_from_the_cache(in_tmp, two_nodes, monkeypatch):
    import ray

    cluster = two_nodes
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://dynlab/sweep")  # what a cluster sets on its nodes
    monkeypatch.setenv(storage.STEP_CACHE_ENV, str(in_tmp / "step-cache"))
    monkeypatch.setenv(storage.SHARED_FS_ENV, str(in_tmp))  # every node of this cluster sees the tmp folder
    # a trial holds a whole node's CPU, so two running at once are on two nodes
    base = config.cli_config([*DATA, "sweep.max_concurrent=2", "sweep.trial_cpus=1", "run.cpus_per_worker=0.5"])
    trials = sweeps.expand(base, grid={"optim.lr": [0.05, 0.1]})
    parent = tracking.open_run("two-nodes", "sweep")
    result = sweeps.run(base, trials, parent, "two-nodes", plugins=PLUGINS)
    assert list(result.table["status"]) == ["ok", "ok"] and sorted(result.trained) == sorted(t.id for t in trials)
    # each trial's child run names its node (the state API lost dead trial actors on a busy CI machine)
    children = tracking.client(parent.uri).search_runs([parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    nodes = [r.data.tags["dynlab.trial_node"] for r in children]
    assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) <= {n["NodeID"] for n in ray.nodes()}

    in_bucket = bucket_files("s3://dynlab/sweep")
    for t in trials:  # checkpoints in the bucket; the selected weights fetched from it into the step cache
        assert f"{sweeps.train_run_name('two-nodes', t.train_key)}/epoch_0000/state.pt" in in_bucket
        published = in_tmp / "step-cache" / sweeps.TRAIN_CACHE / t.train_key
        assert {p.name for p in published.iterdir()} == {training.BEST_FILE, "config.yaml", sweeps.RESULT_FILE}
    assert not (in_tmp / "dynlab_runs").exists()

    again = sweeps.run(base, trials, parent, "two-nodes", plugins=PLUGINS)
    parent.end()
    assert again.trained == [] and list(again.table["cached"]) == [True, True] and list(again.table["status"]) == ["ok", "ok"]


def test_preflight_on_the_multi_node_cluster_refuses_a_local_folder_unless_declared_shared(in_tmp, two_nodes, monkeypatch):
    for k in (storage.SHARED_FS_ENV, storage.STORAGE_ENV, storage.STEP_CACHE_ENV):
        monkeypatch.delenv(k, raising=False)
    cfg = config.cli_config([*DATA, "run.name=n", f"run.storage_path={in_tmp / 'runs'}"])
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"'run.storage_path' = '.*runs'.*every node of the 3-node Ray cluster.*s3://.*DYNLAB_SHARED_FS"):
        preflight.check_all([cfg], uri, tune_trials=True)
    on_s3 = cfg.with_overrides([f"run.storage_path=s3://dynlab/pre", f"sweep.cache_dir={in_tmp / 'cache'}"])
    with pytest.raises(ConfigError, match=r"'sweep.cache_dir' = '.*cache'.*every node of the 3-node Ray cluster.*DYNLAB_STEP_CACHE"):
        preflight.check_all([on_s3], uri, tune_trials=True)  # the bucket is fine, the step cache is not
    monkeypatch.setenv(storage.SHARED_FS_ENV, str(in_tmp))
    preflight.check_all([cfg], uri, tune_trials=True)
    preflight.check_all([on_s3], uri, tune_trials=True)
    assert not (in_tmp / "mlflow.db").exists()
