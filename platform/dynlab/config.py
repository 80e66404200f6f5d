"""Typed run configuration: dataclasses with defaults, ``a.b=c`` overrides, validation, a stable hash.

A resolved :class:`Config` has fixed sections (``run``, ``data``, ``optim``) and two sections named
after the chosen method and backbone (``boostnet``, ``msdnet``, ...) whose dataclasses come from the
registry. So ``method=boostnet boostnet.temperature=0.25 backbone=msdnet msdnet.n_blocks=7`` is valid
and ``ranet.n_blocks=2`` with ``backbone=msdnet`` is an error that says which sections exist.

Field metadata drives validation: ``choices`` (allowed values), ``min`` / ``max`` (inclusive bounds),
``hash=False`` (excluded from the config hash: where results go, not what they are),
``hash_default=False`` (left out of the hash while at its default: a key added after runs were
recorded, so that every earlier config keeps its hash and its cached training).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynlab import registry
from dynlab.errors import ConfigError, did_you_mean


def choice(default, *choices, **meta):
    return field(default=default, metadata={"choices": tuple(choices), **meta})


def bounded(default, lo=None, hi=None, **meta):
    return field(default=default, metadata={"min": lo, "max": hi, **meta})


@dataclass
class RunConfig:
    name: str = field(default="", metadata={"hash": False, "help": "Ray Train run name; the same name resumes"})
    experiment: str = field(default="dynlab", metadata={"hash": False})
    seed: int = bounded(0, 0)
    epochs: int = bounded(4, 1)
    num_workers: int = bounded(1, 0, help="Ray Train workers; 0 runs in the driver process")
    cpus_per_worker: float = bounded(1.0, 0.0)
    use_gpu: bool = False
    amp: str = choice("none", "none", "bf16", "fp16", help="autocast precision: bf16 (GPU or CPU) or fp16 with loss scaling (GPU); see docs/gpu.md")
    channels_last: bool = field(default=False, metadata={"hash": False, "help": "model weights and input batches in NHWC layout (faster convolutions on GPUs, with AMP above all)"})
    compile: bool = field(default=False, metadata={"hash": False, "help": "torch.compile the model's forward (in place: checkpoints unchanged); the first steps pay the compilation"})
    max_failures: int = bounded(3, 0, help="worker-group restarts (from the last checkpoint) before the run fails")
    select: str = choice("best", "best", "last", help="model selection: best held-out accuracy, or last epoch")
    grad_clip: float = bounded(0.0, 0.0, help="max gradient norm; 0 disables")
    storage_path: str = field(default="", metadata={"hash": False, "help": "Ray Train storage (a folder, or s3://bucket/path); default $DYNLAB_STORAGE, else ~/dynlab_runs under a Ray job, else ./dynlab_runs"})
    predict_batches: int = bounded(0, 0, help="limit batches when predicting (0 = all); for smoke tests")
    init_from: str = field(default="", metadata={"help": "start from these weights (a .pt file, or a folder holding best.pt) before epoch 0; a resumed run ignores it"})
    wait_for_resources: bool = field(default=False, metadata={"hash": False, "help": "wait for workers the cluster does not have yet (autoscaling); default: fail at once"})
    kill_after_epoch: int = field(default=-1, metadata={"hash": False, "min": -1, "help": "fault injection for tests"})
    ema_decay: float = bounded(0.0, 0.0, hash_default=False, help="keep an exponential moving average of the weights (and buffers), updated after every step with this decay (torch.optim.swa_utils.AveragedModel; DeiT: 0.99996); saved in the checkpoint; 0 = none")
    ema_eval: bool = field(default=False, metadata={"hash_default": False, "help": "score the held-out split, select and save best.pt with the EMA weights (needs run.ema_decay > 0)"})
    log_model: bool = field(default=True, metadata={"hash": False, "help": "log the selected weights as an MLflow model with budgeted inference (the run's Model column; dynlab.served)"})
    register_model: str = field(default="", metadata={"hash": False, "help": "register the logged model under this name in the MLflow Model Registry, a new version per run; empty = not registered"})

    def validate(self, section: str) -> None:
        check_name(f"{section}.name", self.name, empty_ok=True)  # "" = a fresh name per run
        check_name(f"{section}.register_model", self.register_model, empty_ok=True)
        check_name(f"{section}.experiment", self.experiment)
        if self.ema_decay >= 1:
            raise ConfigError(f"{section}.ema_decay", self.ema_decay, ">= 0 and < 1 (1 would never move the average); 0 = no EMA")
        if self.ema_eval and self.ema_decay == 0:
            raise ConfigError(f"{section}.ema_eval", self.ema_eval, f"false while {section}.ema_decay=0 (no EMA is kept); set {section}.ema_decay, e.g. 0.999")


NAME_MAX = 100  # characters: run folders, Ray Train runs and MLflow artifact folders add to it, and a path part holds 255
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(key: str, value: str, empty_ok: bool = False) -> None:
    """A run or experiment name becomes a folder (``<storage>/<run.name>``, ``mlruns/<experiment>``):
    a name with ``/`` or ``..`` would write (or resume!) outside the storage folder, a newline or a
    non-ASCII letter breaks logs and Ray's metrics under the POSIX locale, a very long one the file
    system. So a name is plain ASCII letters, digits, ``-``, ``_`` and ``.``, not starting with ``.``."""
    if value == "" and empty_ok:
        return
    if len(value) > NAME_MAX or not _NAME.fullmatch(value):
        raise ConfigError(key, value, f"a name of 1 to {NAME_MAX} characters: ASCII letters, digits, '-', '_' and '.', not starting with '.' or '-' (it becomes a folder's name: no path separators, '..' or spaces)")


@dataclass
class DataConfig:
    name: str = choice("digits", "digits", "cifar10", "cifar100", "imagefolder", "synthetic")
    root: str = field(default="", metadata={"help": "dataset folder or .zip (imagefolder, cifar)"})
    heldout: int = bounded(-1, -1, help="held-out images taken from train; -1 = dataset default")
    train_subset: int = bounded(0, 0, help="train on a seeded, class-stratified subset of N images of the training split (held-out and test unchanged); 0 = all")
    batch_size: int = bounded(64, 1)
    eval_batch_size: int = bounded(256, 1)
    augment: bool = True
    loader_workers: int = bounded(0, -1, help="DataLoader worker processes per training worker; -1 = auto: 0 for in-memory data, else run.cpus_per_worker - 1 (at most 8); see docs/gpu.md")
    pin_memory: str = field(default="auto", metadata={"hash": False, "help": "page-locked loader batches (asynchronous host-to-GPU copies): true, false or auto (on when training on a GPU)"})
    download: bool = False
    image_size: int = bounded(0, 0, help="0 = dataset default")
    synthetic_train: int = bounded(512, 1)
    synthetic_test: int = bounded(256, 1)
    synthetic_classes: int = bounded(10, 2)
    mixup: float = bounded(0.0, 0.0, hash_default=False, help="MixUp's Beta(alpha, alpha) on training batches (torchvision.transforms.v2.MixUp; DeiT: 0.8); soft targets; 0 = off")
    cutmix: float = bounded(0.0, 0.0, hash_default=False, help="CutMix's alpha (torchvision.transforms.v2.CutMix; DeiT: 1.0); with data.mixup too, each batch gets one of the two at random; 0 = off")
    auto_augment: str = choice("none", "none", "randaugment", "trivialaugment", hash_default=False, help="randaugment (2 ops, magnitude 9) or trivialaugment (TrivialAugmentWide) after the crop and flip of training images (torchvision)")
    random_erasing: float = bounded(0.0, 0.0, 1.0, hash_default=False, help="probability of erasing a random rectangle of each normalised training image with noise (torchvision RandomErasing, value='random'; DeiT: 0.25)")

    def validate(self, section: str) -> None:
        for key in ("auto_augment", "random_erasing"):
            if getattr(self, key) not in ("none", 0.0) and (not self.augment or self.name == "synthetic"):
                why = "data.augment=false" if not self.augment else "data.name=synthetic (not images)"
                raise ConfigError(f"{section}.{key}", getattr(self, key), f"{'none' if key == 'auto_augment' else 0} with {why}: it augments training images")
        value = str(self.pin_memory).strip().lower()
        value = {"yes": "true", "on": "true", "1": "true", "no": "false", "off": "false", "0": "false"}.get(value, value)
        if value not in ("auto", "true", "false"):
            raise ConfigError(f"{section}.pin_memory", self.pin_memory, "true, false or auto")
        self.pin_memory = value


@dataclass
class OptimConfig:
    lr: float = bounded(0.1, 0.0)
    momentum: float = bounded(0.9, 0.0, 1.0)
    weight_decay: float = bounded(1e-4, 0.0)
    nesterov: bool = False
    schedule: str = choice("multistep", "multistep", "cosine", "constant")
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75], metadata={"help": "fractions of epochs"})
    gamma: float = bounded(0.1, 0.0, 1.0)
    warmup_epochs: int = bounded(0, 0)
    name: str = choice("sgd", "sgd", "adamw", hash_default=False, help="sgd (momentum, nesterov, weight decay on every parameter) or adamw (torch.optim.AdamW, betas 0.9/0.999; optim.weight_decay on weights only: none on norms, biases, embeddings and position / class tokens)")
    min_lr: float = bounded(0.0, 0.0, hash_default=False, help="optim.schedule=cosine: the rate it decays to instead of 0 (DeiT: 1e-5)")
    label_smoothing: float = bounded(0.0, 0.0, hash_default=False, help="targets (1 - e) one-hot + e / classes in every method's cross-entropy (with MixUp / CutMix: of the mixed targets); 0 = off")
    decay_norms: bool = field(default=True, metadata={"hash_default": False, "help": "optim.name=sgd: weight decay on norms, biases and embeddings too (false: on weights only, as AdamW always does and the ADN authors' SGD recipes: torchvision's --norm-weight-decay 0 --bias-weight-decay 0)"})

    def validate(self, section: str) -> None:
        if self.label_smoothing >= 1:
            raise ConfigError(f"{section}.label_smoothing", self.label_smoothing, ">= 0 and < 1 (1 leaves no label in the targets)")
        if self.min_lr > 0 and self.schedule != "cosine":
            raise ConfigError(f"{section}.min_lr", self.min_lr, f"0 with {section}.schedule={self.schedule} (the floor is where the cosine schedule ends)")
        if self.min_lr > self.lr:
            raise ConfigError(f"{section}.min_lr", self.min_lr, f"<= {section}.lr ({self.lr:g}): the floor the cosine decays to")


@dataclass
class EvalConfig:
    budgets: list[float] = field(default_factory=list, metadata={"help": "budgets in MMACs per image; empty = eval.num_budgets evenly spaced"})
    num_budgets: int = bounded(8, 0)
    p_grid: bool = field(default=True, metadata={"help": "also evaluate the reference p-grid (q = p/20, p = 1..39)"})
    flat_curve: bool = field(default=False, metadata={"help": "BoostNet's flat-curve rule on the p-grid"})


@dataclass
class SweepConfig:
    values: list[float] = field(default_factory=list, metadata={"help": "the pipeline's main grid; empty = its default"})
    baseline: bool = field(default=True, metadata={"help": "add the pipeline's baseline trial (e.g. joint training)"})
    repeats: int = bounded(1, 1, help="seeds per trial: run.seed, run.seed+1, ...")
    num_samples: int = bounded(0, 0, help="random-search samples for pipelines with random axes")
    max_concurrent: int = bounded(0, 0, hash=False, help="trials at a time; 0 = as many as the cluster's CPUs/GPUs fit (a warning says when more are asked for than fit)")
    trial_cpus: float = bounded(0.05, 0.01, help="CPUs held by each trial's driver when its workers are a Ray Train worker group (they ask for their own)")
    in_process: bool = field(default=True, metadata={"hash": False, "help": "a trial of one CPU worker (run.num_workers=1, no GPU) trains in its Tune trial's process (Ray Train's local mode: no worker group to start; a crashed trial is restarted from its checkpoint up to run.max_failures times); false: a worker group per trial"})
    asha: bool = field(default=False, metadata={"help": "stop weak trials early (ASHA on held-out accuracy)"})
    grace_period: int = bounded(1, 1, help="epochs before ASHA may stop a trial")
    cache_dir: str = field(default="", metadata={"hash": False, "help": "step cache (a folder; shared by every node on a cluster); default $DYNLAB_STEP_CACHE, else <run.storage_path>/cache"})
    allow_large: bool = field(default=False, metadata={"hash": False, "help": "run a sweep of more than 200 trials (refused by default: a stray sweep.repeats or a pasted list of values would start them all)"})


@dataclass
class ReproConfig:
    """The knobs of the paper-reproduction pipelines (``pipelines.reproduce_*``); other pipelines ignore them."""

    scale: str = choice("smoke", "smoke", "laptop", "paper", help="smoke: the whole DAG on synthetic data in about a minute; laptop: CIFAR-10 on a 2-core CPU in under an hour, the paper's directions; paper: the paper's settings, for a GPU cluster")
    only: list[str] = field(default_factory=list, metadata={"help": "run only these experiments of the paper (names as --plan lists them); empty = all of the scale's"})
    cifar100_root: str = field(default="/data/cifar100", metadata={"hash": False, "help": "scale=paper: the folder holding cifar-100-python"})
    imagenet_root: str = field(default="/data/imagenet", metadata={"hash": False, "help": "scale=paper: ImageNet as an image folder (train/<class>/..., val/<class>/...)"})
    throughput: float = bounded(0.0, 0.0, hash=False, help="--plan: training multiply-adds per second per GPU (python -m benchmarks.throughput prints it); 0 = no GPU-hours")
    gpus: int = bounded(8, 1, hash=False, help="--plan: the GPUs of the cluster the plan is for (how many trials run at once)")


SHORTCUTS = {
    "scale": "repro.scale",
    "dataset": "data.name",
    "epochs": "run.epochs",
    "seed": "run.seed",
    "workers": "run.num_workers",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "name": "run.name",
}

FIXED_SECTIONS = {"run": RunConfig, "data": DataConfig, "optim": OptimConfig, "eval": EvalConfig, "sweep": SweepConfig, "repro": ReproConfig}
# Sections that do not change what training produces (excluded from Config.train_hash()).
NOT_TRAINING = ("eval", "sweep", "repro")


@dataclass
class Config:
    method: str = "boostnet"
    backbone: str = "msdnet"
    preset: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    repro: ReproConfig = field(default_factory=ReproConfig)
    method_cfg: Any = None  # the registered method's dataclass, section name = self.method
    backbone_cfg: Any = None  # the registered backbone's dataclass, section name = self.backbone

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "backbone": self.backbone, "preset": self.preset}
        for name in FIXED_SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out[self.method] = dataclasses.asdict(self.method_cfg) if self.method_cfg is not None else {}
        out[self.backbone] = dataclasses.asdict(self.backbone_cfg) if self.backbone_cfg is not None else {}
        return out

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as logged to MLflow params."""
        return _flatten(self.to_dict())

    def hashed_dict(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """``to_dict()`` without fields marked hash=False (names, paths) and without ``exclude``
        (sections like "eval", or single fields like "run.predict_batches"): what results depend on."""
        d = self.to_dict()
        for key in exclude:
            head, _, rest = key.partition(".")
            (d.get(head, {}).pop(rest, None) if rest else d.pop(head, None))
        for section, cls in [*FIXED_SECTIONS.items(), (self.method, type(self.method_cfg)), (self.backbone, type(self.backbone_cfg))]:
            if dataclasses.is_dataclass(cls) and section in d:
                for f in dataclasses.fields(cls):
                    at_default = f.metadata.get("hash_default", True) is False and d[section].get(f.name, f.default) == f.default
                    if f.metadata.get("hash", True) is False or at_default:
                        d[section].pop(f.name, None)
        return d

    def hash(self, exclude: tuple[str, ...] = ()) -> str:
        """Stable short hash of everything that changes results (see :meth:`hashed_dict`)."""
        blob = json.dumps(self.hashed_dict(exclude), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def train_hash(self) -> str:
        """Hash of what training depends on: two configs with the same train_hash train the same model."""
        return self.hash(exclude=NOT_TRAINING + ("run.predict_batches",))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "Config":
        """A new resolved config: this one's values plus ``overrides``."""
        new = {SHORTCUTS.get(k, k): v for k, v in _as_dict(overrides).items()}
        merged = dict(self.flat())
        # switching method or backbone drops the old one's section (its keys mean nothing to the new one)
        for kind, current in (("method", self.method), ("backbone", self.backbone)):
            if kind in new and new[kind] != current:
                merged = {k: v for k, v in merged.items() if not k.startswith(current + ".")}
        if "backbone" in new or "preset" in new:
            merged.pop("preset", None)
        if new.get("backbone", self.backbone) != self.backbone:
            for option in registry.METHOD_OPTIONS:  # backbone-dependent: the new backbone's default applies
                if f"{new.get('method', self.method)}.{option}" not in new:
                    merged.pop(f"{new.get('method', self.method)}.{option}", None)
        merged.update(new)
        return resolve(merged)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_value(text: str):
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _number(text: str):
    """``text`` as a number where Python reads it as one (``1e-4``, ``5E-2``, ``-0.5``, ``1_000``);
    YAML 1.1 reads ``1e-4`` as a string. None otherwise."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def split_list(key: str, text: str) -> list:
    """``"-0.5,1"`` or ``"[1e-1, 2]"`` (a list YAML could not read) -> items, each parsed alone.
    Commas separate items and a minus sign belongs to its number; only a string of non-negative
    integers joined by dashes (``1-2-4``) is read as the references' dash-separated list."""
    body = text.strip()
    if re.fullmatch(r"\d+(-\d+)+", body):  # the MSDNet reference's form for integer lists: 1-2-4
        return [int(v) for v in body.split("-")]
    if body.startswith("[") != body.endswith("]"):
        raise ConfigError(key, text, "a list like [0.5,1] or 0.5,1 (unbalanced brackets)")
    body = body.strip("[]").strip()
    if not body:
        return []
    items = [item.strip() for item in body.split(",")]
    if any(item == "" for item in items):
        raise ConfigError(key, text, "a list like [0.5,1] or 0.5,1 (an empty item between commas)")
    return [_parse_value(item) for item in items]


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (values parsed as YAML scalars/lists)."""
    out = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(arg, arg, "key=value (dotted keys, e.g. run.epochs=3)")
        key, value = arg.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def normalize_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Shortcuts spelled out (``epochs`` -> ``run.epochs``), so that two sources of keys merge by key."""
    return {SHORTCUTS.get(k, k): v for k, v in values.items()}


def _as_dict(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, dict):
        return _flatten(overrides) if any(isinstance(v, dict) for v in overrides.values()) else dict(overrides)
    return parse_overrides(list(overrides))


def _coerce(key: str, value, tp, meta) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, str):
            value = split_list(key, value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"a list of {getattr(inner, '__name__', inner)}")
        return [_coerce(f"{key}[{i}]", v, inner, {}) for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0], meta)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if value in (0, 1):
            return bool(value)
        raise ConfigError(key, value, "true or false")
    if tp in (int, float) and isinstance(value, str) and _number(value) is not None:
        value = _number(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
            raise ConfigError(key, value, "an integer")
        value = int(value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        if not math.isfinite(value):  # inf trains a useless model as happily as nan
            raise ConfigError(key, value, "a finite number")
        value = float(value)
    elif tp is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(key, value, "a string")
        value = str(value)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(map(str, choices)))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(key, value, f">= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(key, value, (f">= {lo} and " if lo is not None else "") + f"<= {hi}")
    return value


def build_section(section: str, cls: type, values: dict[str, Any]):
    """Instantiate dataclass ``cls`` from ``values``; unknown keys and bad values are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in fields:
            hint = did_you_mean(f"{section}.{name}", [f"{section}.{f}" for f in fields])
            raise ConfigError(f"{section}.{name}", value, f"a key of '{section}': " + ", ".join(fields), hint)
        kwargs[name] = _coerce(f"{section}.{name}", value, hints[name], fields[name].metadata)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(section)  # cross-field rules; raises ConfigError
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", str(path), "an existing YAML file")
    try:
        text = p.read_text()
        _check_yaml_tree(path, yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("config", str(path), f"valid YAML; {getattr(err, 'problem', None) or 'a syntax error'}{where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("config", str(path), f"a readable UTF-8 YAML file ({err})") from None
    except RecursionError:  # thousands of nested brackets
        raise ConfigError("config", str(path), "a YAML file of keys and values (this one nests too deep to read)") from None
    if not isinstance(data, dict):
        raise ConfigError("config", str(path), "a YAML mapping of keys to values")
    return _flatten(data)


YAML_MAX_VALUES = 10_000  # a config file holds tens of values; aliases that expand to more are an attack or a mistake


def _check_yaml_tree(path, root) -> None:
    """What ``yaml.safe_load`` lets through silently: a key given twice (the last wins, hiding the
    first, maybe invalid, value) and aliases (``*a``) that expand to more than
    YAML_MAX_VALUES values (a "billion laughs" file: small on disk, huge once read). Works on the
    composed node tree, where an alias is the same node object again: sizes are memoised, so
    nothing is expanded here."""
    sizes: dict[int, int] = {}
    first: dict[str, int] = {}  # dotted key -> its line: `run.epochs: 2` and `run: {epochs: 3}` are one key too

    def size(node, prefix: str) -> int:
        if id(node) in sizes:  # an alias of a node already measured (and checked)
            return sizes[id(node)]
        sizes[id(node)] = 1  # a node that contains itself (a recursive alias) counts once
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = f"{prefix}{key.value}" if isinstance(key, yaml.ScalarNode) else None
                if name is not None and name in first and key.value != "<<":
                    raise ConfigError(name, str(path), f"each key once: given at line {first[name]} and again at line {key.start_mark.line + 1} (the last would silently win)")
                if name is not None:
                    first[name] = key.start_mark.line + 1
                total += size(key, prefix) + size(value, f"{name}." if name is not None else prefix)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item, f"{prefix}[{i}].") for i, item in enumerate(node.value))
        sizes[id(node)] = total
        return total

    if root is not None and (n := size(root, "")) > YAML_MAX_VALUES:
        raise ConfigError("config", str(path), f"a YAML file of at most {YAML_MAX_VALUES} values once its aliases (*name) are expanded (this one expands to {n})")


def resolve(overrides: dict[str, Any] | list[str] | None = None, yaml_path: str | Path | None = None) -> Config:
    """Defaults <- preset <- YAML file <- overrides; then typed, validated and frozen into a Config."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update(_as_dict(overrides))
    if "config" in values:  # `config=path.yaml` on the command line
        path = values.pop("config")
        rest = values
        values = load_yaml(path)
        values.update(rest)
    values = {SHORTCUTS.get(k, k): v for k, v in values.items()}

    preset_name = str(values.pop("preset", "") or "")
    preset_values: dict[str, Any] = {}
    if preset_name:
        preset = registry.get_preset(preset_name)
        if "backbone" in values and values["backbone"] != preset.backbone:
            raise ConfigError("backbone", values["backbone"], f"'{preset.backbone}' (the backbone of preset '{preset_name}'), or drop one of them")
        values.setdefault("backbone", preset.backbone)
        preset_values = {f"{preset.backbone}.{k}": v for k, v in preset.values.items()}

    method = str(values.pop("method", Config.method))
    backbone = str(values.pop("backbone", Config.backbone))
    m_entry = registry.get_method(method)
    b_entry = registry.get_backbone(backbone)
    if m_entry.backbones and backbone not in m_entry.backbones:
        raise ConfigError("backbone", backbone, f"one of {', '.join(m_entry.backbones)} for method '{method}'")

    sections: dict[str, dict[str, Any]] = {name: {} for name in [*FIXED_SECTIONS, method, backbone]}
    for key, value in {**preset_values, **values}.items():
        head, _, rest = key.partition(".")
        if head not in sections or not rest:
            allowed = ", ".join([*SHORTCUTS, "method", "backbone", "preset", "config"] + [f"{s}.*" for s in sections])
            raise ConfigError(key, value, f"a known key: {allowed}", did_you_mean(key, _known_keys(sections, m_entry, b_entry, method, backbone)))
        sections[head][rest] = value

    cfg = Config(method=method, backbone=backbone, preset=preset_name)
    for name, cls in FIXED_SECTIONS.items():
        setattr(cfg, name, build_section(name, cls, sections[name]))
    if cfg.run.init_from and "://" not in cfg.run.init_from:  # Ray workers run in folders of their own
        cfg.run.init_from = str(Path(cfg.run.init_from).expanduser().absolute())
    if cfg.data.root and "://" not in cfg.data.root:  # and so do Ray Tune trials: a relative root would name their folder
        cfg.data.root = str(Path(cfg.data.root).expanduser().absolute())
    cfg.method_cfg = build_section(method, m_entry.config_cls, sections[method])
    _settle_backbone_options(cfg, sections[method])
    cfg.backbone_cfg = build_section(backbone, b_entry.config_cls, sections[backbone])
    _validate_cross(cfg)
    return cfg


def _settle_backbone_options(cfg: Config, given: dict[str, Any]) -> None:
    """Method options the backbone does not implement (RANet has no gradient rescaling): set
    explicitly, a ConfigError; left at their default, set to the value the backbone behaves as, so
    that the config (and its hash) says what is trained and two labels never train one model."""
    for name, reason in registry.unsupported_options(cfg.backbone, cfg.method_cfg).items():
        off = registry.METHOD_OPTIONS[name]
        if name in given and getattr(cfg.method_cfg, name) != off:
            raise ConfigError(f"{cfg.method}.{name}", getattr(cfg.method_cfg, name), f"{off!r} with backbone={cfg.backbone}: {reason}")
        setattr(cfg.method_cfg, name, off)


def _known_keys(sections, m_entry, b_entry, method: str, backbone: str) -> list[str]:
    """Every dotted key of this config, for "did you mean" suggestions."""
    classes = {**FIXED_SECTIONS, method: m_entry.config_cls, backbone: b_entry.config_cls}
    keys = [f"{name}.{f.name}" for name, cls in classes.items() if name in sections for f in dataclasses.fields(cls)]
    return [*SHORTCUTS, "method", "backbone", "preset", "config", *keys]


def _validate_cross(cfg: Config) -> None:
    if cfg.data.name == "imagefolder" and not cfg.data.root:
        raise ConfigError("data.root", cfg.data.root, "a folder or .zip in ImageNet layout (train/<class>/..., val|test/<class>/...) for dataset imagefolder")
    if cfg.run.amp == "fp16" and not cfg.run.use_gpu:
        raise ConfigError("run.amp", cfg.run.amp, "none or bf16 unless run.use_gpu=true (fp16 with loss scaling is a GPU path)")
    if any(b <= 0 for b in cfg.eval.budgets):
        raise ConfigError("eval.budgets", cfg.eval.budgets, "positive budgets in MMACs per image")
    if cfg.run.kill_after_epoch >= 0 and cfg.run.num_workers == 0:
        raise ConfigError("run.kill_after_epoch", cfg.run.kill_after_epoch, "-1 with run.num_workers=0 (the fault injection kills a Ray Train worker; in-process it would kill the driver)")
    values = cfg.sweep.values
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise ConfigError("sweep.values", values, f"distinct values (repeated: {', '.join(map(str, dup))}); use sweep.repeats for seeds")
    if cfg.data.heldout == 0:
        wants = [k for k, on in (("eval.budgets", bool(cfg.eval.budgets)), ("eval.num_budgets", cfg.eval.num_budgets > 0), ("eval.p_grid", cfg.eval.p_grid)) if on]
        if wants:
            raise ConfigError(
                "data.heldout", 0,
                f"a held-out split (> 0 or -1) for budgeted evaluation ({', '.join(wants)}): its thresholds are calibrated on held-out data. "
                "For anytime evaluation only, add eval.num_budgets=0 eval.p_grid=false",
            )
    _check_soft_targets(cfg)
    ms = cfg.optim.milestones
    if any(not 0 < m < 1 for m in ms) or ms != sorted(ms):
        raise ConfigError("optim.milestones", ms, "increasing fractions of the epochs, each in (0, 1), e.g. [0.5, 0.75]")


def soft_target_keys(cfg: Config) -> list[str]:
    """The keys that make training targets class probabilities rather than class indices."""
    on = {"data.mixup": cfg.data.mixup, "data.cutmix": cfg.data.cutmix, "optim.label_smoothing": cfg.optim.label_smoothing}
    return [k for k, v in on.items() if v > 0]


def _check_soft_targets(cfg: Config) -> None:
    """MixUp, CutMix and label smoothing hand the method [B, classes] probabilities as targets; a
    method declares that its losses take them (``soft_targets = True``: cross-entropy on
    probabilities, and labels only through ``dynlab.recipe.hard_labels``)."""
    keys = soft_target_keys(cfg)
    if keys and not getattr(registry.get_method(cfg.method).cls, "soft_targets", False):
        key = keys[0]
        raise ConfigError(key, cfg.flat()[key], f"0 with method={cfg.method}: its losses take class indices only, not the soft targets this key makes")


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a saved config.yaml)."""
    return resolve(_flatten(copy.deepcopy(d)))


def cli_config(argv: list[str]) -> Config:
    """Resolve from command-line ``key=value`` arguments (``config=file.yaml`` loads a file first)."""
    return resolve(parse_overrides(argv))
