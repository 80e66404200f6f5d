"""What IMTA's pipelines share: phase-I and phase-II trial configs, and running the two phases.

A two-phase pipeline declares two training stages (:class:`dynlab.pipeline.Stage`): ``phase1``,
whose trials publish their weights to the train cache under their train hash, and ``phase2``, run
after it, whose trials start from ``run.init_from = <cache>/train/<their phase-I train hash>``
(a phase-II trial whose phase I did not finish is reported failed, not started). Knobs a trial does not use (phase-II
knobs in phase I, OFA's on a row without OFA, ...) are set to their defaults in its config, so that
changing them never retrains it (phase I is trained once per phase-I config).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from dynlab import pipeline, sweeps
from dynlab.errors import ConfigError

PHASE2_EPOCHS = 0.6  # fraction of run.epochs (IMTA: 180 phase-II epochs after 300 of phase I)
OFA_KNOBS, ISC_KNOBS = ("alpha", "temperature", "kl_reduction", "ofa_teacher", "kd_t2"), ("isc_detach",)
PHASE2_KNOBS = (*OFA_KNOBS, *ISC_KNOBS, "freeze", "classifier_init", "phase2_epochs")
GE_KEYS = ("imta.gradient_equilibrium", "imta.gradient_rescale")


def check_imta(cfg) -> None:
    if cfg.method != "imta":
        raise ConfigError("method", cfg.method, "imta (this pipeline trains IMTA's two phases)")


def _defaults(cfg, names) -> dict:
    defaults = type(cfg.method_cfg)()
    return {f"imta.{k}": getattr(defaults, k) for k in names}


def phase1_overrides(cfg, row: dict) -> dict:
    """A phase-I trial: phase-II knobs at their defaults; GE on (the paper's form unless the base
    config asks for the reference's), then ``row``."""
    out = {**_defaults(cfg, PHASE2_KNOBS), "imta.phase": 1, "imta.isc": False, "imta.ofa": False, "run.init_from": ""}
    if not (cfg.method_cfg.gradient_equilibrium or cfg.method_cfg.gradient_rescale):
        out["imta.gradient_equilibrium"] = True
    return {**out, **row}


def phase2_overrides(cfg, start: sweeps.Trial, row: dict) -> dict:
    """A phase-II trial on phase-I trial ``start``: its GE settings, ``imta.phase2_epochs`` (default
    0.6 of run.epochs), the unused part's knobs at their defaults, then ``row``."""
    ge = {k: start.overrides.get(k, getattr(cfg.method_cfg, k.split(".")[1])) for k in GE_KEYS}
    unused = (OFA_KNOBS if not row.get("imta.ofa") else ()) + (ISC_KNOBS if not row.get("imta.isc") else ())
    init = str(sweeps.cache_root(cfg) / sweeps.TRAIN_CACHE / start.train_key)
    epochs = cfg.method_cfg.phase2_epochs or max(1, round(PHASE2_EPOCHS * cfg.run.epochs))
    return {"imta.phase": 2, "run.epochs": epochs, "run.init_from": init, **ge, **_defaults(cfg, unused), **row}


def shared_budgets(cfg, info=None):
    """``cfg`` with explicit eval.budgets when none are given: ``eval.num_budgets`` evenly inside the
    phase-I network's cost range, which every row's range contains (ISC makes later exits a little
    dearer). Each trial's own default budgets would differ, and the comparison table would then have
    a column per trial instead of one per budget. ``info``: the dataset's shape, when it is known
    without reading the data."""
    if cfg.eval.budgets or cfg.eval.num_budgets == 0:
        return cfg
    from dynlab import data, registry, steps
    import torch

    probe = cfg.with_overrides(phase1_overrides(cfg, {}))
    model = registry.get_method("imta").cls(probe).build_model(info or data.dataset_info(probe.data))
    budgets = steps.default_budgets(torch.tensor(model.cost_table.macs), cfg.eval.num_budgets)
    return cfg.with_overrides({"eval.budgets": [round(b / 1e6, 6) for b in budgets]})


def make_trial(cfg, tid: str, label: str, overrides: dict) -> sweeps.Trial:
    c = cfg.with_overrides(overrides)
    return sweeps.Trial(tid, label, overrides, c.to_dict(), c.train_hash())


def seeds(cfg) -> list[tuple[dict, str]]:
    """``(seed override, id suffix)`` per repeat, as :func:`dynlab.sweeps.expand` names them."""
    if cfg.sweep.repeats == 1:
        return [({}, "")]
    return [({"run.seed": cfg.run.seed + r}, f"-seed{cfg.run.seed + r}") for r in range(cfg.sweep.repeats)]


def is_phase1(t: sweeps.Trial) -> bool:
    return t.config["imta"]["phase"] == 1


def stages(trials: list[sweeps.Trial], compare_phase1: bool = True) -> list[pipeline.Stage]:
    """Phase I, then phase II from its weights (``compare_phase1=False``: phase I is trained for
    phase II, not evaluated or compared)."""
    return [
        pipeline.Stage("phase1", [t for t in trials if is_phase1(t)], compare=compare_phase1),
        pipeline.Stage("phase2", [t for t in trials if not is_phase1(t)], after="phase1"),
    ]


def run(cfg, handle, experiment: str, trials: list[sweeps.Trial], title: str, compare_phase1: bool = True, effects: list | None = None) -> dict:
    """The two stages, then (``effects``: :class:`dynlab.reproduce.Claim` s) each row's effect
    against the rows it is to be compared with, printed at the end and in ``report/effects.csv``."""
    import dataclasses

    from dynlab import dag, reproduce

    after = []
    if effects:
        step_cfg = {"parent": handle.as_payload(), "claims": [dataclasses.asdict(c) for c in effects]}
        after = [dag.Step("effects", reproduce.effects_step, config=step_cfg, inputs={"report": "report"}, where="driver", cache=False)]
    out = pipeline.run(cfg, stages(trials, compare_phase1), handle, experiment, title, after_report=after)
    if effects:
        out["epilogue"] = out["dag"]["effects"]["text"]
    return out


def plan(cfg, rows: list[sweeps.Trial]) -> list:
    """The configs the preflight checks fully: phase-I trials, and phase-II trials whose phase I is
    cached (the others' model is checked when they start: their phase-I weights do not exist yet)."""
    done = {t.train_key for t in rows if sweeps.cached_training(sweeps.cache_root(cfg), t.train_key)}
    return [t.cfg() for t in rows if is_phase1(t) or Path(t.config["run"]["init_from"]).name in done]


def main(doc: str, experiment: str, trials: Callable, title: Callable, argv: list[str] | None, compare_phase1: Callable = lambda cfg: True, effects: list | None = None) -> int:
    """The command line (``method=imta`` and the paper's Nesterov momentum implied; both can be
    overridden). Every trial's config is resolved before anything starts (bad input: one line,
    exit 2); see :func:`plan` for the rest of the checks."""
    from dynlab import cli

    args = ["method=imta", "optim.nesterov=true", *(sys.argv[1:] if argv is None else argv)]

    def body(cfg, handle, name):
        return run(cfg, handle, experiment, trials(cfg), title(cfg), compare_phase1(cfg), effects)

    return cli.main(doc, args, body, default_experiment=experiment, plan=lambda cfg: plan(cfg, trials(cfg)))


# ---- the reproduction's two stages (pipelines.reproduce_imta; see dynlab.reproduce.TwoStages)

_BUDGETS: dict[str, list[float]] = {}


def _budgets(cfg) -> dict:
    """``eval.budgets`` shared by every row of an experiment (see :func:`shared_budgets`), computed
    once per backbone and data (building the model is the cost)."""
    from dynlab import data, reproduce

    key = cfg.hash(exclude=("run", "optim", "sweep", "repro", "method", "imta"))
    if key not in _BUDGETS:
        kind = reproduce._dataset_kind(cfg)  # the plan reads no data (it may be on the cluster only)
        _BUDGETS[key] = shared_budgets(cfg, data.STATIC_INFO.get(kind)).eval.budgets
    return {"eval.budgets": _BUDGETS[key]}


def reproduce_first(cfg, row: dict) -> dict:
    """A reproduction row without a start: phase I (refused unless method=imta)."""
    check_imta(cfg)
    return {**phase1_overrides(cfg, row), **_budgets(cfg)}


def reproduce_second(cfg, start: sweeps.Trial, row: dict) -> dict:
    """A reproduction row that starts from row ``start``'s phase I: phase II on its weights."""
    check_imta(cfg)
    return {**phase2_overrides(cfg, start, row), **_budgets(cfg)}


def two_stages():
    from dynlab.reproduce import TwoStages

    return TwoStages(reproduce_first, reproduce_second, stages, plan)
