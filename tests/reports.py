"""What the tests read back from MLflow after a reproduction run."""

from __future__ import annotations

from pathlib import Path


def reproduction_folder(experiment: str, scale: str, dest: Path) -> str:
    """The ``reproduction/`` artifacts of the one parent run of ``experiment`` at ``scale``,
    downloaded under ``dest``."""
    from mlflow import MlflowClient

    from dynlab import tracking

    client = MlflowClient(tracking.tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`dynlab.scale` = '{scale}'")
    return client.download_artifacts(parent.info.run_id, "reproduction", str(dest))
