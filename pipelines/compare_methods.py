"""Every method on one dataset, in one cost-accuracy figure and table: BoostNet, joint training and
IMTA on the same MSDNet (anytime exits and budgeted curves), DMNN (its operating point: mean
executed cost and accuracy) and ADN (its sub-networks), each over several seeds with its noise.

    python -m pipelines.compare_methods                    # digits, CPU, 2 seeds: see README for the time on 2 cores
    python -m pipelines.compare_methods sweep.repeats=3 epochs=30
    python -m pipelines.compare_methods dataset=imagefolder data.root=../shared/datasets/cifar10-jpg.zip data.train_subset=6000

Rows: ``BoostNet`` (t = 0.5) and ``joint`` on the default MSDNet; ``IMTA``: phase I with gradient
equilibrium, then phase II with ISC and OFA on its weights (``imta.phase2_epochs``, default 0.6 x
epochs; phase I is trained for it and not compared itself); ``DMNN`` on the small DMNN ResNet at
``dmnn.target_rate`` (default 0.5), 30 epochs unless ``epochs=`` is given (its gates need them);
``ADN`` on the small ADN ResNet, every sub-network evaluated.
Each method's networks are the platform's small defaults for the dataset, not equal in cost: the
figure puts each where it sits on the cost axis. Any training key applies to every row
(``epochs=``, ``data.*``, ``optim.*``); a method's own keys (``boostnet.temperature=``, ...) to its row.
The early-exit rows share their budgets (``eval.num_budgets`` inside the MSDNet's cost range).
"""

from __future__ import annotations

import sys

from dynlab import cli, pipeline, sweeps
from pipelines import imta_common

EXPERIMENT = "compare_methods"
DEFAULT_EPOCHS = 12  # on digits the early-exit networks reach 99 % and ADN's sub-networks separate
# with the default epochs, DMNN trains as sweep_dmnn_flops does on digits: its gates open for a
# warm-up, then learn to route, and at 12 epochs it is still at about 50 % (measured)
DMNN_DEFAULT_EPOCHS = 30
DEFAULT_REPEATS = 2
ROWS = {  # label -> the keys that make it, on top of the command line's
    "BoostNet": {"method": "boostnet", "backbone": "msdnet"},
    "joint": {"method": "joint", "backbone": "msdnet"},
    "DMNN": {"method": "dmnn", "backbone": "dmnn_resnet", "preset": "dmnn-resnet-small", "eval.budgets": []},  # the ADN and DMNN rows have no thresholds to calibrate
    "ADN": {"method": "adn", "backbone": "adn_resnet", "eval.budgets": []},
}


def _own(keys: dict, given: dict) -> dict:
    """``keys`` plus the command line's keys of that row's method and backbone (``boostnet.temperature=``, ``adn_resnet.width=``)."""
    mine = (f"{keys['method']}.", f"{keys['backbone']}.")
    return {**{k: v for k, v in given.items() if k.startswith(mine)}, **keys}


def split_args(argv: list[str]) -> tuple[list[str], dict]:
    """(the keys every row shares, for the base config; every method and backbone key, for the
    rows they belong to): the base config is BoostNet's and would refuse ``adn.*``."""
    from dynlab import config, registry

    __import__("methods")
    own = set(registry.METHODS) | set(registry.BACKBONES)
    given = config.normalize_keys(config.parse_overrides([a for a in argv if "=" in a]))
    shared = [a for a in argv if a.split("=", 1)[0].split(".")[0] not in own and a.split("=", 1)[0] not in ("method", "backbone", "preset")]
    return shared, {k: v for k, v in given.items() if k.split(".")[0] in own}


def trials(cfg, given: dict | None = None) -> list[sweeps.Trial]:
    """Every row, once per seed; IMTA's phase II points at its phase-I trial of the same seed."""
    given = given or {}
    imta_cfg = cfg.with_overrides(_own({"method": "imta", "backbone": "msdnet", "optim.nesterov": True}, given))
    budgets = imta_common.shared_budgets(imta_cfg).eval.budgets  # the MSDNet's range: the three early-exit rows share their budgets
    out = []
    for seed, suffix in imta_common.seeds(cfg):
        for label, keys in ROWS.items():
            row = {"eval.budgets": budgets, **_own(keys, given), **seed}
            if label == "DMNN" and cfg.run.epochs == DEFAULT_EPOCHS:
                row["run.epochs"] = DMNN_DEFAULT_EPOCHS
            out.append(imta_common.make_trial(cfg, f"{label}{suffix}", label, row))
        base = imta_cfg.with_overrides({"eval.budgets": budgets, **seed})
        first = imta_common.make_trial(base, f"IMTA-phase1{suffix}", "IMTA phase I", imta_common.phase1_overrides(base, {}))
        second = imta_common.make_trial(base, f"IMTA{suffix}", "IMTA", imta_common.phase2_overrides(base, first, {"imta.isc": True, "imta.ofa": True}))
        out += [first, second]
    return out


def stages(every: list[sweeps.Trial]) -> list[pipeline.Stage]:
    """The compared rows and IMTA's phase I (trained, not compared), then IMTA's phase II."""
    phase1 = [t for t in every if t.label == "IMTA phase I"]
    return [
        pipeline.Stage("methods", [t for t in every if t.label not in ("IMTA", "IMTA phase I")]),
        pipeline.Stage("imta-phase1", phase1, compare=False),
        pipeline.Stage("imta-phase2", [t for t in every if t.label == "IMTA"], after="imta-phase1"),
    ]


def with_defaults(argv: list[str]) -> list[str]:
    keys = {a.split("=", 1)[0] for a in argv if "=" in a}
    out = [] if keys & {"epochs", "run.epochs", "config"} else [f"run.epochs={DEFAULT_EPOCHS}"]
    out += [] if keys & {"sweep.repeats", "config"} else [f"sweep.repeats={DEFAULT_REPEATS}"]
    return [*out, *argv]


def main(argv: list[str] | None = None) -> int:
    argv, given = split_args(with_defaults(list(sys.argv[1:] if argv is None else argv)))

    def body(cfg, handle, name):
        every = trials(cfg, given)
        return pipeline.run(cfg, stages(every), handle, EXPERIMENT, f"Every method on {cfg.data.name} ({cfg.run.epochs} epochs, {cfg.sweep.repeats} seed(s))")

    def plan(cfg):
        every = trials(cfg, given)
        return imta_common.plan(cfg, [t for t in every if t.label.startswith("IMTA")]) + [t.cfg() for t in every if not t.label.startswith("IMTA")]

    return cli.main(__doc__, argv, body, default_experiment=EXPERIMENT, plan=plan)


if __name__ == "__main__":
    sys.exit(main())
