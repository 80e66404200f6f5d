"""Measured latency of every ADN sub-network beside its MACs and parameters (dynlab.subnets.latency:
median of interleaved rounds, after a warm-up round; zero input of the preset's size, eval mode).

    python -m pipelines.adn_latency preset=adn-resnet50
    python -m pipelines.adn_latency preset=adn-resnet50 batch=8 repeats=10 subnets=TTTT,FFFF --json
    python -m pipelines.adn_latency preset=adn-resnet50 device=cuda

Keys: the ones of ``pipelines.costs`` (preset, backbone, dataset, image_size, <backbone>.<field>),
plus batch (default 1), repeats (5), warmup (1), subnets (default all), threads (torch CPU threads;
0 = torch's default), device (cpu or cuda).
"""

from __future__ import annotations

import json
import sys

import torch

import methods  # noqa: F401  (fills the registries)
from dynlab.config import parse_overrides
from dynlab.errors import ConfigError, DynlabError
from methods.adn import subnet_latency
from pipelines import costs as costs_cli

OWN = {"batch": 1, "repeats": 5, "warmup": 1, "subnets": "", "threads": 0, "device": "cpu"}


def _own(values: dict) -> dict:
    out = {k: values.pop(k, v) for k, v in OWN.items()}
    for k in ("batch", "repeats", "threads", "warmup"):
        lo = 1 if k in ("batch", "repeats") else 0
        if not isinstance(out[k], int) or isinstance(out[k], bool) or out[k] < lo:
            raise ConfigError(k, out[k], f"an integer >= {lo}")
    if out["device"] not in ("cpu", "cuda") or (out["device"] == "cuda" and not torch.cuda.is_available()):
        raise ConfigError("device", out["device"], "cpu, or cuda on a machine with a GPU")
    subnets = out["subnets"]
    out["subnets"] = [str(s) for s in subnets] if isinstance(subnets, list) else [s for s in str(subnets or "").split(",") if s]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    as_json = "--json" in argv
    try:
        values = parse_overrides([a for a in argv if a != "--json"])
        own = _own(values)
        preset, backbone, _, info, model = costs_cli.build(values)
        if not hasattr(model, "num_stages") or not hasattr(model, "cost_table"):
            raise ConfigError("backbone", backbone, "an ADN backbone (adn_resnet, adn_mobilenetv2, adn_vit, adn_swin)")
        table = model.cost_table
        names = own["subnets"] or list(table.names)
        bad = [n for n in names if n not in table.names]
        if bad:
            raise ConfigError("subnets", ",".join(names), f"names from {table.names[0]} ... {table.names[-1]}")
    except DynlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if own["threads"]:
        torch.set_num_threads(own["threads"])
    model.to(own["device"])
    frame = subnet_latency(model, names, batch=own["batch"], repeats=own["repeats"], warmup=own["warmup"])
    frame["params"] = [table.params[table.names.index(n)] for n in names]
    if as_json:
        print(json.dumps({"preset": preset, "backbone": backbone, "device": own["device"], "batch": own["batch"], "threads": torch.get_num_threads(), "rows": frame.to_dict("records")}, indent=2))
        return 0
    print(f"{preset or backbone}  ({info.name}, batch {own['batch']}, {own['device']}, {torch.get_num_threads()} threads; median of {own['repeats']})")
    print(f"{'subnet':>8}  {'MMACs':>10}  {'params (M)':>10}  {'latency ms':>10}")
    for r in frame.to_dict("records"):
        print(f"{r['name']:>8}  {r['macs'] / 1e6:>10.2f}  {r['params'] / 1e6:>10.3f}  {r['latency_s'] * 1e3:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
