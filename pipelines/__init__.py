"""Experiments, each runnable as ``python -m pipelines.<name>``."""
