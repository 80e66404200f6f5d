"""MLflow tracking: where runs go, opening/closing runs, and logging from any Ray worker.

The driver opens the run and passes ``(tracking_uri, run_id)`` to rank 0 of the trainer, which logs
through an explicit ``MlflowClient`` (no global MLflow state crosses process boundaries). Without
``MLFLOW_TRACKING_URI`` the store is ``sqlite:///<cwd>/mlflow.db``: the one ``mlflow ui`` opens when
started from the same folder. It is made absolute before any Ray worker starts, since workers
``chdir`` into the Ray session folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml

from dynlab.frames import scalar_columns

TRAIN_NAME_TAG = "dynlab.train_name"
CONFIG_HASH_TAG = "dynlab.config_hash"
OWNER_TAG = "dynlab.owner"  # host:pid:start of the driver process a RUNNING run belongs to
PARENTS_TAG = "dynlab.earlier_parents"  # a child run continued under a new parent run lists the old ones
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow UI (3.x) to choose the experiment's view
LOG_RETRY_SECONDS = 10.0  # a metric-logging call retries a dead server this long, then buffers
HTTP_TIMEOUT_SECONDS = "10"  # per request while logging metrics; MLflow's default is 120 s with 7 retries


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """MLflow requests that fail in seconds (no retries of its own, short timeout): our caller
    retries, so that a stopped server costs seconds per attempt, not minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = HTTP_TIMEOUT_SECONDS
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _permanent(err: BaseException) -> bool:
    """A request the server answered with a 4xx (bad value, unknown run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and 400 <= err.get_http_status_code() < 500


def _warn(msg: str) -> None:
    print(f"[dynlab] tracking: {msg}", file=sys.__stdout__ or sys.stdout, flush=True)


def tracking_uri() -> str:
    """The tracking URI to use, absolute. Sets ``MLFLOW_TRACKING_URI`` so child processes agree."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        uri = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(Path.cwd() / uri[len('sqlite:///'):]).resolve()}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@contextlib.contextmanager
def mlflow_global_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` inside the block and restored after (even
    to "unset"): ``models:/`` URIs resolve through it, and a test or a second store in the same
    process must not inherit it."""
    from mlflow.tracking._tracking_service import utils  # MLflow's own block-scoped setter

    with utils._use_tracking_uri(uri):
        yield


def log_dataset_inputs(handle: "RunHandle", data_cfg, heldout_indices: list[int], n_heldout: int, n_test: int) -> None:
    """The run's data as MLflow dataset inputs (the UI's Dataset column): the training set, its
    held-out split and the test set, each named after the dataset, with one digest for the data and
    the exact held-out split (two runs with equal digests trained and selected on the same images)."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = {"name": data_cfg.name, "root": str(data_cfg.root or ""), "train_subset": data_cfg.train_subset, "heldout": data_cfg.heldout}
    digest = hashlib.sha256(json.dumps({**source, "heldout_indices": sorted(heldout_indices)}, sort_keys=True).encode()).hexdigest()[:10]
    inputs = []
    for context, rows in (("training", None), ("held-out", n_heldout), ("test", n_test)):
        profile = json.dumps({"num_rows": rows} if rows is not None else {"train_subset": data_cfg.train_subset, "heldout": n_heldout})
        ds = Dataset(name=f"{data_cfg.name} ({context})", digest=digest, source_type="local" if data_cfg.root else "code", source=json.dumps(source), profile=profile)
        inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    client(handle.uri).log_inputs(handle.run_id, datasets=inputs)


def compare_link(run_ids: list[str], experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page that compares these runs side by side (parameters, metrics, and the
    cost-axis curves overlaid), without expanding a parent run by hand."""
    import json
    from urllib.parse import quote

    return f"{base}/#/compare-runs?runs={quote(json.dumps(list(run_ids)))}&experiments={quote(json.dumps([str(experiment_id)]))}"


def ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        return f"cd {folder} && mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
    return f"open {uri} in a browser"


def client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(uri or tracking_uri())


def experiment_id(name: str, uri: str | None = None) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = uri or tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd of whoever asks
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns" / name).as_uri()
    try:
        # the MLflow UI opens an experiment of this kind in its model-training view (runs, charts,
        # models), not the GenAI view it picks for an experiment without the tag
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@dataclass
class RunHandle:
    """What a worker needs to log into a run."""

    uri: str
    run_id: str
    experiment_id: str
    _pending: list = field(default_factory=list, init=False, repr=False, compare=False)  # unsent metric points

    def as_payload(self) -> dict[str, str]:
        """What a Ray worker needs to rebuild this handle: ``RunHandle(**payload)``."""
        return {"uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id}

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log_points([(k, v, step) for k, v in metrics.items()])

    def log_points(self, points: list[tuple[str, float, int]], retry_seconds: float | None = None) -> bool:
        """Many ``(key, value, step)`` metric points in few requests (a curve on a cost axis).
        Buffered: points the server does not take now (stopped, restarting) stay in this handle and
        go with the next call or :meth:`flush`. Never raises: a logging failure must not stop
        training. True when nothing is left unsent."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        outage = bool(self._pending)  # already known down: one attempt, so training does not wait on it
        self._pending += [Metric(k, float(v), now, int(step)) for k, v, step in points]
        if retry_seconds is None:
            retry_seconds = 0.0 if outage else LOG_RETRY_SECONDS
        return self.flush(retry_seconds)

    def flush(self, retry_seconds: float = LOG_RETRY_SECONDS) -> bool:
        """Send the buffered metric points, retrying with backoff for at most ``retry_seconds``."""
        deadline, delay = time.monotonic() + retry_seconds, 0.5
        while self._pending:
            try:
                with quick_http():
                    client(self.uri).log_batch(self.run_id, metrics=self._pending[:500])
                del self._pending[:500]
            except Exception as err:  # noqa: BLE001 - reported below; training goes on
                if _permanent(err):
                    _warn(f"dropped {min(500, len(self._pending))} metric points MLflow refused: {err}")
                    del self._pending[:500]
                    continue
                if time.monotonic() + delay > deadline:
                    _warn(f"tracking server unreachable ({type(err).__name__}): {len(self._pending)} metric points kept, sent with the next log call")
                    return False
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        c = client(self.uri)
        for i in range(0, len(items), 100):
            c.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """All in one request (MLflow's batch call), not one per tag."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        c = client(self.uri)
        for i in range(0, len(items), 100):
            c.log_batch(self.run_id, tags=items[i : i + 100])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        client(self.uri).log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        client(self.uri).log_text(self.run_id, text, name)

    def log_frame(self, df: pd.DataFrame, name: str, artifact_path: str | None = None, csv: bool = False) -> None:
        """A DataFrame as Parquet (and optionally CSV) artifact."""
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / f"{name}.parquet"
            df.to_parquet(p, index=False)
            self.log_artifact(p, artifact_path)
            if csv:
                c = Path(d) / f"{name}.csv"
                scalar_columns(df).to_csv(c, index=False)
                self.log_artifact(c, artifact_path)

    def artifact_uri(self) -> str:
        return client(self.uri).get_run(self.run_id).info.artifact_uri

    def status(self) -> str:
        return client(self.uri).get_run(self.run_id).info.status

    def end(self, status: str = "FINISHED") -> None:
        client(self.uri).set_terminated(self.run_id, status)


def open_run(
    experiment: str,
    run_name: str,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    resume_key: str | None = None,
    uri: str | None = None,
    owner: str | None = None,
) -> RunHandle:
    """Create a run, or reopen the unfinished run with the same ``resume_key`` (a resumed training),
    re-pointed to ``parent_run_id`` when it had another parent (earlier parents kept in a tag).
    In a Ray worker pass ``uri`` (the driver's): a worker's environment and folder are not the driver's.
    ``owner`` (default: this process) is the driver process the run lives and dies with; see
    :func:`close_orphans`."""
    uri = uri or tracking_uri()
    exp_id = experiment_id(experiment, uri)
    c = client(uri)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    tags[OWNER_TAG] = owner or process_owner()
    if resume_key:
        tags[TRAIN_NAME_TAG] = resume_key
        found = c.search_runs([exp_id], filter_string=f"tags.`{TRAIN_NAME_TAG}` = '{resume_key}'", max_results=1, order_by=["attributes.start_time DESC"])
        if found and found[0].info.status != "FINISHED":
            return _reopen(c, found[0], uri, exp_id, parent_run_id, tags[OWNER_TAG])
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=tags, run_name=run_name)
    return RunHandle(uri, run.info.run_id, exp_id)


def _reopen(c, run, uri: str, exp_id: str, parent_run_id: str | None, owner: str) -> RunHandle:
    """An unfinished run continued: RUNNING again, owned by this driver, under its new parent."""
    run_id = run.info.run_id
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, "dynlab.resumed", "true")
    c.set_tag(run_id, OWNER_TAG, owner)
    old_parent = run.data.tags.get("mlflow.parentRunId")
    if parent_run_id and old_parent != parent_run_id:
        earlier = [p for p in run.data.tags.get(PARENTS_TAG, "").split(",") if p]
        c.set_tag(run_id, PARENTS_TAG, ",".join([*earlier, old_parent] if old_parent else earlier))
        c.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
    return RunHandle(uri, run_id, exp_id)


def process_owner(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (this one by default): who owns a run while it is RUNNING."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    """When a process started (Linux: clock ticks since boot), to tell it from a later one with the
    same pid; empty where /proc is not available."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def owner_alive(owner: str) -> bool | None:
    """Whether the process named by :func:`process_owner` still runs; None when it cannot be told
    (another host, or no owner recorded)."""
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if not owner or host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return _start_ticks(int(pid)) == start  # a reused pid is another process


def close_orphans(experiment_id: str, uri: str | None = None, status: str = "KILLED") -> list[str]:
    """Close the RUNNING runs of an experiment whose owning driver is gone (killed, crashed, the
    machine rebooted): mark them ``status`` with a tag saying why. Runs of live drivers and runs
    whose owner cannot be checked (another host) are left alone. Returns the closed run ids."""
    c = client(uri)
    closed = []
    for run in c.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        owner = run.data.tags.get(OWNER_TAG, "")
        if owner_alive(owner) is False:
            c.set_tag(run.info.run_id, "dynlab.closed_by", f"a later invocation: its driver {owner} is gone")
            c.set_terminated(run.info.run_id, status)
            closed.append(run.info.run_id)
    if closed:
        _warn(f"closed {len(closed)} run(s) left RUNNING by a driver that is gone: marked {status}")
    return closed


@contextlib.contextmanager
def run_guard(handle: RunHandle) -> Iterator[RunHandle]:
    """Close the run FINISHED on success; on any error mark it FAILED with the error logged, re-raise."""
    try:
        yield handle
    except BaseException as err:  # KeyboardInterrupt too: never leave a run RUNNING
        # stopped from outside (Ctrl-C, SIGTERM; Tune ending a trial's process with SystemExit), not failed
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        with contextlib.suppress(Exception):
            handle.set_tags({"dynlab.error": f"{type(err).__name__}: {err}"[:5000]})
            handle.log_text("".join(traceback.format_exception(err)), "error.txt")
        with contextlib.suppress(Exception):
            handle.end(status)
        raise
    else:
        handle.end("FINISHED")


def log_config(handle: RunHandle, cfg) -> None:
    """Resolved config as params (dotted keys) and as a YAML artifact."""
    existing = client(handle.uri).get_run(handle.run_id).data.params
    flat = {k: str(v)[:6000] for k, v in cfg.flat().items()}
    handle.log_params({k: v for k, v in flat.items() if k not in existing})  # a resumed run keeps its params
    changed = {f"dynlab.changed_on_resume.{k}": v for k, v in flat.items() if k in existing and existing[k] != v}
    if changed:
        handle.set_tags(changed)
    handle.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    handle.set_tags({CONFIG_HASH_TAG: cfg.hash(), "dynlab.method": cfg.method, "dynlab.backbone": cfg.backbone, "dynlab.dataset": cfg.data.name})


def cost_step(macs: float) -> int:
    """MLflow step for a point on a cost axis: thousands of multiply-adds (kMACs), so that the
    UI's step axis overlays runs on a common cost scale."""
    return int(round(float(macs) / 1e3))
