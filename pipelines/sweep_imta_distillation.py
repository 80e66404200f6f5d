"""IMTA distillation sweep: Ray Tune over OFA's alpha and temperature T for IMTA's phase II (ISC and
OFA on), all trials starting from one phase I (GE), trained once and cached; then calibrated,
evaluated and compared in one figure and table, with the phase-I network as the baseline row.

Grid by default (alpha x T); ``sweep.num_samples=N`` draws N random points instead (alpha uniform
in [0, 1], T log-uniform in [0.5, 8], sampled with the run seed); ``sweep.asha=true`` stops weak
trials early. Phase II trains for ``imta.phase2_epochs`` (default 0.6 of ``run.epochs``; see
``pipelines.imta_common``: two stages, phase I then phase II from its cached weights).

Laptop (digits, CPU, local Ray and MLflow; a few minutes on 2 cores):
    python -m pipelines.sweep_imta_distillation
    python -m pipelines.sweep_imta_distillation sweep.values=[0.1,0.9]      # alpha grid (T grid fixed)
    python -m pipelines.sweep_imta_distillation sweep.num_samples=8 sweep.asha=true
Cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.sweep_imta_distillation \\
        preset=msdnet-cifar100-lingrow5 dataset=cifar100 data.root=/mnt/efs/dynlab/data/cifar100 epochs=300 batch_size=64 \\
        optim.nesterov=true run.use_gpu=true run.wait_for_resources=true sweep.max_concurrent=6
"""

from __future__ import annotations

import sys

from dynlab import sweeps
from pipelines import imta_common as common

EXPERIMENT = "sweep_imta_distillation"
DEFAULT_ALPHAS = [0.1, 0.5, 0.9]  # sweep.values overrides
DEFAULT_TEMPERATURES = [1.0, 3.0]  # the reference's shipped script and its code default
RANDOM = {"imta.alpha": ("uniform", 0.0, 1.0), "imta.temperature": ("loguniform", 0.5, 8.0)}
PHASE2 = {"imta.isc": True, "imta.ofa": True}


def points(cfg) -> list[sweeps.Trial]:
    """The (alpha, T) points: the grid, or sweep.num_samples random draws (seeded by run.seed)."""
    one = cfg.with_overrides({"sweep.repeats": 1})  # only to expand (and validate) the space
    if cfg.sweep.num_samples:
        return sweeps.expand(one, random=RANDOM)
    return sweeps.expand(one, grid={"imta.alpha": list(cfg.sweep.values) or DEFAULT_ALPHAS, "imta.temperature": DEFAULT_TEMPERATURES})


def trials(cfg) -> list[sweeps.Trial]:
    """Per seed: the phase-I trial (the baseline row unless sweep.baseline=false), then the same
    phase-II points, all starting from that seed's phase I."""
    common.check_imta(cfg)
    cfg = common.shared_budgets(cfg)
    space = points(cfg)
    out = []
    for seed, suffix in common.seeds(cfg):
        first = common.make_trial(cfg, "phase1" + suffix, "phase I (GE)", {**common.phase1_overrides(cfg, {}), **seed})
        phase2 = common.phase2_overrides(cfg, first, PHASE2)
        out += [first, *(common.make_trial(cfg, p.id + suffix, p.label, {**phase2, **p.overrides, **seed}) for p in space)]
    return out


def title(cfg) -> str:
    return f"IMTA distillation (alpha, T) on {cfg.backbone} / {cfg.data.name}"


def run(cfg, handle, experiment: str = EXPERIMENT) -> dict:
    return common.run(cfg, handle, experiment, trials(cfg), title(cfg), cfg.sweep.baseline)


def main(argv: list[str] | None = None) -> int:
    return common.main(__doc__, EXPERIMENT, trials, title, argv, compare_phase1=lambda cfg: cfg.sweep.baseline)


if __name__ == "__main__":
    sys.exit(main())
