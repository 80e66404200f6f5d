"""Connecting to Ray: the cluster named by ``RAY_ADDRESS`` (a cluster, or the one ``ray job
submit`` runs in), else a local instance. Started lazily, so a pipeline served from cache never
pays Ray's start-up."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_STARTED_RAY = False
LOCAL_HOST = "127.0.0.1"  # a local Ray's dashboard binds here, never to a public address


def init_options() -> dict:
    """``ray.init`` arguments: the cluster at ``RAY_ADDRESS``, else a local instance whose
    dashboard (and job API) listens on 127.0.0.1 only (said explicitly, not left to Ray's default).
    ``"local"``, not None: with None, ``ray.init`` joins whatever Ray another program started on this
    machine (its address file in /tmp/ray), which is not the cluster the user named."""
    address = os.environ.get("RAY_ADDRESS") or "local"
    options = {"address": address, "log_to_driver": True, "runtime_env": runtime_env()}
    if address == "local":
        options["dashboard_host"] = LOCAL_HOST
    return options


def ensure_ray():
    """Connect to ``RAY_ADDRESS`` or start a local Ray, once."""
    global _STARTED_RAY
    import ray

    if not ray.is_initialized():
        with _keep_sigterm_handler():
            ray.init(**init_options())
        _STARTED_RAY = True
    return ray


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Ray's core worker installs a SIGTERM handler of its own in this process (it prints a stack
    and aborts): the command's handler (SIGTERM closes the runs like Ctrl-C, see
    ``cli.sigterm_as_ctrl_c``) is put back after ``ray.init``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(ours):
            signal.signal(signal.SIGTERM, ours)


def runtime_env() -> dict | None:
    """Ship ``dynlab`` to every Ray worker when it is not installed, e.g. under
    ``ray job submit --working-dir .`` (the working dir carries methods/ and pipelines/, but
    dynlab lives in platform/, which is not on the workers' path)."""
    import importlib.metadata
    from pathlib import Path

    import dynlab

    try:
        importlib.metadata.distribution("dynlab")
        return None
    except importlib.metadata.PackageNotFoundError:
        return {"py_modules": [str(Path(dynlab.__file__).resolve().parent)]}


def stop_if_started() -> None:
    global _STARTED_RAY
    if _STARTED_RAY:
        import ray

        ray.shutdown()
        _STARTED_RAY = False
