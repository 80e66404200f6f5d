"""Checks run in the driver before anything is written or started: a problem the config, the data
or the cluster reveals costs one line and seconds, never a hang or a trained model.

Each check raises a :class:`~dynlab.errors.ConfigError` (or ``DataError``) naming the key, the
value and what is allowed. :func:`check_all` runs them for every config a pipeline will train
(one per sweep trial), so a trial that could only fail after training fails now.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable

from dynlab import data as data_mod
from dynlab import storage as storage_mod
from dynlab.errors import ConfigError

TRACKING_TIMEOUT = 5.0  # seconds to reach an MLflow server before giving up


def check_tracking(uri: str, timeout: float = TRACKING_TIMEOUT) -> None:
    """The MLflow store answers: an HTTP server within ``timeout`` seconds, a SQLite file's folder
    writable. Anything else (databricks, ...) is left to MLflow."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's own tracking server
                resp.read(64)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # a server that wants credentials is reachable; MLflow handles auth
                return
            raise ConfigError("MLFLOW_TRACKING_URI", uri, f"a reachable MLflow tracking server ({url} answered HTTP {err.code})") from None
        except (urllib.error.URLError, socket.timeout, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError("MLFLOW_TRACKING_URI", uri, f"a reachable MLflow tracking server (no answer from {url} within {timeout:.0f} s: {reason}); start it or unset MLFLOW_TRACKING_URI for a local SQLite store") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if db.exists() and not db.is_file():
            raise ConfigError("MLFLOW_TRACKING_URI", uri, f"a SQLite database file ({db} is a folder); name a file inside it, e.g. sqlite:///{db / 'mlflow.db'}")
        if db.is_file() and db.stat().st_size and not _is_sqlite(db):
            raise ConfigError("MLFLOW_TRACKING_URI", uri, f"a SQLite database file ({db} is another kind of file); name a new or an MLflow .db file")
        writable_folder("MLFLOW_TRACKING_URI", db.parent, uri)


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False  # unreadable: the same problem for the user


RAY_TIMEOUT = 5.0  # seconds for the Ray cluster at RAY_ADDRESS to accept a connection


def check_ray_address(timeout: float = RAY_TIMEOUT) -> None:
    """The Ray cluster named by ``RAY_ADDRESS`` (``host:port`` of its GCS, ``ray://host:port`` of a
    Ray Client server) accepts a TCP connection within ``timeout`` seconds: ``ray.init`` waits for a
    closed port for minutes. ``auto`` and ``local`` (and anything else Ray may read) are left to Ray."""
    address = os.environ.get("RAY_ADDRESS", "").strip()
    host_port = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = host_port.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        why = "no answer" if isinstance(err, socket.timeout) else (err.strerror or type(err).__name__)
        raise ConfigError("RAY_ADDRESS", address, f"the address of a running Ray cluster ({host}:{port}: {why} within {timeout:.0f} s); start it (ray start --head), or unset RAY_ADDRESS to start a local Ray") from None


def check_home() -> None:
    """A local Ray with token authentication (Ray's default) writes its token to
    ``~/.ray/auth_token`` when none exists yet: a HOME that cannot take it (read-only, not a
    folder) fails inside ``ray.init`` with a traceback. Nothing to check when Ray is joined at
    ``RAY_ADDRESS``, authentication is off, or a token is already there."""
    if os.environ.get("RAY_ADDRESS", "local").strip() not in ("", "local") or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if os.environ.get("RAY_AUTH_TOKEN") or (token_file and Path(token_file).expanduser().is_file()):
        return
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file() and token.stat().st_size:
        return
    reason = unwritable(token.parent)
    if reason is not None:
        raise ConfigError("HOME", str(Path.home()), f"a writable home folder: a local Ray saves its auth token in {token} ({reason}); set HOME to a writable folder, or RAY_AUTH_TOKEN_PATH to a token file (python -m dynlab.cluster_token <file> writes one)")


def writable_folder(key: str, folder: Path, shown=None) -> None:
    """Prove that ``folder`` takes a file (an unwritable or full disk fails here), leaving no trace:
    folders created for the probe are removed again (the run creates them when it writes)."""
    reason = unwritable(folder)
    if reason is not None:
        raise ConfigError(key, str(shown or folder), f"a writable folder ({reason})")


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` does not take a file (``"<folder>: <why>"``), or None; see :func:`writable_folder`."""
    folder = folder.expanduser().absolute()
    created = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)
    probe = folder / f".dynlab-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 4096)
        return None
    except OSError as err:
        return f"{folder}: {err.strerror or err}"
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        if created is not None:
            for p in [folder, *folder.parents]:
                if p == created.parent:
                    break
                with contextlib.suppress(OSError):
                    p.rmdir()


def check_storage(cfg, nodes: int = 1, step_cache: bool = True) -> None:
    """``run.storage_path`` (checkpoints) and the step cache (``step_cache``: the pipeline has one)
    are usable: a local folder writable, outside Ray's session folder (deleted when the head
    restarts) and, on a cluster of ``nodes`` > 1 nodes, on a file system every node sees; a URI
    reachable now (a probe object written and deleted, in seconds)."""
    storage = storage_mod.storage_path(cfg)
    key, given = storage_mod.storage_source(cfg)
    shown = given or storage
    if storage_mod.is_remote(storage):
        reason = storage_mod.check_reachable(storage)
        if reason is not None:
            raise ConfigError(key, shown, f"a storage URI this cluster can reach ({reason}): check the bucket name, the credentials and the endpoint (AWS_ENDPOINT_URL)")
    else:
        check_local_location(key, shown, storage, nodes, f"an s3:// (or gs://) URI, or a folder on a file system every node mounts; set it per run (run.storage_path=...) or for the cluster (${storage_mod.STORAGE_ENV})")
        writable_folder(key, Path(storage), shown)
    if not step_cache and storage_mod.cache_source(cfg) is None:
        return
    cache = storage_mod.cache_path(cfg)
    key, given = storage_mod.cache_source(cfg) or ("sweep.cache_dir", "")
    shown = given or str(cache)
    check_local_location(key, shown, str(cache), nodes, f"a folder on a file system every node mounts (Ray tasks on every node read and write the step cache); set it per run (sweep.cache_dir=...) or for the cluster (${storage_mod.STEP_CACHE_ENV})")
    writable_folder(key, cache, shown)


def check_local_location(key: str, shown, path: str, nodes: int, fix: str) -> None:
    """A local folder that outlives Ray's session and, on a multi-node cluster, is declared shared."""
    if storage_mod.in_ray_session(path):
        raise ConfigError(key, shown, f"a folder outside Ray's session folder ({path} is deleted when the Ray head restarts): {fix}")
    if nodes > 1 and not storage_mod.is_shared(path):
        raise ConfigError(key, shown, f"a location every node of the {nodes}-node Ray cluster sees (the local folder {path} is on this node only): {fix}; a folder already on a shared mount is declared with ${storage_mod.SHARED_FS_ENV}=<mount point>")


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of every alive node: the running Ray cluster's, or this machine's when Ray is not
    started yet (a local Ray would get exactly these)."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        from dynlab.cluster import ensure_ray

        ensure_ray()
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return [{"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}]


def check_resources(cfgs: list, nodes: list[dict[str, float]] | None = None, tune_trials: bool = False) -> None:
    """Every trial's Ray Train workers fit the cluster, so that nothing waits forever for resources
    that do not exist (``tune_trials``: a trial with a worker group also holds ``sweep.trial_cpus``
    for its Tune driver; an in-process trial holds only its worker's CPUs).
    Skipped with ``run.wait_for_resources=true`` (an autoscaling cluster)."""
    for c in cfgs:
        if c.run.num_workers > 0 and c.run.cpus_per_worker <= 0 and not c.run.use_gpu:  # Ray refuses a request for nothing
            raise ConfigError("run.cpus_per_worker", c.run.cpus_per_worker, "more than 0 for Ray Train workers without a GPU (each must ask for some resource)")
    cfgs = [c for c in cfgs if not c.run.wait_for_resources]
    if not cfgs:
        return
    from dynlab import sweeps

    nodes = cluster_nodes() if nodes is None else nodes
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    biggest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    where = f"the Ray cluster has {total_cpu:g} CPU(s) and {total_gpu:g} GPU(s) on {len(nodes)} node(s); on an autoscaling cluster set run.wait_for_resources=true"
    for cfg in cfgs:
        r = cfg.run
        workers = max(1, r.num_workers)
        if r.use_gpu and total_gpu < workers:
            if total_gpu == 0:
                raise ConfigError("run.use_gpu", True, f"false: {where}")
            raise ConfigError("run.num_workers", r.num_workers, f"at most {int(total_gpu)} with run.use_gpu=true (one GPU per worker): {where}")
        own = cfg.sweep.trial_cpus if tune_trials and not sweeps.in_process(cfg) else 0.0  # in-process: the trial is the worker
        need = r.cpus_per_worker * workers + own
        if r.cpus_per_worker > biggest_cpu:
            raise ConfigError("run.cpus_per_worker", r.cpus_per_worker, f"at most {biggest_cpu:g} (the largest node's CPUs): {where}")
        if need > total_cpu + 1e-9:
            fit = int((total_cpu - own) // r.cpus_per_worker) if r.cpus_per_worker else workers
            extra = f" with the trial's own {own:g}" if own else ""
            raise ConfigError("run.num_workers", r.num_workers, f"at most {max(fit, 0)} workers of {r.cpus_per_worker:g} CPU each ({need:g} CPUs needed{extra}): {where}")


def check_config(cfg) -> None:
    """What one resolved config reveals with the data and the model at hand: the data exists and the
    held-out size fits; requested budgets lie within the exits' costs."""
    from dynlab import steps

    info = data_mod.check(cfg.data, cfg.run.seed)
    check_zip_cache(cfg.data)
    steps.check_model(cfg, info)


def check_zip_cache(data_cfg) -> None:
    """A zip given as ``data.root`` is extracted by the first training worker into the dataset cache:
    that folder must take it (writable, room for its images), or the worker would find out."""
    import shutil

    need = data_mod.zip_extraction(data_cfg)
    if need is None:
        return
    folder, size = need
    key, shown = "DYNLAB_CACHE", os.environ.get("DYNLAB_CACHE") or str(folder)
    fix = f"set {key} to a writable folder with room for them"
    try:
        writable_folder(key, folder, shown)
    except ConfigError as err:
        raise ConfigError(key, shown, f"{err.allowed} to extract the images of data.root's zip into: {fix}") from None
    free = shutil.disk_usage(next(p for p in [folder, *folder.parents] if p.exists())).free
    if size > free:
        raise ConfigError(key, shown, f"a folder with room for the images of data.root's zip ({size / 1e9:.1f} GB to extract, {free / 1e9:.1f} GB free): {fix}")


def _differing_tensors(model, saved: dict) -> list[str]:
    """Names of the tensors that a saved state dict lacks, adds or shapes differently from ``model``'s."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in saved.items()}
    return sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])


def check_checkpoint(cfg, run_dir: Path) -> None:
    """A run restarted under a name that already has checkpoints resumes from the newest one: that
    checkpoint must be readable and of this architecture, or the run would fail (or worse, resume
    something else) only once its workers start."""
    import torch

    from dynlab import training
    from dynlab.errors import DataError
    from dynlab.registry import get_method

    last = training.latest_checkpoint(run_dir)
    if last is None:
        return
    path = last / training.STATE_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise DataError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}): delete {last} to resume from the checkpoint before it, or use another run.name") from None
    diff = _differing_tensors(get_method(cfg.method).cls(cfg).build_model(data_mod.dataset_info(cfg.data)), saved)
    if diff:
        raise ConfigError("run.name", cfg.run.name or run_dir.name, f"a new name: {last} holds a checkpoint of another architecture ({len(diff)} tensor(s) differ, e.g. {diff[0]})")


def check_init_from(cfg) -> None:
    """``run.init_from`` weights exist and fit the model: loaded strictly, or by the method's own
    ``load_init`` (IMTA's phase II, ADN from torchvision weights), into a model built here. Checked
    once, before training: a model built later (to predict) does not read the file again."""
    from dynlab import training
    from dynlab.registry import get_method

    source = cfg.run.init_from
    if not source or "://" in source:
        return
    method = get_method(cfg.method).cls(cfg)
    try:
        saved = training.read_weights(source)
    except ConfigError:  # not a state dict, or non-finite weights: named by read_weights
        raise
    except Exception as err:  # noqa: BLE001 - missing or unreadable: the same problem for the user
        raise ConfigError("run.init_from", source, f"a readable .pt file, or a folder holding {training.BEST_FILE} ({type(err).__name__}: {str(err)[:200]})") from None
    model = method.build_model(data_mod.dataset_info(cfg.data))
    if hasattr(method, "load_init"):
        method.load_init(model, saved, source)  # its ConfigError names run.init_from
        return
    diff = _differing_tensors(model, saved)
    if diff:
        raise ConfigError("run.init_from", source, f"weights of this architecture ({len(diff)} tensor(s) differ, e.g. {diff[0]})")


def check_all(cfgs: Iterable, uri: str, tune_trials: bool = False) -> None:
    """Every check, for every config a pipeline will train; the first problem raises. Cheap checks
    first; none leaves anything behind."""
    cfgs = list(cfgs)
    check_tracking(uri)
    check_ray_address()
    check_home()
    seen = set()
    for cfg in cfgs:
        key = (cfg.data.name, cfg.data.root, cfg.data.heldout, cfg.data.image_size, cfg.run.seed, cfg.method, str(cfg.method_cfg), cfg.backbone, str(cfg.backbone_cfg), tuple(cfg.eval.budgets))
        if key not in seen:  # trials differing only in training knobs share these checks
            seen.add(key)
            check_config(cfg)
        check_init_from(cfg)
    nodes = cluster_nodes()
    check_resources(cfgs, nodes, tune_trials=tune_trials)
    for cfg in cfgs:
        storage = storage_mod.storage_path(cfg)
        if not storage_mod.is_remote(storage):  # remote storage: Ray Train restores (and checks) itself
            check_checkpoint(cfg, resume_folder(cfg, tune_trials))
        elif cfg.run.num_workers == 0:
            raise ConfigError("run.num_workers", 0, f"at least 1 with remote storage ({storage}): an in-process run keeps its checkpoints in a local folder, Ray Train uploads none")
    for cfg in {(c.run.storage_path, c.sweep.cache_dir): c for c in cfgs}.values():
        check_storage(cfg, storage_nodes(cfgs, nodes), step_cache=tune_trials)


def storage_nodes(cfgs: list, nodes: list[dict[str, float]]) -> int:
    """How many nodes must see the storage: the alive ones, and at least 2 on a cluster that adds
    nodes on demand (``run.wait_for_resources=true`` with ``RAY_ADDRESS``): trials land on nodes not
    up yet."""
    autoscaling = os.environ.get("RAY_ADDRESS", "local") not in ("", "local") and any(c.run.wait_for_resources for c in cfgs)
    return max(len(nodes), 2 if autoscaling else 1)


def resume_folder(cfg, tune_trials: bool) -> Path:
    """Where the Ray Train run of ``cfg`` keeps its checkpoints (a sweep names it by train hash)."""
    from dynlab import sweeps, training

    storage = training.storage_path(cfg)
    name = sweeps.train_run_name(cfg.run.experiment, cfg.train_hash()) if tune_trials else cfg.run.name
    return Path(storage) / name
