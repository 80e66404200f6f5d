"""Where runs keep their files: Ray Train checkpoints (``run.storage_path``) and the step cache
(``sweep.cache_dir``), their defaults, and the few operations the platform needs on them whether
they are local folders or object-store URIs (``s3://``, ``gs://``, read through pyarrow like Ray
Train does).

Defaults, first found wins:

* ``run.storage_path``: the key; ``$DYNLAB_STORAGE`` (a cluster sets it on every node); under a
  Ray job ``~/dynlab_runs`` (the job's working folder is Ray's per-session package folder, deleted
  when the head restarts); else ``./dynlab_runs``.
* ``sweep.cache_dir``: the key; ``$DYNLAB_STEP_CACHE``; else ``<storage>/cache`` when the storage
  is local. The step cache is a file system (Ray tasks read and write it as files): with remote
  storage it needs a folder of its own.

On a cluster of more than one node a local folder is seen by one node only: it must lie under a
shared file system the user declares in ``$DYNLAB_SHARED_FS`` (mount points, separated by
``os.pathsep``), see :func:`is_shared`.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import threading
import urllib.parse
import uuid
from pathlib import Path
from typing import Iterable

from dynlab.errors import ConfigError

STORAGE_ENV = "DYNLAB_STORAGE"
STEP_CACHE_ENV = "DYNLAB_STEP_CACHE"
SHARED_FS_ENV = "DYNLAB_SHARED_FS"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in every submitted driver
LOCAL_DEFAULT = "dynlab_runs"
JOB_DEFAULT = "~/dynlab_runs"
REACH_TIMEOUT = 20.0  # seconds for the reachability probe (a dead endpoint answers in about 6)


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def in_ray_session(path: str | os.PathLike) -> bool:
    """``path`` lies in a Ray session folder (``<temp>/ray/session_*``, where a job's working
    folder is unpacked): deleted when the head restarts."""
    parts = Path(path).expanduser().absolute().parts
    return "runtime_resources" in parts or any(p.startswith("session_") and i and parts[i - 1] == "ray" for i, p in enumerate(parts))


def under_ray_job() -> bool:
    """This process is the driver of a submitted Ray job (or runs inside Ray's session folder)."""
    return RAY_JOB_ENV in os.environ or in_ray_session(Path.cwd())


def resolve(path: str, key: str = "run.storage_path") -> str:
    """A URI as given; a local path absolute, resolved in the driver (Ray workers and Tune trials
    run in folders of their own). A path that cannot be resolved (a symlink loop) is a ConfigError
    naming ``key``."""
    if is_remote(path):
        return path
    p = Path(path).expanduser()
    try:
        return str(p.resolve(strict=True))  # strict: Python >= 3.13 resolves a loop without a word otherwise
    except RuntimeError as err:  # Python < 3.13: "Symlink loop from ..."
        loop = err
    except OSError as err:
        if err.errno != errno.ELOOP:  # not there yet (the run creates it), or not a folder (the writable check says so)
            return str(p.resolve())
        loop = err
    raise ConfigError(key, path, f"a folder, not a symlink loop ({getattr(loop, 'strerror', None) or loop}): point it at a real folder")


def storage_source(cfg) -> tuple[str, str]:
    """``(the key or variable that sets run.storage_path, its value)``; the value is "" for the default."""
    if cfg.run.storage_path:
        return "run.storage_path", cfg.run.storage_path
    if os.environ.get(STORAGE_ENV):
        return STORAGE_ENV, os.environ[STORAGE_ENV]
    return "run.storage_path", ""


def default_storage() -> str:
    """``run.storage_path`` when neither the key nor ``$DYNLAB_STORAGE`` is set."""
    return JOB_DEFAULT if under_ray_job() else LOCAL_DEFAULT


def storage_path(cfg) -> str:
    """``run.storage_path`` with its defaults (see the module docstring), resolved."""
    key, value = storage_source(cfg)
    return resolve(value or default_storage(), key)


def cache_source(cfg) -> tuple[str, str] | None:
    """``(where the value comes from, the value as given)`` for the step cache, or None when it
    derives from the storage."""
    if cfg.sweep.cache_dir:
        return "sweep.cache_dir", cfg.sweep.cache_dir
    if os.environ.get(STEP_CACHE_ENV):
        return STEP_CACHE_ENV, os.environ[STEP_CACHE_ENV]
    return None


def cache_path(cfg) -> Path:
    """The step cache folder with its defaults (see the module docstring), absolute."""
    source = cache_source(cfg)
    if source is not None:
        key, value = source
        if is_remote(value):
            raise ConfigError(key, value, "a folder (local, or on a shared file system such as EFS): the step cache is read and written as files")
        return Path(resolve(value, key))
    storage = storage_path(cfg)
    if is_remote(storage):
        raise ConfigError("sweep.cache_dir", cfg.sweep.cache_dir, f"a folder (local, or on a shared file system) given as sweep.cache_dir or ${STEP_CACHE_ENV}, since run.storage_path={storage!r} is remote")
    return Path(storage) / "cache"


def shared_roots() -> list[Path]:
    """The mount points declared shared by every node (``$DYNLAB_SHARED_FS``)."""
    return [Path(p).expanduser().resolve() for p in os.environ.get(SHARED_FS_ENV, "").split(os.pathsep) if p.strip()]  # resolved like the paths


def is_shared(path: str) -> bool:
    """Every node of a cluster sees ``path``: a URI, or a folder under a declared shared mount."""
    if is_remote(path):
        return True
    p = Path(path).expanduser().resolve()
    return any(p == root or root in p.parents for root in shared_roots())


# ---------------------------------------------------------------- object-store access (pyarrow, like Ray Train)


def _fs(uri: str):
    """``(pyarrow filesystem, path inside it)``; endpoints and credentials come from the usual
    variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or the URI's query."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def join(base: str, *names: str) -> str:
    """``base/name/...`` for a folder or a URI (a URI's query, e.g. ``?endpoint_override=``, kept last)."""
    if not is_remote(base):
        return str(Path(base, *names))
    u = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(u._replace(path="/".join([u.path.rstrip("/"), *names])))


def checkpoint_uri(storage: str, checkpoint) -> str:
    """Where a Ray Train ``Checkpoint`` lives, as a path or URI usable by :func:`copy_files`
    (Ray gives the path inside its filesystem: ``bucket/runs/...`` for ``s3://bucket/runs``)."""
    if not is_remote(storage):
        return checkpoint.path
    u = urllib.parse.urlsplit(storage)
    return f"{u.scheme}://{checkpoint.path}" + (f"?{u.query}" if u.query else "")


def open_file(folder: str | os.PathLike, name: str):
    """A file of a checkpoint folder for ``torch.load``: a local path, or the bytes of a remote one."""
    if not is_remote(folder):
        return Path(folder) / name
    fs, path = _fs(join(str(folder), name))
    with fs.open_input_stream(path) as f:
        return io.BytesIO(f.read())


def copy_files(folder: str | os.PathLike, dest: Path, names: Iterable[str]) -> None:
    """Copy the named files of a checkpoint folder (a path or a URI) into the local ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if not is_remote(folder):
        for name in names:
            shutil.copy2(Path(folder) / name, dest / name)
        return
    import pyarrow.fs

    fs, path = _fs(str(folder))
    for name in names:
        pyarrow.fs.copy_files(f"{path}/{name}", str(dest / name), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())


def latest_checkpoint(run_dir: str, files: Iterable[str]) -> str | None:
    """The newest ``epoch_*`` folder of a remote run holding every one of ``files`` (non-empty),
    as a URI; None when there is none (or the run does not exist)."""
    import pyarrow.fs

    fs, path = _fs(run_dir)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=True))
    sizes = {i.path[len(path) + 1 :]: i.size for i in infos if i.type == pyarrow.fs.FileType.File}
    folders = sorted({k.split("/")[0] for k in sizes if k.startswith("epoch_") and "/" in k}, reverse=True)
    for d in folders:
        if all(sizes.get(f"{d}/{f}") for f in files):
            return join(run_dir, d)
    return None


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT) -> str | None:
    """None when a probe object can be written under ``uri`` and deleted again within ``timeout``
    seconds; else why not (unknown bucket, dead endpoint, missing credentials, no answer)."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            fs, path = _fs(uri)
            bucket = path.split("/")[0]
            import pyarrow.fs

            if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                outcome.append(f"bucket {bucket!r} not found")
                return
            key = f"{path.rstrip('/')}/.dynlab-probe-{uuid.uuid4().hex[:8]}"
            with fs.open_output_stream(key) as f:
                f.write(b"0")
            fs.delete_file(key)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - every failure is the same problem for the user
            outcome.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")

    worker = threading.Thread(target=probe, daemon=True)  # a silent endpoint must not hang the driver
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:.0f} s"


def results_line(cfg, run_id: str, uri: str, figure: str | None = None) -> str:
    """One line saying where a run's results live."""
    parts = [f"storage {storage_path(cfg)}"]
    try:
        parts.append(f"step cache {cache_path(cfg)}")
    except ConfigError:  # a pipeline without sweeps on remote storage has no step cache
        pass
    if figure:
        parts.append(f"figure {figure}")
    parts.append(f"MLflow run {run_id} in {uri}")
    return "[dynlab] results live at: " + ", ".join(parts)
