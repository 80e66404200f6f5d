"""Where results live: the storage defaults (``$DYNLAB_STORAGE``, ``$DYNLAB_STEP_CACHE``, a Ray job's
default outside Ray's session folder), the shared-storage rule on a multi-node cluster, and a
storage URI that cannot be reached, against a local S3-compatible server (moto's server mode on
127.0.0.1; :mod:`tests.test_multinode` trains a sweep on it), where an MLflow server keeps its
artifacts too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dynlab import config, preflight, storage, sweeps, training
from dynlab.errors import ConfigError

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "data.heldout=200", "eval.num_budgets=2", "eval.p_grid=false", "epochs=1"]
ENV_KEYS = (storage.STORAGE_ENV, storage.STEP_CACHE_ENV, storage.SHARED_FS_ENV, storage.RAY_JOB_ENV)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No storage variable of the caller's shell, a home of the test's own."""
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------ defaults


def test_storage_and_cache_defaults_come_from_the_key_then_the_cluster_then_the_folder(clean_env, monkeypatch):
    t = clean_env
    cfg = config.cli_config([])
    assert storage.storage_path(cfg) == str(t / "dynlab_runs") and storage.cache_path(cfg) == t / "dynlab_runs" / "cache"
    monkeypatch.setenv(storage.STORAGE_ENV, str(t / "cluster-runs"))
    monkeypatch.setenv(storage.STEP_CACHE_ENV, str(t / "cluster-cache"))
    assert training.storage_path(cfg) == str(t / "cluster-runs") and sweeps.cache_root(cfg) == t / "cluster-cache"
    keyed = config.cli_config([f"run.storage_path={t / 'mine'}", f"sweep.cache_dir={t / 'my-cache'}"])
    assert storage.storage_path(keyed) == str(t / "mine") and storage.cache_path(keyed) == t / "my-cache"
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://bucket/runs")
    monkeypatch.delenv(storage.STEP_CACHE_ENV)
    assert storage.storage_path(cfg) == "s3://bucket/runs"  # a URI is kept as given
    with pytest.raises(ConfigError, match=r"'sweep.cache_dir' = ''.*DYNLAB_STEP_CACHE.*is remote"):
        storage.cache_path(cfg)  # the step cache is a file system: remote storage needs a folder for it


def test_under_a_ray_job_the_default_storage_is_outside_rays_session_folder(clean_env, monkeypatch):
    """``ray job submit --working-dir .`` runs the driver in /tmp/ray/session_*/runtime_resources/
    working_dir_files/_ray_pkg_*: the default must not follow the working folder there."""
    pkg = clean_env / "ray" / "session_2026-01-01_00-00-00_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    cfg = config.cli_config([])
    assert storage.storage_path(cfg) == str(clean_env / "home" / "dynlab_runs")
    assert not storage.in_ray_session(storage.storage_path(cfg)) and storage.in_ray_session(pkg)
    monkeypatch.chdir(clean_env)
    monkeypatch.setenv(storage.RAY_JOB_ENV, "{}")  # what Ray's job supervisor sets in a submitted driver
    assert storage.storage_path(cfg) == str(clean_env / "home" / "dynlab_runs")
    inside = config.cli_config([f"run.storage_path={pkg / 'dynlab_runs'}"])
    with pytest.raises(ConfigError, match=r"'run.storage_path'.*outside Ray's session folder.*deleted when the Ray head restarts"):
        preflight.check_storage(inside)


# ------------------------------------------------------------------ bad input: other nodes cannot see a local folder


def test_a_local_folder_on_a_multi_node_cluster_is_refused_unless_declared_shared(clean_env, monkeypatch):
    t = clean_env
    cfg = config.cli_config([f"run.storage_path={t / 'runs'}"])
    preflight.check_storage(cfg, nodes=1)  # one node: a local folder is fine
    with pytest.raises(ConfigError) as err:
        preflight.check_storage(cfg, nodes=3)
    msg = str(err.value)
    assert f"'run.storage_path' = '{t / 'runs'}'" in msg and "3-node Ray cluster" in msg
    assert "s3://" in msg and "DYNLAB_STORAGE" in msg and "DYNLAB_SHARED_FS" in msg  # the fixes

    monkeypatch.setenv(storage.SHARED_FS_ENV, f"/elsewhere{os.pathsep}{t}")  # declared: t is a shared mount
    preflight.check_storage(cfg, nodes=3, step_cache=True)

    monkeypatch.setenv(storage.SHARED_FS_ENV, str(t / "runs"))  # the storage is shared, the step cache is not
    apart = config.cli_config([f"run.storage_path={t / 'runs'}", f"sweep.cache_dir={t / 'cache'}"])
    with pytest.raises(ConfigError, match=r"'sweep.cache_dir' = '.*cache'.*every node.*DYNLAB_STEP_CACHE"):
        preflight.check_storage(apart, nodes=2)
    monkeypatch.setenv(storage.STEP_CACHE_ENV, str(t / "cache"))
    with pytest.raises(ConfigError, match=r"'DYNLAB_STEP_CACHE' = '.*cache'"):  # named by where it came from
        preflight.check_storage(cfg, nodes=2)


def test_check_all_counts_the_alive_nodes(clean_env, monkeypatch):
    """The node count comes from the cluster (two nodes here, as preflight.cluster_nodes says)."""
    monkeypatch.setattr(preflight, "cluster_nodes", lambda: [{"CPU": 2.0}, {"CPU": 2.0}])
    cfg = config.cli_config([*TINY, "run.name=n"])
    with pytest.raises(ConfigError, match=r"'run.storage_path' = .*2-node Ray cluster"):
        preflight.check_all([cfg], f"sqlite:///{clean_env / 'mlflow.db'}")
    assert not (clean_env / "mlflow.db").exists() and not (clean_env / "dynlab_runs").exists()  # nothing written


# ------------------------------------------------------------------ a local S3-compatible server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    # fixed test credentials (moto accepts any); no instance-metadata lookups
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 with a bucket ``dynlab``; its variables in this process (and
    so in the Ray workers it starts) for the module."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto's S3 server did not start on {endpoint}")
            time.sleep(0.1)
    env = s3_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="dynlab")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


def bucket_files(uri: str) -> set[str]:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path) + 1 :] for i in infos if i.type == pyarrow.fs.FileType.File}


def test_a_storage_uri_that_cannot_be_reached_fails_fast_naming_it(clean_env, s3_server, monkeypatch):
    with pytest.raises(ConfigError, match=r"'run.storage_path' = 's3://no-such-bucket/runs'.*bucket 'no-such-bucket' not found"):
        preflight.check_storage(config.cli_config(["run.storage_path=s3://no-such-bucket/runs", f"sweep.cache_dir={clean_env / 'c'}"]))
    preflight.check_storage(config.cli_config(["run.storage_path=s3://dynlab/probe", f"sweep.cache_dir={clean_env / 'c'}"]))  # reachable
    assert bucket_files("s3://dynlab/probe") == set()  # the probe left nothing behind
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv(storage.STORAGE_ENV, "s3://dynlab/runs")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"'DYNLAB_STORAGE' = 's3://dynlab/runs'.*a storage URI this cluster can reach.*AWS_ENDPOINT_URL"):
        preflight.check_storage(config.cli_config([f"sweep.cache_dir={clean_env / 'c'}"]))
    assert time.monotonic() - t0 < storage.REACH_TIMEOUT + 5  # seconds, not a hang


def test_checkpoints_in_a_bucket_are_found_read_and_fetched(tmp_path, s3_server):
    """What publishing a trial from remote storage uses: the newest complete ``epoch_*`` folder (a
    folder missing a file does not count), one file read, files fetched into a local folder."""
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri("s3://dynlab")
    files = {"epoch_0000": training.CHECKPOINT_FILES, "epoch_0001": training.CHECKPOINT_FILES, "epoch_0002": (training.BEST_FILE,)}
    for epoch, names in files.items():
        for name in names:
            with fs.open_output_stream(f"dynlab/fetch/run/{epoch}/{name}") as f:
                f.write(f"{epoch}/{name}".encode())
    last = storage.latest_checkpoint("s3://dynlab/fetch/run", training.CHECKPOINT_FILES)
    assert last == "s3://dynlab/fetch/run/epoch_0001"  # epoch_0002 is incomplete
    assert storage.open_file(last, training.STATE_FILE).read() == b"epoch_0001/state.pt"
    storage.copy_files(last, tmp_path / "got", (training.BEST_FILE, "config.yaml"))
    assert {p.name: p.read_text() for p in (tmp_path / "got").iterdir()} == {"best.pt": "epoch_0001/best.pt", "config.yaml": "epoch_0001/config.yaml"}
    assert storage.latest_checkpoint("s3://dynlab/fetch/none", training.CHECKPOINT_FILES) is None


@pytest.mark.slow
def test_mlflow_artifacts_go_to_the_same_bucket_through_the_tracking_server(tmp_path, s3_server):
    """The cluster's MLflow server keeps artifacts on the bucket (``--artifacts-destination s3://``);
    clients log through it and need no S3 access of their own. The server needs boto3."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", "s3://dynlab/mlartifacts"]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.5)
        from dynlab import tracking

        handle = tracking.open_run("on-s3", "artifacts", uri=uri)
        handle.log_text("where results live", "report/where.txt")
        handle.end()
        assert f"{handle.experiment_id}/{handle.run_id}/artifacts/report/where.txt" in bucket_files("s3://dynlab/mlartifacts")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
