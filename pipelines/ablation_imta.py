"""IMTA ablation (IMTA paper, Table 2): six rows on one backbone, each trained by Ray Train inside a
Ray Tune trial, then calibrated, evaluated (anytime and budgeted batch) and compared in one figure
and table, like the temperature ablation; then each technique's effect against the rows it is to be
compared with (``report/effects.csv``, printed at the end).

    none        phase I without gradient equilibrium (plain MSDNet / RANet joint training)
    GE          phase I with gradient equilibrium                          (for: GE vs none)
    ISC         phase II with ISC only, on the "none" phase I              (for: ISC vs none, vs control)
    OFA         phase II with OFA only, on the "none" phase I              (for: OFA vs none, vs control)
    all         phase II with ISC and OFA, on the "GE" phase I             (the full method: vs none, vs control)
    control     phase II with neither (the same new classifiers, epochs and schedule, plain CE), on
                the "none" phase I: the paper compares its ISC and OFA rows with "none", which had no
                phase II, so a gain there may be the extra training; against the control it is not

Phase I is shared as the paper does: the phase-II rows start from the phase-I rows' published
weights (``run.init_from`` = ``<cache>/train/<phase-I train hash>``), so ISC and OFA reuse one
training of "none", and phase-II knobs (imta.alpha, imta.temperature, imta.isc_detach, imta.freeze,
...) are left out of the phase-I configs: changing them never retrains phase I. The pipeline
declares two training stages (see ``pipelines.imta_common``): ``sweep[phase1]`` trains the phase-I
rows, ``sweep[phase2]`` runs after it, then every row is predicted, calibrated, evaluated and
compared. Phase II trains for ``imta.phase2_epochs`` epochs (default ``round(0.6 * run.epochs)``,
the paper's 180 after 300) with the same optimiser settings (milestones are fractions: 90/135 of 180).
The phase-II rows' own configs are checked when they start (their phase-I weights do not exist
before); everything the config alone reveals (alpha, T, ...) fails before anything starts.

Laptop (digits, CPU, local Ray and MLflow; a few minutes on 2 cores):
    python -m pipelines.ablation_imta
Cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.ablation_imta \\
        preset=msdnet-cifar100-lingrow5 dataset=cifar100 data.root=/mnt/efs/dynlab/data/cifar100 epochs=300 batch_size=64 \\
        optim.nesterov=true run.use_gpu=true run.wait_for_resources=true sweep.max_concurrent=5
Knobs: imta.alpha, imta.temperature, imta.kl_reduction, imta.isc_detach, imta.freeze,
imta.classifier_init (phase II); imta.gradient_rescale=true (the reference's GE form, MSDNet only)
for the GE rows; backbone=ranet; sweep.repeats=3; and every training key (see --help).
"""

from __future__ import annotations

import sys

from dynlab import sweeps
from dynlab.reproduce import Claim
from pipelines import imta_common as common

EXPERIMENT = "ablation_imta"
ROWS = {  # id -> (label: the row and what it is compared with, the phase-I row it starts from or None, overrides)
    "none": ("none (baseline)", None, {"imta.gradient_equilibrium": False, "imta.gradient_rescale": False}),
    "GE": ("GE (vs none)", None, {}),
    "ISC": ("ISC (vs none, control)", "none", {"imta.isc": True, "imta.ofa": False}),
    "OFA": ("OFA (vs none, control)", "none", {"imta.isc": False, "imta.ofa": True}),
    "all": ("GE+ISC+OFA (vs none, control)", "GE", {"imta.isc": True, "imta.ofa": True}),
    "control": ("control: phase II, plain CE", "none", {"imta.isc": False, "imta.ofa": False}),
}


def _effect(row: str, against: str, why: str) -> Claim:
    return Claim(f"{ROWS[row][0].split(' (')[0].split(':')[0]} >= {ROWS[against][0].split(' (')[0].split(':')[0]} at every exit", "", ROWS[row][0], ROWS[against][0], source=why)


# each technique against the paper's comparison (none) and against the phase-II control
EFFECTS = [
    _effect("GE", "none", "Table 2, line 2 vs line 1"),
    _effect("ISC", "none", "Table 2, line 3 vs line 1 (the paper's comparison: ISC had a phase II, none did not)"),
    _effect("ISC", "control", "ISC alone: the same phase II without it"),
    _effect("OFA", "none", "Table 2, line 4 vs line 1 (the paper's comparison)"),
    _effect("OFA", "control", "OFA alone: the same phase II without it"),
    _effect("all", "none", "Table 2, line 5 vs line 1"),
    _effect("all", "control", "the full method against the phase-II control (which has no GE)"),
    _effect("control", "none", "what the extra phase-II training alone gives"),
]


def trials(cfg) -> list[sweeps.Trial]:
    """All six rows, one per seed; phase-II rows point at their phase-I row's cache entry."""
    common.check_imta(cfg)
    cfg = common.shared_budgets(cfg)
    out = []
    for seed, suffix in common.seeds(cfg):
        first: dict[str, sweeps.Trial] = {}
        for tid, (label, start, row) in ROWS.items():
            if start is None:
                t = first[tid] = common.make_trial(cfg, tid + suffix, label, {**common.phase1_overrides(cfg, row), **seed})
            else:
                t = common.make_trial(cfg, tid + suffix, label, {**common.phase2_overrides(cfg, first[start], row), **seed})
            out.append(t)
    return out


def phase1_trials(cfg) -> list[sweeps.Trial]:
    """The phase-I rows (none, GE), one per seed."""
    return [t for t in trials(cfg) if common.is_phase1(t)]


def title(cfg) -> str:
    return f"IMTA ablation on {cfg.backbone} / {cfg.data.name}"


def run(cfg, handle, experiment: str = EXPERIMENT) -> dict:
    return common.run(cfg, handle, experiment, trials(cfg), title(cfg), effects=EFFECTS)


def main(argv: list[str] | None = None) -> int:
    return common.main(__doc__, EXPERIMENT, trials, title, argv, effects=EFFECTS)


if __name__ == "__main__":
    sys.exit(main())
