"""Experiments, one module each: ``python -m pipelines.<name>``.

Under ``ray job submit --working-dir .`` the project may not be installed on the cluster; then the
platform package is taken from ``platform/`` beside this folder (and shipped to workers by
``dynlab.cli.runtime_env``)."""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("dynlab") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
