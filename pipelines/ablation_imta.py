"""IMTA ablation (IMTA paper, Table 2): five rows on one backbone, each trained by Ray Train inside a
Ray Tune trial, then calibrated, evaluated (anytime and budgeted batch) and compared in one figure
and table, like the temperature ablation.

    none        phase I without gradient equilibrium (plain MSDNet / RANet joint training)
    GE          phase I with gradient equilibrium
    ISC         phase II with ISC only, on the "none" phase I
    OFA         phase II with OFA only, on the "none" phase I
    all         phase II with ISC and OFA, on the "GE" phase I (the full method; label GE+ISC+OFA)

Phase I is shared as the paper does: the phase-II rows start from the phase-I rows' published
weights (``run.init_from`` = ``<cache>/train/<phase-I train hash>``), so ISC and OFA reuse one
training of "none", and phase-II knobs (imta.alpha, imta.temperature, imta.isc_detach, imta.freeze,
...) are left out of the phase-I configs: changing them never retrains phase I. Until the pipeline
layer chains training stages itself, this module runs two sweeps in one MLflow run: first the
phase-I rows (cached by their train hash), then the whole five-row pipeline, in which the phase-I
rows are found in the cache. Phase II trains for ``round(0.6 * run.epochs)`` epochs (the paper's
180 after 300) with the same optimiser settings (milestones are fractions: 90/135 of 180).
The phase-II rows' own configs are checked when they start (their phase-I weights do not exist
before); everything the config alone reveals (alpha, T, ...) fails before anything starts.

Laptop (digits, CPU, local Ray and MLflow; a few minutes on 2 cores):
    python -m pipelines.ablation_imta
Cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.ablation_imta \\
        preset=msdnet-cifar100-lingrow5 dataset=cifar100 data.root=/data/cifar100 epochs=300 batch_size=64 \\
        optim.nesterov=true run.use_gpu=true sweep.max_concurrent=5
Knobs: imta.alpha, imta.temperature, imta.kl_reduction, imta.isc_detach, imta.freeze,
imta.classifier_init (phase II); imta.gradient_rescale=true (the reference's GE form, MSDNet only)
for the GE rows; backbone=ranet; sweep.repeats=3; and every training key (see --help).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dynlab import pipeline, sweeps
from dynlab.errors import ConfigError

EXPERIMENT = "ablation_imta"
PHASE2_EPOCHS = 0.6  # fraction of run.epochs (IMTA: 180 phase-II epochs after 300 of phase I)
# phase-II knobs reset to their defaults in phase-I configs, so that they never change its hash
PHASE2_KNOBS = ("isc_detach", "alpha", "temperature", "kl_reduction", "freeze", "classifier_init")
ROWS = {  # id -> (label, the phase-I row it starts from or None, overrides)
    "none": ("none", None, {"imta.gradient_equilibrium": False, "imta.gradient_rescale": False}),
    "GE": ("GE", None, {}),
    "ISC": ("ISC", "none", {"imta.isc": True, "imta.ofa": False}),
    "OFA": ("OFA", "none", {"imta.isc": False, "imta.ofa": True}),
    "all": ("GE+ISC+OFA", "GE", {"imta.isc": True, "imta.ofa": True}),
}
GE_KEYS = ("imta.gradient_equilibrium", "imta.gradient_rescale")


def _check(cfg) -> None:
    if cfg.method != "imta":
        raise ConfigError("method", cfg.method, "imta (this pipeline trains IMTA's two phases)")


def _phase1_overrides(cfg, row: dict) -> dict:
    defaults = type(cfg.method_cfg)()
    out = {f"imta.{k}": getattr(defaults, k) for k in PHASE2_KNOBS}
    out.update({"imta.phase": 1, "imta.isc": False, "imta.ofa": False, "run.init_from": ""})
    if not (cfg.method_cfg.gradient_equilibrium or cfg.method_cfg.gradient_rescale):
        out["imta.gradient_equilibrium"] = True  # the GE row needs one form: the paper's by default
    out.update(row)
    return out


OFA_KNOBS, ISC_KNOBS = ("alpha", "temperature", "kl_reduction"), ("isc_detach",)


def _unused_at_default(cfg, row: dict) -> dict:
    """A row's knobs of a part it does not use (OFA's alpha on the ISC row, ...) at their defaults:
    changing them then changes (and retrains) only the rows that use them."""
    defaults = type(cfg.method_cfg)()
    unused = (OFA_KNOBS if not row.get("imta.ofa") else ()) + (ISC_KNOBS if not row.get("imta.isc") else ())
    return {f"imta.{k}": getattr(defaults, k) for k in unused}


def _trial(cfg, tid: str, label: str, overrides: dict) -> sweeps.Trial:
    c = cfg.with_overrides(overrides)
    return sweeps.Trial(tid, label, overrides, c.to_dict(), c.train_hash())


def phase1_trials(cfg) -> list[sweeps.Trial]:
    """The phase-I rows (none, GE), one per seed."""
    return [t for t in trials(cfg) if t.cfg().method_cfg.phase == 1]


def trials(cfg) -> list[sweeps.Trial]:
    """All five rows, one per seed; phase-II rows point at their phase-I row's cache entry."""
    _check(cfg)
    cache = sweeps.cache_root(cfg) / sweeps.TRAIN_CACHE
    out = []
    for r in range(cfg.sweep.repeats):
        seed = {"run.seed": cfg.run.seed + r} if cfg.sweep.repeats > 1 else {}
        suffix = f"-seed{cfg.run.seed + r}" if cfg.sweep.repeats > 1 else ""
        first: dict[str, sweeps.Trial] = {}
        for tid, (label, start, row) in ROWS.items():
            if start is None:
                t = _trial(cfg, tid + suffix, label, {**_phase1_overrides(cfg, row), **seed})
                first[tid] = t
            else:
                ge = {k: first[start].overrides.get(k, getattr(cfg.method_cfg, k.split(".")[1])) for k in GE_KEYS}  # as its phase I
                phase2 = {"imta.phase": 2, "run.epochs": max(1, round(PHASE2_EPOCHS * cfg.run.epochs)), "run.init_from": str(cache / first[start].train_key), **ge}
                t = _trial(cfg, tid + suffix, label, {**phase2, **_unused_at_default(cfg, row), **row, **seed})
            out.append(t)
    return out


def title(cfg) -> str:
    return f"IMTA ablation on {cfg.backbone} / {cfg.data.name}"


def run(cfg, handle, experiment: str = EXPERIMENT) -> dict:
    """Phase I first (a sweep of the phase-I rows, cached), then the five-row pipeline."""
    first = sweeps.run(cfg, phase1_trials(cfg), handle, experiment)
    failed = first.table[first.table["status"] != "ok"]
    if len(failed):  # phase II cannot start; the pipeline's table reports them with the rest
        print(f"[ablation] phase I did not finish for {', '.join(failed['trial'])}: their phase-II rows will fail", flush=True)
    out = pipeline.run(cfg, trials(cfg), handle, experiment, title(cfg))
    out["trained"] = sorted(set(first.trained) | set(out["trained"]))
    return out


def main(argv: list[str] | None = None) -> int:
    from dynlab import cli

    args = ["method=imta", *(sys.argv[1:] if argv is None else argv)]

    def plan(cfg):  # every row's config is resolved; phase-I rows (and cached ones' successors) fully checked
        rows = trials(cfg)
        done = {t.train_key for t in rows if sweeps.cached_training(sweeps.cache_root(cfg), t.train_key)}
        return [t.cfg() for t in rows if t.cfg().method_cfg.phase == 1 or Path(t.cfg().run.init_from).name in done]

    return cli.main(__doc__, args, lambda cfg, handle, name: run(cfg, handle), default_experiment=EXPERIMENT, plan=plan)


if __name__ == "__main__":
    sys.exit(main())
