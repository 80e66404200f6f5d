"""BoostNet batch-size ablation (BoostNet paper, Fig. 6b): one trial per batch size, each trained by
Ray Train inside a Ray Tune trial, then calibrated, evaluated and compared.

Laptop (digits, CPU; a few minutes on 2 cores):
    python -m pipelines.ablation_batch_size
Cluster:
    ray job submit --working-dir . -- python -m pipelines.ablation_batch_size \\
        preset=msdnet-cifar100-b10 dataset=cifar100 data.root=/data/cifar100 epochs=300 \\
        sweep.values=[64,128,256,512] run.use_gpu=true sweep.max_concurrent=4
The learning rate stays as configured for every batch size (as in the paper's ablation).
"""

from __future__ import annotations

import sys

from dynlab import pipeline, sweeps

EXPERIMENT = "ablation_batch_size"
AXIS = "data.batch_size"
DEFAULT_GRID = [32, 64, 128]


def trials(cfg) -> list[sweeps.Trial]:
    return sweeps.expand(cfg, grid={AXIS: [int(v) for v in cfg.sweep.values] or DEFAULT_GRID})


def title(cfg) -> str:
    return f"{cfg.method}: batch size on {cfg.backbone} / {cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    return pipeline.main(__doc__, EXPERIMENT, trials, title, argv)


if __name__ == "__main__":
    sys.exit(main())
