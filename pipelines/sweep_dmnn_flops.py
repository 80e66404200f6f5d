"""DMNN FLOPs sweep (DMNN paper, Tables 1-3): one Ray Tune trial per target rate t (the execution
and FLOPs target of the resource loss) and resource-loss weight lambda, plus the dense baseline
(the same ResNet with one sub-block per block and no controllers: the unmodified network), each
trained by Ray Train, then evaluated: accuracy against mean executed MACs, in one figure and table.

Laptop (digits, CPU, the small DMNN ResNet, 12 epochs; a few minutes on 2 cores):
    python -m pipelines.sweep_dmnn_flops
Knobs: sweep.values=[0.3,0.5,0.7] (target rates), lambdas=[0.5,2] (resource-loss weights; default:
dmnn.resource_weight), sweep.baseline=false, sweep.repeats=3, and every training key (see --help).
Cluster (a running Ray head; see README "Clusters"):
    ray job submit --working-dir . -- python -m pipelines.sweep_dmnn_flops \\
        preset=dmnn-resnet50 dataset=cifar100 data.root=/data/cifar100 epochs=200 batch_size=256 \\
        optim.milestones=[0.5,0.75] run.use_gpu=true sweep.max_concurrent=4
"""

from __future__ import annotations

import sys

from dynlab import pipeline, sweeps
from dynlab.config import split_list
from dynlab.errors import ConfigError

EXPERIMENT = "sweep_dmnn_flops"
TARGET = "dmnn.target_rate"
WEIGHT = "dmnn.resource_weight"
DEFAULT_TARGETS = [0.3, 0.5, 0.7]

def baseline(cfg) -> dict:
    """The unmodified network: one sub-block per block (the original block) and no controllers."""
    return {f"{cfg.backbone}.gated": False, f"{cfg.backbone}.subblocks": 1}

# unless the command line says otherwise; gated training converges slower than dense (every step
# drops sub-blocks at random), so the laptop default trains 12 epochs instead of the platform's 4
DEFAULTS = {"method": "dmnn", "preset": "dmnn-resnet-small", "epochs": 12}
ALIASES = {"epochs": "run.epochs"}


def parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in split_list("lambdas", text)]
    except (TypeError, ValueError):
        raise ConfigError("lambdas", text, "a list of non-negative numbers, e.g. [0.5,2]") from None
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ConfigError("lambdas", text, "a non-empty list of distinct non-negative numbers, e.g. [0.5,2]")
    return values


def make_trials(lambdas: list[float] | None):
    def trials(cfg) -> list[sweeps.Trial]:
        grid = {TARGET: list(cfg.sweep.values) or DEFAULT_TARGETS}
        if lambdas:
            grid[WEIGHT] = lambdas
        return sweeps.expand(cfg, grid=grid, extra=[baseline(cfg)] if cfg.sweep.baseline else [])

    return trials


def title(cfg) -> str:
    return f"DMNN accuracy vs executed MACs on {cfg.backbone} / {cfg.data.name}"


def with_defaults(argv: list[str]) -> tuple[list[str], list[float] | None]:
    """The method and preset defaults (unless given), and the ``lambdas=`` argument taken out."""
    keys = {a.split("=", 1)[0] for a in argv if "=" in a}
    lambdas = None
    rest = []
    for a in argv:
        if a.startswith("lambdas="):
            lambdas = parse_lambdas(a.split("=", 1)[1])
        else:
            rest.append(a)
    given = keys & {"method", "preset", "backbone", "config"}
    skip = {k for k in DEFAULTS if k in keys or ALIASES.get(k) in keys or "config" in keys}
    if given & {"backbone", "config"}:
        skip.add("preset")
    defaults = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in skip]
    return defaults + rest, lambdas


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args, lambdas = with_defaults(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return pipeline.main(__doc__, EXPERIMENT, make_trials(lambdas), title, args)


if __name__ == "__main__":
    sys.exit(main())
