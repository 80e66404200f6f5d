"""Per-exit cumulative cost of a backbone, measured with the convention of ``dynlab.costs``.

    python -m pipelines.costs preset=msdnet-cifar100-b7
    python -m pipelines.costs preset=msdnet-imagenet-s4 --json
    python -m pipelines.costs backbone=msdnet msdnet.n_blocks=3 dataset=cifar10
    python -m pipelines.costs preset=adn-mobilenetv2 convention=adn-paper
    python -m pipelines.costs --list

Keys: ``preset=``, ``backbone=``, ``dataset=`` (or ``data.name=``; classes and input size from
``dynlab.data.static_info``; default: the preset's dataset, else digits), ``image_size=`` (or
``data.image_size=``; 0 = dataset default), ``convention=`` and ``<backbone>.<field>=`` overrides of
the config.

``convention=reference`` (default): the early-exit references' counter (convs, linears, ReLU,
pooling; ``dynlab.costs``). ``convention=adn-paper``: the ADN paper's counter, which also counts
normalisation layers (2 ops per output element); the table's title line says so. ``--json`` always
carries a ``convention`` field.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import methods  # noqa: F401  (fills the registries)
from dynlab import registry
from dynlab.config import build_section, parse_overrides
from dynlab import costs
from dynlab.costs import CostTable
from dynlab.data import static_info
from dynlab.errors import ConfigError, DynlabError

USAGE = __doc__


def build(overrides: dict[str, Any]):
    """(preset name, backbone name, backbone config, DatasetInfo, model) from ``key=value`` overrides."""
    values = dict(overrides)
    preset_name = str(values.pop("preset", "") or "")
    dataset = values.pop("dataset", None)
    dataset = values.pop("data.name", dataset)
    image_size = values.pop("image_size", 0)
    image_size = values.pop("data.image_size", image_size)
    backbone = values.pop("backbone", None)

    base: dict[str, Any] = {}
    if preset_name:
        preset = registry.get_preset(preset_name)
        if backbone is not None and backbone != preset.backbone:
            raise ConfigError("backbone", backbone, f"'{preset.backbone}' (the backbone of preset '{preset_name}'), or drop one of them")
        backbone = preset.backbone
        base = dict(preset.values)
        dataset = dataset or preset.dataset
    backbone = str(backbone or "msdnet")
    entry = registry.get_backbone(backbone)
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head != backbone or not rest:
            raise ConfigError(key, value, f"a known key: preset, backbone, dataset, image_size, convention, {backbone}.<field>")
        base[rest] = value
    cfg = build_section(backbone, entry.config_cls, base)

    info = static_info(str(dataset or "digits"))
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 0:
        raise ConfigError("image_size", image_size, "a non-negative integer (0 = dataset default)")
    if image_size:
        info = dataclasses.replace(info, image_size=image_size)
    model = entry.build(cfg, info)
    return preset_name, backbone, cfg, info, model


def report(preset_name: str, backbone: str, cfg, info, table: CostTable, convention: str = "reference") -> dict[str, Any]:
    return {
        "preset": preset_name,
        "convention": convention,
        "backbone": backbone,
        "dataset": info.name,
        "input": [1, info.channels, info.image_size, info.image_size],
        "config": dataclasses.asdict(cfg),
        "exits": [
            {"exit": k, "name": name, "macs": float(m), "mmacs": float(m) / 1e6, "params": int(p), "mparams": int(p) / 1e6}
            for k, (name, m, p) in enumerate(zip(table.names, table.macs, table.params))
        ],
    }


def _what_rows_are(names: list[str]) -> str:
    """What a cost table's rows mean, from the names the model gives them."""
    if names and names[-1] == "dense total":
        return "per part: fixed, each sub-block, each controller; dense total = fixed + every sub-block; executed = fixed + open sub-blocks + controllers"
    if names and all(n and set(n) <= {"F", "T"} for n in names):
        return "per sub-network, one letter per stage: F = whole stage, T = its skippable part skipped"
    return "cumulative per exit"


def format_table(rep: dict[str, Any]) -> str:
    title = rep["preset"] or rep["backbone"]
    names = [row["name"] for row in rep["exits"]]
    conv = rep.get("convention", "reference")
    note = "" if conv == "reference" else f"; convention {conv}: {costs.CONVENTIONS[conv]}"
    lines = [f"{title}  ({rep['dataset']}, input {'x'.join(map(str, rep['input']))}; {_what_rows_are(names)}{note})"]
    width = max([4, *(len(n) for n in names)])
    lines.append(f"{'row':>4}  {'name':<{width}}  {'MMACs':>10}  {'params (M)':>10}")
    for row in rep["exits"]:
        lines.append(f"{row['exit']:>4}  {row['name']:<{width}}  {row['mmacs']:>10.2f}  {row['mparams']:>10.3f}")
    return "\n".join(lines)


def list_presets() -> str:
    width = max((len(n) for n in registry.PRESETS), default=0)
    return "\n".join(f"{p.name:<{width}}  {p.backbone:<8} {p.dataset:<9} {p.description}" for p in registry.PRESETS.values())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    if "--list" in argv:
        print(list_presets())
        return 0
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    try:
        unknown = [a for a in args if a.startswith("-")]
        if unknown:
            raise ConfigError(unknown[0], unknown[0], "--json, --list, --help or key=value")
        overrides = parse_overrides(args)
        convention = overrides.pop("convention", "reference")
        if convention not in costs.CONVENTIONS:
            raise ConfigError("convention", convention, f"one of {', '.join(costs.CONVENTIONS)}")
        # models measure themselves at build or on first use of cost_table: both inside the block
        with costs.convention(convention):
            preset_name, backbone, cfg, info, model = build(overrides)
            table = getattr(model, "cost_table", None)
        if table is None:
            raise ConfigError("backbone", backbone, "a backbone whose model measures its exit costs (cost_table)")
    except DynlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rep = report(preset_name, backbone, cfg, info, table, convention)
    print(json.dumps(rep, indent=2) if as_json else format_table(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
