"""SIGTERM (``kill``, a scheduler or a container stopping the job) does what Ctrl-C does: a sweep
stops, every MLflow run it opened is closed KILLED (it left 2 child runs RUNNING), exit 143, and
the same command resumes."""

from __future__ import annotations

import signal

import pytest
from mlflow import MlflowClient

from tests.test_faults import SWEEP, checkpoints, pipeline_env, reap, start, wait_for


@pytest.mark.slow
def test_sigterm_mid_sweep_closes_every_run(tmp_path):
    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*SWEEP, "epochs=30", "sweep.values=[0.25,0.5]", f"run.storage_path={storage}"]  # two trials, never done before the signal
    proc = start(args, tmp_path, pipeline_env(tmp_path, uri), tmp_path / "sweep.log")
    try:
        wait_for(lambda: checkpoints(storage), 240, "a trial's first checkpoint", proc)  # trials are training, their child runs open
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        reap(proc)
    out = (tmp_path / "sweep.log").read_text()
    assert "terminated (SIGTERM)" in out and "Traceback" not in out.split("terminated (SIGTERM)")[-1]
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("ablation_temperature").experiment_id])
    children = [r for r in runs if "dynlab.trial" in r.data.tags]
    print(f"[faults] SIGTERM mid-sweep: exit 143, runs {len(runs)} ({len(children)} trials), RUNNING {sum(r.info.status == 'RUNNING' for r in runs)}")
    assert len(children) == 2 and all(r.info.status == "KILLED" for r in runs), [(r.data.tags.get("dynlab.trial"), r.info.status, r.data.tags.get("dynlab.error")) for r in runs]
