"""Train one method, then predict, calibrate and evaluate it; everything lands in one MLflow run.

    python -m pipelines.train                                   # BoostNet on a tiny MSDNet, digits, CPU
    python -m pipelines.train method=joint epochs=2
    python -m pipelines.train method=boostnet boostnet.temperature=0.25 preset=msdnet-cifar100-b7 \\
        dataset=cifar100 data.root=~/data/cifar100 epochs=300 run.use_gpu=true workers=4
    python -m pipelines.train config=my_run.yaml run.name=<name>  # resume a stopped run by its name

Keys are dotted config keys (see ``dynlab.config``); ``--help`` lists them with their defaults.
"""

from __future__ import annotations

import sys
from dynlab import cli, cluster, steps, training


def run(cfg, handle, name: str) -> dict:
    """The train -> predict -> evaluate -> log chain for one resolved config."""
    ray = cluster.ensure_ray()
    print(f"[dynlab] training {cfg.method} on {cfg.backbone} / {cfg.data.name} as '{name}' ({cfg.run.epochs} epochs, {cfg.run.num_workers} worker(s))", flush=True)
    result = training.fit(cfg, name, tracking=handle.as_payload())

    resources = {"num_cpus": 1, "num_gpus": 1 if cfg.run.use_gpu else 0}
    predict = ray.remote(**resources)(steps.predict)
    tables = ray.get(predict.remote(cfg, result.checkpoint_dir))
    ev = steps.evaluate(cfg, tables)
    figure = steps.log_evaluation(handle, cfg, tables, ev, result.checkpoint_dir)
    return {"cfg": cfg, "evaluation": ev, "figure": figure, "checkpoint": result.checkpoint_dir}


def main(argv: list[str] | None = None) -> int:
    return cli.main(__doc__, argv if argv is not None else sys.argv[1:], run, default_experiment="dynlab-train")


if __name__ == "__main__":
    sys.exit(main())
