"""Paper reproduction, the pattern every ``pipelines.reproduce_<paper>`` follows.

A reproduction pipeline declares, as data:

- :class:`Experiment` s: one per table or figure of the paper (a preset, a dataset, a schedule),
  each with the :class:`Row` s it compares (BoostNet, its baseline, an ablation's values);
- :class:`Scale` s: ``smoke`` (synthetic data, about a minute: what the tests run), ``laptop``
  (real data at a size a 2-core CPU finishes in under an hour with several seeds: the paper's
  directions, not its numbers) and ``paper`` (the paper's settings, for a GPU cluster). A scale is
  a set of default keys and the experiments it runs; every key given on the command line overrides
  the scale's and the experiments' values (not a row's: a row's keys are what it compares), and the
  report lists what was overridden;
- :class:`Claim` s: what the paper says, as "row A >= row B at these exits / budgets";
- the paper's numbers, in a YAML file beside the pipeline (tables with their source and unit,
  errata, the settings the paper states and those it leaves to the code).

:func:`main` is the command line: ``--plan`` prints the DAG, every trial's settings, resources and
compute without starting Ray; otherwise the shared sweep pipeline (:mod:`dynlab.pipeline`) trains,
calibrates and evaluates every trial, and :func:`reproduce_step` joins the paper's numbers with ours:
per-exit tables with the differences and their noise, figures, and one verdict per claim
(holds / reversed / within noise), written as Markdown into the parent MLflow run and printed short.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from dynlab import comparison, dag, pipeline, sweeps, tracking
from dynlab import config as config_mod
from dynlab.errors import ConfigError, DynlabError

# ------------------------------------------------------------------ declarations


@dataclass
class Row:
    """One compared recipe of an experiment: ``label`` (as the paper's table names it) and the keys
    that make it (``method=joint``, ``boostnet.temperature=1.0``, ...)."""

    label: str
    overrides: dict[str, Any]
    start: str = ""  # two-stage pipelines (TwoStages): the row of this experiment whose first-stage training this row starts from


@dataclass
class Experiment:
    """One table or figure of the paper. ``paper``: the key of the paper's table in the YAML that it
    reproduces (default: ``name``); a reduced-scale experiment names the paper's table it stands
    for, and the report shows that table beside ours as another dataset and scale."""

    name: str
    about: str
    overrides: dict[str, Any]
    rows: list[Row]
    paper: str = ""

    @property
    def table(self) -> str:
        return self.paper or self.name


@dataclass
class Scale:
    name: str
    about: str
    base: dict[str, Any]  # dotted keys under the command line's
    experiments: list[Experiment]


@dataclass
class Claim:
    """"``better`` >= ``worse``" in experiment ``experiment``, ``over`` its exits (anytime) or its
    budgets (budgeted batch), ``at`` every point, the first (cheapest) or the last (dearest).

    ``kind``: ``ge`` (that), ``matches`` (``better`` is not below ``worse`` beyond noise *and* costs
    less: a dynamic network against its dense original) or ``routes`` (``better``'s gates route by
    category: the widest difference of one gate's execution rate across categories, in every seed,
    is at least ``threshold``; ``worse`` is unused)."""

    name: str
    experiment: str
    better: str
    worse: str
    over: str = "exits"  # exits | budgets
    at: str = "all"  # all | first | last
    source: str = ""  # where the paper says it
    paper_says: str = ""  # the claims table's paper column where the paper's tables cannot fill it (a row the paper has not: a control)
    kind: str = "ge"  # ge | matches | routes
    threshold: float = 0.0  # routes: the least category spread

    @property
    def rows(self) -> tuple[str, ...]:
        return (self.better,) if self.kind == "routes" else (self.better, self.worse)


VERDICTS = ("holds", "within noise", "reversed", "not run")


@dataclass
class TwoStages:
    """How a pipeline trains in two stages (IMTA: phase I, then phase II from phase I's weights): a
    row without ``start`` is a first-stage trial, ``first(cfg, row's keys)`` -> its keys; a row with
    ``start`` a second-stage one, ``second(cfg, the trial of the same experiment and seed it starts
    from, row's keys)`` -> its keys (``cfg``: the experiment's config for that seed, without the
    row's keys, which the returned keys end with); ``stages(trials)`` -> the
    :class:`dynlab.pipeline.Stage` s to run; ``checked(cfg, trials)`` -> the configs the preflight
    checks (a second-stage trial's weights do not exist before its first stage has run)."""

    first: Callable[[config_mod.Config, dict], dict]
    second: Callable[[config_mod.Config, sweeps.Trial, dict], dict]
    stages: Callable[[list[sweeps.Trial]], list[pipeline.Stage]]
    checked: Callable[[config_mod.Config, list[sweeps.Trial]], list[config_mod.Config]]


def laptop_cifar10(train_subset: int, heldout: int = 2000) -> dict[str, Any]:
    """The keys every laptop scale shares: the CIFAR-10 copy in ../shared/datasets (``train_subset``
    training images, ``heldout`` held out, the full test set) and two trials at a time, one CPU
    each, on a 2-core machine."""
    return {"data.name": "imagefolder", "data.root": "../shared/datasets/cifar10-jpg.zip", "data.train_subset": train_subset, "data.heldout": heldout,
            "run.num_workers": 1, "run.cpus_per_worker": 1.0, "sweep.max_concurrent": 2}


def load_published(path: str | Path) -> dict:
    """The paper's numbers (see the pipeline's YAML): tables keyed by experiment name."""
    return yaml.safe_load(Path(path).read_text())


# ------------------------------------------------------------------ configs of the trials


def _section(key: str) -> str:
    return key.split(".", 1)[0] if "." in key else ""


def _applies(key: str, method: str, backbone: str) -> bool:
    """Whether a command-line key applies to a trial of this method and backbone (``boostnet.*``
    keys skip the baseline's joint rows instead of failing them)."""
    head = _section(key)
    return not head or head in config_mod.FIXED_SECTIONS or head in (method, backbone)


def _backbone_of(values: dict[str, Any]) -> str:
    from dynlab import registry

    if values.get("preset"):
        return registry.get_preset(str(values["preset"])).backbone
    return str(values.get("backbone", config_mod.Config.backbone))


def scale_of(user: dict[str, Any], scales: dict[str, Scale]) -> Scale:
    name = user.get("repro.scale", config_mod.ReproConfig.scale)
    if name not in scales:
        raise ConfigError("repro.scale", name, f"one of {', '.join(scales)} (scale=...)")
    return scales[name]


def defaults_of(scale: Scale) -> dict[str, Any]:
    return config_mod.normalize_keys({**scale.base, "repro.scale": scale.name})


def overridden(scale: Scale, user: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (the scale's or an experiment's value, the command line's)}`` where they differ."""
    theirs = dict(defaults_of(scale))
    for e in scale.experiments:
        for k, v in config_mod.normalize_keys(e.overrides).items():
            theirs.setdefault(k, v)
    return {k: (theirs[k], v) for k, v in user.items() if k in theirs and theirs[k] != v}


def experiments_of(cfg: config_mod.Config, scale: Scale) -> list[Experiment]:
    names = [e.name for e in scale.experiments]
    unknown = [n for n in cfg.repro.only if n not in names]
    if unknown:
        raise ConfigError("repro.only", cfg.repro.only, f"experiments of scale {scale.name}: {', '.join(names)}")
    return [e for e in scale.experiments if not cfg.repro.only or e.name in cfg.repro.only]


def trial_id(experiment: str, label: str) -> str:
    return f"{experiment}-{label}".replace(" ", "").replace("/", "-")


def _fill(value: Any, cfg: config_mod.Config) -> Any:
    """``"${repro.imagenet_root}"`` -> that key's value in the resolved base config (a scale names
    the dataset folders the user gives once, whatever experiment reads them)."""
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return cfg.flat()[value[2:-1]]
    return value


def claims_of(claims: list[Claim], experiments: list[Experiment]) -> list[Claim]:
    """The claims these experiments can answer (their experiment is run and has both rows)."""
    rows = {e.name: {r.label for r in e.rows} for e in experiments}
    return [c for c in claims if all(r in rows.get(c.experiment, ()) for r in c.rows)]


def make_trials(cfg: config_mod.Config, scale: Scale, user: dict[str, Any], two: TwoStages | None = None) -> list[sweeps.Trial]:
    """Every trial: the scale's keys < the experiment's < the command line's < the row's < the seed
    (``two``: see :func:`make_staged_trials`)."""
    if two is not None:
        return make_staged_trials(cfg, scale, user, two)
    out = []
    experiments = experiments_of(cfg, scale)
    sweeps.check_size(cfg, sum(len(e.rows) for e in experiments))  # a stray sweep.repeats=100000 is refused first
    for e in experiments:
        for row in e.rows:
            values = {**defaults_of(scale), **config_mod.normalize_keys(e.overrides), **user, **config_mod.normalize_keys(row.overrides)}
            method, backbone = str(values.get("method", config_mod.Config.method)), _backbone_of(values)
            values = {k: _fill(v, cfg) for k, v in values.items() if _applies(k, method, backbone)}
            for r in range(cfg.sweep.repeats):
                seed = cfg.run.seed + r
                c = config_mod.resolve({**values, "run.seed": seed, "run.name": cfg.run.name, "run.experiment": cfg.run.experiment})
                suffix = f"-seed{seed}" if cfg.sweep.repeats > 1 else ""
                mine = {**config_mod.normalize_keys(e.overrides), **config_mod.normalize_keys(row.overrides)}
                out.append(sweeps.Trial(trial_id(e.name, row.label) + suffix, f"{e.name}: {row.label}", mine, c.to_dict(), c.train_hash()))
    return out


def make_staged_trials(cfg: config_mod.Config, scale: Scale, user: dict[str, Any], two: TwoStages) -> list[sweeps.Trial]:
    """Every trial of a two-stage pipeline: the scale's keys < the experiment's < the command line's <
    the seed make the base a row's stage keys are computed from (``two.first`` / ``two.second``,
    which end with the row's keys: a row's keys may need its stage, as ``imta.isc`` needs phase 2).
    A row starts from an earlier row of its experiment, the trial of the same seed."""
    out = []
    experiments = experiments_of(cfg, scale)
    sweeps.check_size(cfg, sum(len(e.rows) for e in experiments))
    for e in experiments:
        started: dict[tuple[str, int], sweeps.Trial] = {}  # (row label, seed) -> its trial
        for row in e.rows:
            if row.start and row.start not in {label for label, _ in started}:
                raise ConfigError("Row.start", row.start, f"the label of an earlier row of experiment {e.name} (row {row.label!r})")
            keys = config_mod.normalize_keys(row.overrides)
            values = {**defaults_of(scale), **config_mod.normalize_keys(e.overrides), **user}
            method, backbone = str({**values, **keys}.get("method", config_mod.Config.method)), _backbone_of({**values, **keys})
            values = {k: _fill(v, cfg) for k, v in values.items() if _applies(k, method, backbone)}
            for r in range(cfg.sweep.repeats):
                seed = cfg.run.seed + r
                c = config_mod.resolve({**values, "run.seed": seed, "run.name": cfg.run.name, "run.experiment": cfg.run.experiment})
                extra = two.second(c, started[(row.start, seed)], keys) if row.start else two.first(c, keys)
                c = c.with_overrides(extra)
                suffix = f"-seed{seed}" if cfg.sweep.repeats > 1 else ""
                out.append(sweeps.Trial(trial_id(e.name, row.label) + suffix, f"{e.name}: {row.label}", {**config_mod.normalize_keys(e.overrides), **extra}, c.to_dict(), c.train_hash()))
                started[(row.label, seed)] = out[-1]
    return out


def stages_text(stages: list[pipeline.Stage]) -> str:
    """The plan's line for a two-stage pipeline: which trials each stage trains."""
    return "Training stages: " + " -> ".join(f"{s.step} ({len(s.trials)} trials" + (f", each from its {s.after} trial's weights" if s.after else "") + ")" for s in stages)


# ------------------------------------------------------------------ verdicts


def _point_columns(table: pd.DataFrame, over: str) -> list[str]:
    """The exits (by number, then by cost: sub-networks named by letters, base-net first) or the
    budgets (by size) of a comparison table."""
    cols = comparison.accuracy_columns(table)
    if over == "exits":
        cols = [c for c in cols if c.startswith("acc_")]
        return sorted(cols, key=lambda c: (int("".join(ch for ch in c if ch.isdigit()) or 0), _cost(table, c)))
    return sorted((c for c in cols if c.startswith("acc@")), key=lambda c: float(c[4:].replace("MMACs", "")))


def _cost(table: pd.DataFrame, col: str) -> float:
    """An exit's MMACs: the first row's that has it (a network trained alone has one of an ADN's two
    sub-networks; IMTA's ISC rows are a little dearer than the first row, the paper's network)."""
    mm = f"mmacs_{col[4:]}"
    have = table[mm].dropna() if mm in table else pd.Series(dtype=float)
    return float(have.iloc[0]) if len(have) else math.nan


def _numbered(cols: list[str]) -> bool:
    """Whether the exits are numbered (early exits), not named (sub-networks such as TTTT)."""
    return all(any(ch.isdigit() for ch in c) for c in cols)


def differences(summary: pd.DataFrame, better: str, worse: str, over: str) -> pd.DataFrame:
    """Per exit or budget: both rows' means, the difference and its noise: the two rows' noises
    (standard error of a mean over seeds, never below the binomial SE of the test set) added in
    quadrature."""
    b = summary[summary["label"] == better]
    w = summary[summary["label"] == worse]
    rows = []
    if b.empty or w.empty:
        return pd.DataFrame(columns=["point", "better", "worse", "diff", "noise"])
    b, w = b.iloc[0], w.iloc[0]
    for c in _point_columns(summary, over):
        if not (np.isfinite(b[c]) and np.isfinite(w[c])):
            continue
        noise = math.sqrt(b[f"{c}_se"] ** 2 + w[f"{c}_se"] ** 2)
        rows.append({"point": c, "better": b[c], "worse": w[c], "diff": b[c] - w[c], "noise": noise})
    return pd.DataFrame(rows)


def point_verdict(diff: float, noise: float) -> str:
    """``holds`` when better - worse exceeds NOISE_FACTOR standard errors of the difference,
    ``reversed`` when it falls below minus that, else ``within noise``."""
    margin = comparison.NOISE_FACTOR * noise
    return "holds" if diff > margin else "reversed" if diff < -margin else "within noise"


def _routes_verdict(claim: Claim, summary: pd.DataFrame) -> dict[str, Any]:
    row = summary[summary["label"] == claim.better]
    cols = [c for c in summary.columns if c.startswith("spread_") and not c.endswith("_min")]
    if row.empty or not cols or not np.isfinite(row.iloc[0][cols[0]]):
        return {"verdict": "not run", "ours": "no gate statistics at this scale"}
    mean, low = float(row.iloc[0][cols[0]]), float(row.iloc[0].get(f"{cols[0]}_min", row.iloc[0][cols[0]]))
    verdict = "holds" if low >= claim.threshold else "reversed"  # below it in any seed: that seed's gates barely route
    return {"verdict": verdict, "ours": f"category spread {mean:.2f} (mean), {low:.2f} (lowest seed); needs >= {claim.threshold:g}", "min_diff": low, "max_diff": mean}


def _cost_ratio(summary: pd.DataFrame, better: str, worse: str, points: list[str]) -> float:
    """``better``'s mean executed cost over ``worse``'s at these points (their mmacs columns)."""
    b, w = (summary[summary["label"] == x].iloc[0] for x in (better, worse))
    cols = [f"mmacs_{p[4:]}" for p in points]
    return float(sum(b[c] for c in cols) / sum(w[c] for c in cols))


def claim_verdict(claim: Claim, summary: pd.DataFrame) -> dict[str, Any]:
    """One claim's verdict over its points: ``reversed`` if any point is reversed, ``holds`` if
    every point holds, else ``within noise``; with the numbers behind it. ``matches``: holds when no
    point is reversed and ``better`` costs less, else reversed. ``routes``: see :class:`Claim`."""
    if claim.kind == "routes":
        return _routes_verdict(claim, summary)
    d = differences(summary, claim.better, claim.worse, claim.over)
    if d.empty:
        return {"verdict": "not run", "ours": "no results at this scale"}
    d = d.iloc[[0]] if claim.at == "first" else d.iloc[[-1]] if claim.at == "last" else d
    per = [point_verdict(x, n) for x, n in zip(d["diff"], d["noise"])]
    if claim.kind == "matches":
        ratio = _cost_ratio(summary, claim.better, claim.worse, list(d["point"]))
        verdict = "reversed" if "reversed" in per or ratio >= 1 else "holds"
        spread = ", ".join(f"{x:+.2f}±{n:.2f}" for x, n in zip(d["diff"], d["noise"]))
        return {"verdict": verdict, "ours": f"{spread} at {ratio:.2f}x the cost", "min_diff": float(d["diff"].min()), "max_diff": float(d["diff"].max())}
    verdict = "reversed" if "reversed" in per else "holds" if all(p == "holds" for p in per) else "within noise"
    counts = ", ".join(f"{per.count(v)} {v}" for v in VERDICTS if per.count(v))
    spread = ", ".join(f"{x:+.2f}±{n:.2f}" for x, n in zip(d["diff"], d["noise"]))
    return {"verdict": verdict, "ours": f"{spread} ({counts} of {len(per)})", "min_diff": float(d["diff"].min()), "max_diff": float(d["diff"].max())}


def paper_claim(claim: Claim, published: dict, table_of: dict[str, str] | None = None) -> str:
    """What the paper's own numbers say about a claim, where it printed them (``table_of``: the
    paper's table each experiment stands for)."""
    if claim.paper_says:
        return claim.paper_says
    table = published.get("tables", {}).get((table_of or {}).get(claim.experiment, claim.experiment))
    if table and "points" in table:
        return _paper_points_claim(claim, table)
    if claim.over != "exits" or not table or claim.better not in table["rows"] or claim.worse not in table["rows"]:
        return "no values printed (a plot)"  # Fig. 4 and Fig. 6 of BoostNet, for instance
    diff = np.array(table["rows"][claim.better], dtype=float) - np.array(table["rows"][claim.worse], dtype=float)
    diff = diff[:1] if claim.at == "first" else diff[-1:] if claim.at == "last" else diff
    diff = diff[np.isfinite(diff)]  # the points both rows have (a network trained alone: one of two)
    if not len(diff):
        return "no values printed for these rows at these points"
    where = table["source"].split(" (")[0]
    if len(diff) == 1:
        return f"{where}: {diff[0]:+.2f}"
    return f"{where}: {diff.min():+.2f} .. {diff.max():+.2f} ({int((diff >= 0).sum())} of {len(diff)} >= 0)"


def paper_points(table: dict) -> dict[str, tuple[float, float]]:
    """A one-point-per-model table (a dynamic network's operating points: ``points: {label: {cost,
    top1_err}}``, as the paper prints them) as ``{label: (cost, top-1 accuracy %)}``."""
    return {label: (float(p["cost"]), 100.0 - float(p["top1_err"])) for label, p in table["points"].items()}


def _paper_points_claim(claim: Claim, table: dict) -> str:
    pts = paper_points(table)
    where = table["source"].split(" (")[0]
    if claim.kind == "routes" or any(r not in pts for r in claim.rows):
        return "no values printed" + (" (a plot)" if claim.kind == "routes" else " for these rows")
    (cb, ab), (cw, aw) = pts[claim.better], pts[claim.worse]
    return f"{where}: {ab - aw:+.2f}" + (f" at {cb / cw:.2f}x the cost" if claim.kind == "matches" else "")


# ------------------------------------------------------------------ the report


def _sig4(x: float) -> float:
    """``x`` rounded to the 4 significant digits the papers print."""
    return float(f"{x:.4g}")


def costs_match(ours_mmacs: list[float], paper: list[float]) -> bool:
    """Whether our exits cost what the paper prints (same count, equal at its 4 significant digits)."""
    return len(ours_mmacs) == len(paper) and all(math.isclose(_sig4(o), p, rel_tol=1e-9) for o, p in zip(ours_mmacs, paper))


def experiment_table(summary: pd.DataFrame, experiment: dict, paper: dict | None, pair: tuple[str, str] | None) -> tuple[pd.DataFrame, bool]:
    """Per exit: our cost and rows (mean ± spread over seeds), the pair's difference and its
    verdict; the paper's cost and rows beside them when our exits are the paper's (equal costs)."""
    cols = _point_columns(summary, "exits")
    mmacs = [_cost(summary, c) for c in cols]
    joined = paper is not None and "cost" in paper and costs_match(mmacs, paper["cost"])
    out = pd.DataFrame({"exit": range(1, len(cols) + 1), "MMACs": [round(m, 2) for m in mmacs]})
    if not _numbered(cols):
        out.insert(1, "output", [c[4:] for c in cols])
    for label in experiment["rows"]:
        s = summary[summary["label"] == label]
        if s.empty:
            continue
        s = s.iloc[0]
        err = [s[f"{c}_std"] if s["n_seeds"] > 1 else s[f"{c}_se"] for c in cols]
        out[label] = ["-" if not np.isfinite(s[c]) else f"{s[c]:.2f} ± {e:.2f}" if np.isfinite(e) else f"{s[c]:.2f}" for c, e in zip(cols, err)]
    if pair:
        d = differences(summary, *pair, "exits").set_index("point")
        if not d.empty:  # a point the two rows do not share (a network trained alone has one) is blank
            out[f"{pair[0]} - {pair[1]}"] = [f"{d.at[c, 'diff']:+.2f} ± {d.at[c, 'noise']:.2f}" if c in d.index else "-" for c in cols]
            out["verdict"] = [point_verdict(d.at[c, "diff"], d.at[c, "noise"]) if c in d.index else "-" for c in cols]
    if joined:
        out.insert(2, "paper MMACs", paper["cost"])
        for label, values in paper["rows"].items():
            out[f"paper {label}"] = values
        if pair and all(p in paper["rows"] for p in pair):
            out[f"paper {pair[0]} - {pair[1]}"] = [f"{b - w:+.2f}" if np.isfinite(b - w) else "-" for b, w in zip(paper["rows"][pair[0]], paper["rows"][pair[1]])]
    return out, joined


def one_point(summary: pd.DataFrame) -> bool:
    """Whether each row is one operating point (a gated network's mean executed cost and accuracy)
    rather than a curve of exits."""
    return len(_point_columns(summary, "exits")) == 1 and any(c.startswith("spread_") for c in summary.columns)


def points_table(summary: pd.DataFrame, experiment: dict, reference: str | None) -> pd.DataFrame:
    """One row per compared model: its mean executed cost (and that over ``reference``'s), accuracy
    (mean ± spread over seeds), the gates' category spread, and the difference from ``reference``
    with its noise and verdict."""
    (col,) = _point_columns(summary, "exits")
    name = col[4:]
    ref = summary[summary["label"] == reference].iloc[0] if reference and (summary["label"] == reference).any() else None
    rows = []
    for label in experiment["rows"]:
        s = summary[summary["label"] == label]
        if s.empty:
            continue
        s = s.iloc[0]
        err = s[f"{col}_std"] if s["n_seeds"] > 1 else s[f"{col}_se"]
        spread = s.get(f"spread_{name}", math.nan)
        row = {"row": label, "MMACs": round(float(s[f"mmacs_{name}"]), 2), "accuracy": f"{s[col]:.2f} ± {err:.2f}",
               "category spread (mean, lowest seed)": f"{spread:.2f}, {s[f'spread_{name}_min']:.2f}" if np.isfinite(spread) else "- (no gates)"}
        if ref is not None:
            row[f"x {reference} cost"] = round(float(s[f"mmacs_{name}"] / ref[f"mmacs_{name}"]), 3)
            if label != reference:
                noise = math.sqrt(s[f"{col}_se"] ** 2 + ref[f"{col}_se"] ** 2)
                row[f"- {reference}"] = f"{s[col] - ref[col]:+.2f} ± {noise:.2f}"
                row["verdict"] = point_verdict(s[col] - ref[col], noise)
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def paper_table(paper: dict) -> pd.DataFrame:
    if "points" in paper:
        pts = paper_points(paper)
        ref = pts.get(paper.get("reference", ""))
        unit = {1e6: "MMACs", 1e9: "GMACs"}.get(float(paper["cost_unit"]), f"x{paper['cost_unit']:g} MACs")
        out = pd.DataFrame({"model": list(pts), unit: [c for c, _ in pts.values()], "top-1 %": [round(a, 2) for _, a in pts.values()]})
        if ref:
            out[f"x {paper['reference']} cost"] = [round(c / ref[0], 3) for c, _ in pts.values()]
        return out
    out = pd.DataFrame({"exit": range(1, len(paper["cost"]) + 1), "MMACs": paper["cost"]})
    if float(paper.get("cost_unit", 1e6)) != 1e6:
        out = out.rename(columns={"MMACs": {1e9: "GMACs"}.get(float(paper["cost_unit"]), f"x{paper['cost_unit']:g} MACs")})
    for label, values in paper["rows"].items():
        out[label] = ["-" if not np.isfinite(v) else v for v in map(float, values)]
    return out


def _markdown(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def claims_table(claims: list[Claim], summaries: dict[str, pd.DataFrame], published: dict, table_of: dict[str, str] | None = None) -> pd.DataFrame:
    rows = []
    for c in claims:
        s = summaries.get(c.experiment)
        v = claim_verdict(c, s) if s is not None else {"verdict": "not run", "ours": "experiment not in this scale"}
        rows.append({"claim": c.name, "experiment": c.experiment, "paper": paper_claim(c, published, table_of), "ours (diff ± noise per point)": v["ours"], "verdict": v["verdict"], "source": c.source})
    return pd.DataFrame(rows)


def figure(summaries: dict[str, pd.DataFrame], experiments: list[dict], published: dict, path: Path, title: str) -> Path:
    """One panel per experiment: our rows' anytime exits (mean over seeds, error = spread) and
    budgeted accuracy at the requested budgets; the paper's printed points on the same axes when
    our exits are the paper's, else in a panel of their own, labelled as another dataset and scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for e in experiments:
        s = summaries.get(e["name"])
        if s is None:
            continue
        paper = published.get("tables", {}).get(e["paper"])
        cols = _point_columns(s, "exits")
        mm = [_cost(s, c) for c in cols]
        same = paper is not None and "cost" in paper and costs_match(mm, paper["cost"])
        panels.append((e, s, paper, same))
        if paper is not None and not same:
            panels.append(({"name": e["paper"], "paper_only": True}, None, paper, False))
    fig = Figure(figsize=(5.2 * max(1, len(panels)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    colours: dict[str, str] = {}
    for ax, (e, s, paper, same) in zip(axes, panels):
        if s is not None:  # a paper-only panel keeps the colours of the experiment panel before it
            colours = {}
            for i, (_, r) in enumerate(s.iterrows()):
                colour = f"C{i}"
                colours[r["label"]] = colour
                cols = _point_columns(s, "exits")
                x = [r[f"mmacs_{c[4:]}"] for c in cols]
                y = [r[c] for c in cols]
                err = [r[f"{c}_std"] if r["n_seeds"] > 1 else r[f"{c}_se"] for c in cols]
                what = "" if len(cols) == 1 else " exits" if _numbered(cols) else " sub-networks"  # a gated network is one point: its mean executed cost
                ax.errorbar(x, y, yerr=err, fmt="o", color=colour, capsize=2, label=f"{r['label']}{what} (n={int(r['n_seeds'])})")
                bcols = _point_columns(s, "budgets")
                if bcols:
                    bx = [float(c[4:].replace("MMACs", "")) for c in bcols]
                    ax.plot(bx, [r[c] for c in bcols], "-", color=colour, label=f"{r['label']} budgeted")
            ax.set_title(e["name"] + (" (paper's exits)" if same else ""), fontsize=9)
        if paper is not None and "points" in paper and e.get("paper_only"):  # one point per model
            for i, (label, (cost, acc)) in enumerate(paper_points(paper).items()):
                ax.plot([cost * paper["cost_unit"] / 1e6], [acc], "x", markersize=8, color=colours.get(label, f"C{i + 5}"), label=f"paper {label} ({paper['dataset']})")
            ax.set_title(f"paper: {e['name']} ({paper['source'].split(' (')[0]})\nanother dataset and scale: shape only", fontsize=9)
        elif paper is not None and (same or e.get("paper_only")):
            for i, (label, values) in enumerate(paper["rows"].items()):
                ax.plot([c * float(paper.get("cost_unit", 1e6)) / 1e6 for c in paper["cost"]], [float(v) for v in values], "x--", color=colours.get(label, f"C{i + 5}"), alpha=0.8, label=f"paper {label} ({paper['dataset']})")
            if e.get("paper_only"):
                ax.set_title(f"paper: {e['name']} ({paper['source'].split(',')[0]})\nanother dataset and scale: shape only", fontsize=9)
        ax.set_xlabel("MMACs per image")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def reproduce_step(ctx: dag.StepContext, report: dict) -> dict:
    """The paper beside ours: per-experiment tables, the figure, the claims and their verdicts;
    ``reproduction.md`` (with the figure), ``claims.csv`` and ``experiments/*.csv`` logged to the
    parent run under ``reproduction/``."""
    c = ctx.config
    parent = tracking.RunHandle(**c["parent"])
    published = load_published(c["published"])
    table = pd.read_parquet(report["table"])
    summaries = {}
    for e in c["experiments"]:
        prefix = f"{e['name']}: "
        mine = table[table["label"].astype(str).str.startswith(prefix) & (table["status"] == "ok")].copy()  # failed trials are listed by the CLI
        if mine.empty:
            continue
        mine["label"] = mine["label"].str[len(prefix):]
        mine = mine.dropna(axis=1, how="all")
        summaries[e["name"]] = comparison.summarize(mine)
    claims = [Claim(**x) for x in c["claims"]]
    verdicts = claims_table(claims, summaries, published, {e["name"]: e["paper"] for e in c["experiments"]})
    verdicts.to_csv(ctx.out_dir / "claims.csv", index=False)
    md = [f"# Reproduction: {published['paper']} (scale={c['scale']})", "", f"Command: `{c['command']}`", "", c["scale_about"], ""]
    if c["overridden"]:
        md += ["Overridden on the command line (the scale's value -> the command line's):", ""] + [f"- `{k}`: {a!r} -> {b!r}" for k, (a, b) in c["overridden"].items()] + [""]
    md += ["## Claims", "", f"Verdict per point: holds when ours differ by more than {comparison.NOISE_FACTOR:g} standard errors of the difference in the claimed direction, reversed when by more than that the other way, else within noise. A claim holds when every point holds and is reversed when any point is.", "", _markdown(verdicts), "", "![figure](reproduction.png)", ""]
    (ctx.out_dir / "experiments").mkdir()
    for e in c["experiments"]:
        s = summaries.get(e["name"])
        paper = published.get("tables", {}).get(e["paper"])
        md += [f"## {e['name']}: {e['about']}", ""]
        if s is None:
            md += ["Not run at this scale." + (f" The paper's numbers ({paper['source']}):" if paper else ""), ""]
            if paper:
                md += [_markdown(paper_table(paper)), ""]
            continue
        if one_point(s):  # gated networks: one operating point per row, the paper's beneath (matched by label)
            t, joined = points_table(s, e, e["pair"][1] if e.get("pair") else None), False
        else:
            t, joined = experiment_table(s, e, paper, tuple(e["pair"]) if e.get("pair") else None)
        t.to_csv(ctx.out_dir / "experiments" / f"{e['name']}.csv", index=False)
        what = "executed cost and test accuracy" if one_point(s) else "test accuracy"
        md += [f"Ours: {what} % (mean ± std over {int(s['n_seeds'].max())} seed(s); ± binomial SE for one seed), on {int(s['n_test'].max())} test images.", "", _markdown(t), ""]
        if paper and not joined:
            same = e["paper"] == e["name"]  # the paper's own experiment (scale=paper), whose costs are rounded otherwise than ours
            what = "its costs as printed" if same else "another dataset and scale than ours, so compare directions and shapes, not numbers"
            md += [f"The paper ({paper['source']}; {paper['dataset']}, preset {paper['preset']}): {what}.", "", _markdown(paper_table(paper)), ""]
        bud = _point_columns(s, "budgets")
        if bud:
            b = pd.DataFrame({"budget MMACs": [col[4:].replace("MMACs", "") for col in bud]})
            for _, r in s.iterrows():
                b[r["label"]] = [f"{r[col]:.2f} ± {(r[f'{col}_std'] if r['n_seeds'] > 1 else r[f'{col}_se']):.2f}" for col in bud]
            md += ["Budgeted batch (thresholds from the held-out split, applied to test):", "", _markdown(b), ""]
    md += ["## What the paper gets wrong or leaves out", ""] + [f"- {x}" for x in published.get("errata", [])] + [""]
    s = published.get("settings", {})
    md += ["## Settings", "", "Stated in the paper:", ""] + [f"- {x}" for x in s.get("stated", [])] + ["", "Not in the paper (from the reference code):", ""] + [f"- {x}" for x in s.get("not_in_paper", [])] + [""]
    fig = figure(summaries, c["experiments"], published, ctx.out_dir / "reproduction.png", c["title"])
    (ctx.out_dir / "reproduction.md").write_text("\n".join(md))
    for name in ("reproduction.md", "reproduction.png", "claims.csv"):
        parent.log_artifact(ctx.out_dir / name, "reproduction")
    parent.log_artifact(ctx.out_dir / "experiments", "reproduction")
    parent.set_tags({f"dynlab.claim.{i}": v for i, v in enumerate(verdicts["verdict"])})
    return {"markdown": str(ctx.out_dir / "reproduction.md"), "claims": str(ctx.out_dir / "claims.csv"), "figure": str(fig)}


def effects_step(ctx: dag.StepContext, report: dict) -> dict:
    """An ablation's effects without a paper beside them: each ``Claim`` of the config (a row against
    the row it is to be compared with) over every label of the comparison, with its verdict;
    ``report/effects.csv`` in the parent run, and the lines to print."""
    c = ctx.config
    table = pd.read_parquet(report["table"])
    summary = comparison.summarize(table[table["status"] == "ok"]) if "status" in table else comparison.summarize(table)
    rows = []
    for claim in (Claim(**x) for x in c["claims"]):
        v = claim_verdict(claim, summary)
        rows.append({"effect": claim.name, "ours (diff ± noise per exit)": v["ours"], "verdict": v["verdict"], "why": claim.source})
    out = pd.DataFrame(rows)
    out.to_csv(ctx.out_dir / "effects.csv", index=False)
    tracking.RunHandle(**c["parent"]).log_artifact(ctx.out_dir / "effects.csv", "report")
    lines = ["", f"Effects (difference ± its standard error per exit; {comparison.NOISE_FACTOR:g} standard errors decide):"]
    lines += [f"  [{r['verdict']:>12}] {r['effect']}: {r['ours (diff ± noise per exit)']}" for r in rows]
    return {"effects": str(ctx.out_dir / "effects.csv"), "text": "\n".join(lines)}


def short(claims_csv: str | Path, markdown: str | Path) -> str:
    """The claims as printed at the end of a run."""
    v = pd.read_csv(claims_csv)
    lines = ["", "Claims of the paper, and what this run says (diff ± noise per point; see the report for the tables):"]
    for _, r in v.iterrows():
        lines.append(f"  [{r['verdict']:>12}] {r['claim']}  ours: {r['ours (diff ± noise per point)']}  paper: {r['paper']}")
    lines.append(f"[dynlab] reproduction report: {markdown}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the plan


TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167, "digits": 1_797}
TEST_IMAGES = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 50_000, "digits": 0}


def _dataset_kind(cfg: config_mod.Config) -> str:
    from dynlab import registry

    if cfg.data.name != "imagefolder":
        return cfg.data.name
    if cfg.preset and registry.get_preset(cfg.preset).dataset == "imagenet":
        return "imagenet"
    return "cifar10" if "cifar10" in cfg.data.root else "imagenet"


def _sizes(cfg: config_mod.Config) -> tuple[int, int, int]:
    """(training images per epoch, held-out images, test images) without reading the data."""
    from dynlab import data

    kind = _dataset_kind(cfg)
    if kind == "synthetic":
        n, test = cfg.data.synthetic_train, cfg.data.synthetic_test
    else:
        n, test = TRAIN_IMAGES[kind], TEST_IMAGES[kind]
    held = data.default_heldout("imagefolder" if kind == "imagenet" else kind, n) if cfg.data.heldout == -1 else cfg.data.heldout
    if kind == "digits":
        test = 1797 - n + 0  # digits' test split is carved from its 1,797 images
    train = cfg.data.train_subset or (n - held)
    return train, held, test


def forward_macs(cfg: config_mod.Config, cache: dict | None = None) -> float:
    """MACs of the forward passes of one training step per image: one through every exit, unless the
    method says otherwise (``train_macs(cost_table)``)."""
    from dynlab import data, registry

    cache = {} if cache is None else cache
    key = cfg.hash(exclude=("run", "optim", "eval", "sweep", "repro", "method", cfg.method))  # the backbone's cost, whatever trains it
    if key not in cache:
        kind = _dataset_kind(cfg)
        # the plan reads no data (it may be on the cluster only): the known datasets' shapes
        info = data.dataset_info(cfg.data) if kind == "synthetic" else data.STATIC_INFO[kind]
        if isinstance(getattr(cfg.method_cfg, "categories", None), str):  # DMNN: its category heads read the labels, and cost nothing at inference
            cfg = cfg.with_overrides({f"{cfg.method}.categories": "none"})
        cache[key] = registry.get_method(cfg.method).cls(cfg).build_model(info).cost_table
    method = registry.get_method(cfg.method).cls(cfg)
    # a method whose step runs other passes than one through every exit says what they cost (ADN: the
    # super-net and the base-net, or the one network trained alone)
    return float(method.train_macs(cache[key])) if hasattr(method, "train_macs") else float(cache[key].macs[-1])


def plan_frame(base: config_mod.Config, trials: list[sweeps.Trial]) -> pd.DataFrame:
    """One row per trial: settings that differ from the scale's base, resources, images, compute.
    Training multiply-adds = 3 x forward (the backward pass is about twice the forward) x training
    images x epochs, plus a forward pass over the held-out split each epoch (model selection) and
    over held-out and test once (predictions)."""
    flat = base.flat()
    cache: dict = {}
    rows = []
    first: dict[str, str] = {}  # train key -> the trial that trains it (the sweep trains a shared training once)
    for t in trials:
        cfg = t.cfg()
        mine = cfg.flat()
        differs = {k: mine.get(k, v) for k, v in config_mod.normalize_keys(t.overrides).items() if flat.get(k, object()) != mine.get(k, v) and k != "run.seed"}
        cpus, gpus = sweeps.trial_need(cfg)
        train, held, test = _sizes(cfg)
        fwd = forward_macs(cfg, cache)
        macs = 3 * fwd * train * cfg.run.epochs + fwd * held * cfg.run.epochs + fwd * (held + test)
        shared = first.setdefault(t.train_key, t.id) != t.id
        if shared:
            macs = fwd * (held + test)  # its predictions only
            differs = {"(trained by)": first[t.train_key], **differs}
        rows.append({"trial": t.id, "settings": " ".join(f"{k}={_short(v)}" for k, v in differs.items()), "cpus": cpus, "gpus": gpus, "forward GMACs": fwd / 1e9, "train images": train, "epochs": cfg.run.epochs, "training PMACs": macs / 1e15})
    return pd.DataFrame(rows)


def _short(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plan_text(base: config_mod.Config, scale: Scale, trials: list[sweeps.Trial], over: dict, command: str) -> str:
    p = plan_frame(base, trials)
    lines = [f"Plan: {command}", f"scale={scale.name}: {scale.about}"]
    if over:
        lines.append("overridden on the command line: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in over.items()))
    n = len(trials)
    lines += [
        "",
        "DAG:",
        f"  sweep ({n} trials, Ray Tune; each trained by Ray Train)",
        f"  -> predict[trial] -> calibrate[trial] -> evaluate[trial]   ({3 * n} Ray tasks)",
        "  -> report (comparison of every trial) -> reproduce (the paper's numbers beside ours, one verdict per claim)",
        "",
        f"Experiments: {', '.join(e.name for e in experiments_of(base, scale))}",
        "The scale's base: " + " ".join(f"{k}={_short(v)}" for k, v in defaults_of(scale).items()),
        "",
        "Trials (resources each trial holds; compute; below each, its settings that differ from the base):",
    ]
    cols = [c for c in p.columns if c != "settings"]
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        table = p[cols].to_string(index=False, float_format=lambda x: f"{x:.3g}").splitlines()
    lines.append("  " + table[0])
    for row, settings in zip(table[1:], p["settings"]):
        lines += ["  " + row, "      " + (settings or "(the base)")]
    total = p["training PMACs"].sum()
    shared = p["settings"].str.startswith("(trained by)=").sum()
    if shared:
        lines += ["", f"{shared} trial(s) share another trial's training (the same config): trained once, {n - shared} trainings in all."]
    lines += ["", f"Compute: {total:.4g} PMACs (10^15 multiply-adds) in all; training = 3 x forward x images x epochs, plus held-out scoring each epoch and the final predictions."]
    gpu = p[p["gpus"] > 0]
    g = base.repro.gpus
    if len(gpu):
        at_once = int(g // gpu["gpus"].max()) if gpu["gpus"].max() > 0 else n
        conc = base.sweep.max_concurrent or at_once
        lines.append(f"At once on {g} GPU(s) (repro.gpus): {min(conc, at_once, n)} trial(s) of the largest ({gpu['gpus'].max():g} GPU each); sweep.max_concurrent={base.sweep.max_concurrent} (0 = as many as fit).")
    else:
        lines.append(f"CPU trials: each holds {p['cpus'].max():g} CPU(s); as many run at once as the cluster's CPUs fit (sweep.max_concurrent={base.sweep.max_concurrent}, 0 = as many as fit).")
    if base.repro.throughput > 0:
        gpu_hours = float((p["training PMACs"] * 1e15 / base.repro.throughput / 3600).sum())  # data-parallel GPUs share a trial's work
        lines.append(f"GPU-hours at {base.repro.throughput:.3g} training multiply-adds/s per GPU: {gpu_hours:.1f} in all; at least {gpu_hours / g:.1f} h of wall time on {g} GPU(s).")
    else:
        lines.append("GPU-hours: give repro.throughput=<training multiply-adds per second per GPU> (python -m benchmarks.throughput on that GPU prints it).")
    return "\n".join(lines)


# ------------------------------------------------------------------ the command line


def main(doc: str, experiment: str, scales: dict[str, Scale], claims: list[Claim], published: str | Path, title: str, argv: list[str] | None = None, two: TwoStages | None = None) -> int:
    """``python -m pipelines.reproduce_<paper> scale=... [--plan] [key=value ...]`` (``two``: a
    pipeline that trains in two stages, see :class:`TwoStages`)."""
    from dynlab import cli

    args = list(sys.argv[1:] if argv is None else argv)
    want_plan = "--plan" in args
    args = [a for a in args if a != "--plan"]
    if any(a in ("-h", "--help") for a in args):
        return cli.main(doc, args, lambda *a: {}, default_experiment=experiment)
    command = "python -m pipelines." + experiment + " " + " ".join(args + (["--plan"] if want_plan else []))
    try:
        __import__("methods")
        user = config_mod.normalize_keys(config_mod.parse_overrides(args))
        scale = scale_of(user, scales)
        over = overridden(scale, user)
        if want_plan:
            base = config_mod.resolve({**defaults_of(scale), **user})
            trials = make_trials(base, scale, user, two)
            print(plan_text(base, scale, trials, over, command) + ("\n" + stages_text(two.stages(trials)) if two else ""))
            return 0
    except DynlabError as err:
        print(f"error: {err}")
        return 2

    def body(cfg, handle, name):
        trials = make_trials(cfg, scale, user, two)
        run_exps = experiments_of(cfg, scale)
        mine = claims_of(claims, run_exps)
        exps = [{"name": e.name, "about": e.about, "paper": e.table, "rows": [r.label for r in e.rows], "pair": pair_of(mine, e.name)} for e in run_exps]
        step = dag.Step(
            "reproduce",
            reproduce_step,
            config={"parent": handle.as_payload(), "published": str(Path(published).resolve()), "experiments": exps, "claims": [dataclasses.asdict(c) for c in mine],
                    "scale": scale.name, "scale_about": scale.about, "overridden": {k: list(v) for k, v in over.items()}, "command": command, "title": f"{title} (scale={scale.name})"},
            inputs={"report": "report"},
            where="driver",
            cache=False,  # logs into this invocation's parent run
        )
        handle.set_tags({"dynlab.scale": scale.name, "dynlab.overridden": ", ".join(over) or "-"})
        out = pipeline.run(cfg, two.stages(trials) if two else trials, handle, experiment, f"{title} (scale={scale.name})", after_report=[step])
        rep = out["dag"]["reproduce"]
        out["reproduction"] = rep
        out["epilogue"] = short(rep["claims"], rep["markdown"])
        return out

    def checked(cfg):
        trials = make_trials(cfg, scale, user, two)
        return two.checked(cfg, trials) if two else [t.cfg() for t in trials]

    return cli.main(doc, args, body, default_experiment=experiment, plan=checked, defaults=defaults_of(scale))


def pair_of(claims: list[Claim], experiment: str) -> list[str] | None:
    """The experiment's main comparison (its first exits claim): the difference column of its table."""
    for c in claims:
        if c.experiment == experiment and c.over == "exits" and c.at == "all":
            return [c.better, c.worse]
    return None
