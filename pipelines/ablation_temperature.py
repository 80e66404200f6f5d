"""BoostNet temperature ablation (BoostNet paper, Fig. 6a): one Ray Tune trial per temperature t
(F_n = t * stop_grad(F_{n-1}) + f_n), plus the joint-training baseline, each trained by Ray Train,
then calibrated and evaluated (anytime and budgeted batch) and compared in one figure and table.

Laptop (digits, CPU, local Ray and MLflow; a few minutes on 2 cores):
    python -m pipelines.ablation_temperature
Cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.ablation_temperature \\
        preset=msdnet-cifar100-b10 dataset=cifar100 data.root=/data/cifar100 epochs=300 batch_size=64 \\
        run.use_gpu=true sweep.max_concurrent=8
Knobs: sweep.values=[0,0.5,1] (the grid), sweep.baseline=false, sweep.repeats=3, backbone=ranet,
sweep.asha=true, and every training key (see --help).
"""

from __future__ import annotations

import sys

from dynlab import pipeline, sweeps

EXPERIMENT = "ablation_temperature"
AXIS = "boostnet.temperature"
DEFAULT_GRID = [0.0, 0.25, 0.5, 0.75, 1.0]
BASELINE = {"method": "joint"}


def trials(cfg) -> list[sweeps.Trial]:
    grid = {AXIS: list(cfg.sweep.values) or DEFAULT_GRID}
    return sweeps.expand(cfg, grid=grid, extra=[BASELINE] if cfg.sweep.baseline else [])


def title(cfg) -> str:
    return f"BoostNet temperature on {cfg.backbone} / {cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    return pipeline.main(__doc__, EXPERIMENT, trials, title, argv)


if __name__ == "__main__":
    sys.exit(main())
