"""BoostNet gradient ablation (BoostNet paper, Fig. 6c): gradient rescaling on/off crossed with a
trainable F_{n-1} (no stop-gradient) or the default stop-gradient; four trials, each trained by
Ray Train inside a Ray Tune trial, then calibrated, evaluated and compared.

Laptop (digits, CPU; a few minutes on 2 cores):
    python -m pipelines.ablation_boostnet_gradients
On a backbone without gradient rescaling (RANet, as in the reference) only trainable_prev varies:
the other axis would train identical models under two labels, so it is dropped (one line says so).
    python -m pipelines.ablation_boostnet_gradients backbone=ranet
Cluster:
    ray job submit --working-dir . -- python -m pipelines.ablation_boostnet_gradients \\
        preset=msdnet-cifar100-b10 dataset=cifar100 data.root=/data/cifar100 epochs=300 batch_size=64 \\
        run.use_gpu=true sweep.max_concurrent=4
"""

from __future__ import annotations

import sys

from dynlab import pipeline, registry, sweeps

EXPERIMENT = "ablation_boostnet_gradients"
GRID = {"boostnet.gradient_rescale": [True, False], "boostnet.trainable_prev": [False, True]}


def grid(cfg) -> dict[str, list]:
    """GRID without the axes the backbone does not implement (they would duplicate trials)."""
    dropped = registry.unsupported_options(cfg.backbone, cfg.method_cfg)
    kept = {k: v for k, v in GRID.items() if k.split(".", 1)[1] not in dropped}
    for name, reason in dropped.items():
        if f"boostnet.{name}" in GRID:
            print(f"[ablation] axis boostnet.{name} dropped: {reason}; only {', '.join(kept)} varies")
    return kept


def trials(cfg) -> list[sweeps.Trial]:
    return sweeps.expand(cfg, grid=grid(cfg))


def title(cfg) -> str:
    return f"BoostNet gradients on {cfg.backbone} / {cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    return pipeline.main(__doc__, EXPERIMENT, trials, title, argv)


if __name__ == "__main__":
    sys.exit(main())
