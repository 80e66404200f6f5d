"""ADN distillation sweep: Ray Tune over the distillation weight lambda (``adn.kd_lambda``) and the
temperature T (``adn.temperature``), a grid of both, each trial trained by Ray Train; every
sub-network evaluated, compared in one accuracy-vs-cost figure, best sub-network per budget printed.

Laptop (digits, small ADN ResNet, CPU, 15 epochs unless epochs= is given; about 2.5 minutes on 2 cores):
    python -m pipelines.sweep_adn
    python -m pipelines.sweep_adn sweep.values=[0.5,1,2]          # lambda grid (T keeps its default grid)
Grid: lambda from sweep.values (default 0.5, 1, 2) times T in TEMPERATURES (1 and 4): 6 trials.
Knobs: sweep.asha=true stops weak trials early, sweep.repeats=3 adds seeds, adn.topk, adn.subnets,
eval.budgets=[...] (MMACs), and every training key (see --help).
"""

from __future__ import annotations

import sys

from dynlab import sweeps
from pipelines import adn_common

EXPERIMENT = "sweep_adn"
LAMBDAS = [0.5, 1.0, 2.0]
TEMPERATURES = [1.0, 4.0]


def trials(cfg) -> list[sweeps.Trial]:
    return sweeps.expand(cfg, grid={"adn.kd_lambda": list(cfg.sweep.values) or LAMBDAS, "adn.temperature": TEMPERATURES})


def title(cfg) -> str:
    return f"ADN lambda x T on {cfg.backbone} / {cfg.data.name}"


def main(argv: list[str] | None = None) -> int:
    return adn_common.main(__doc__, EXPERIMENT, trials, title, argv)


if __name__ == "__main__":
    sys.exit(main())
