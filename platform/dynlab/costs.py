"""Cost counting with the convention shared by the early-exit reference codebases (REFERENCE.md 1).

Costs are *measured* from a model by running one forward pass with hooks on its modules, never
typed in by hand. Per sample (the batch dimension is divided out):

- convolutions: ``Cin * Cout * kh * kw * Hout * Wout / groups`` multiply-adds (bias not counted);
- ReLU (and ReLU6): one op per input element;
- average and max pooling: ``C * Hout * Wout * kh * kw`` (adaptive pooling: the kernel is the
  input/output size ratio, rounded up);
- Linear: weights + bias (``in * out + out``) per row;
- BatchNorm, interpolation, concatenation, additions and anything else: not counted.

That is the ``"reference"`` convention, the default. The ``"adn-paper"`` convention (the counter of
the ADN paper, ptflops' rule) adds normalisation layers on top of it: BatchNorm (1d/2d/3d),
LayerNorm, GroupNorm and InstanceNorm count two ops per output element (normalise, then scale and
shift), one when the layer has no affine parameters; everything else is counted as above. Choose it
per call (``measure_total(model, shape, convention="adn-paper")``) or for every measurement made
inside a block, models that measure themselves included (an ADN network's ``cost_table``)::

    with costs.convention("adn-paper"):
        table = model.cost_table

A model that caches its cost table keeps the convention it was first measured in.

Parameters: every parameter of a module (BatchNorm included) counts once, the first time the module
executes; a module that runs several times adds its MACs every time. Cumulative costs per exit are
snapshots of the running totals taken when each exit module finishes its forward, so the cost of
exit k includes everything executed before it, earlier heads included.

This module imports neither ``methods`` nor ``pipelines``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "CONVENTIONS",
    "CostTable",
    "CostCounter",
    "convention",
    "count_forward",
    "current_convention",
    "module_macs",
    "measure_exits",
    "measure_total",
]

# name -> what it counts (shown by pipelines.costs)
CONVENTIONS = {
    "reference": "convs, linears, ReLU and pooling (the early-exit references' counter)",
    "adn-paper": "normalisation layers counted too, 2 ops per output element (the ADN paper's counter)",
}
_CONVENTION: contextvars.ContextVar[str] = contextvars.ContextVar("dynlab_costs_convention", default="reference")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RELU = (nn.ReLU, nn.ReLU6)
_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_POOL = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_NORM = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def _check(name: str) -> str:
    if name not in CONVENTIONS:
        raise ValueError(f"cost convention {name!r}: expected one of {', '.join(CONVENTIONS)}")
    return name


def current_convention() -> str:
    """The convention measurements use when none is given (``"reference"`` unless inside :func:`convention`)."""
    return _CONVENTION.get()


@contextlib.contextmanager
def convention(name: str):
    """Measure in convention ``name`` (a key of :data:`CONVENTIONS`) inside the block, including
    measurements that models make of themselves; the previous convention is restored on exit."""
    token = _CONVENTION.set(_check(name))
    try:
        yield name
    finally:
        _CONVENTION.reset(token)


def _norm_ops(module: nn.Module, output: Any) -> float:
    """The ADN paper's normalisation cost: 2 ops per output element (1 without affine parameters)."""
    if not isinstance(output, torch.Tensor):
        return 0.0
    affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
    return float(_per_sample(output) * (2 if affine else 1))


@dataclass
class CostTable:
    """Cumulative cost of every exit, in execution order: ``macs[k]`` and ``params[k]`` are totals
    of everything executed up to the end of exit ``k`` (earlier exits included)."""

    macs: list[float]
    params: list[int]
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.macs) != len(self.params):
            raise ValueError(f"CostTable: {len(self.macs)} MAC counts for {len(self.params)} parameter counts")
        if not self.names:
            self.names = [f"exit{k}" for k in range(len(self.macs))]
        if len(self.names) != len(self.macs):
            raise ValueError(f"CostTable: {len(self.names)} names for {len(self.macs)} exits")

    def __len__(self) -> int:
        return len(self.macs)

    @property
    def mmacs(self) -> list[float]:
        return [m / 1e6 for m in self.macs]

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "macs": [float(m) for m in self.macs], "params": [int(p) for p in self.params]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostTable":
        return cls(macs=[float(m) for m in d["macs"]], params=[int(p) for p in d["params"]], names=list(d.get("names", [])))

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "exit": list(range(len(self))),
                "name": self.names,
                "macs": [float(m) for m in self.macs],
                "mmacs": self.mmacs,
                "params": [int(p) for p in self.params],
            }
        )


def _per_sample(t: torch.Tensor) -> int:
    """Elements of one sample of a batched tensor."""
    return t[0].numel() if t.dim() > 0 and t.shape[0] > 0 else 0


def _pair(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def module_macs(module: nn.Module, inputs: tuple, output: Any, convention: str | None = None) -> float:
    """Multiply-adds of one call of ``module`` for one sample; 0 for uncounted module types.
    ``convention``: a key of :data:`CONVENTIONS`; default: :func:`current_convention`."""
    if isinstance(module, _NORM):
        conv = _check(convention) if convention is not None else current_convention()
        return _norm_ops(module, output) if conv == "adn-paper" else 0.0
    if isinstance(module, _CONV):
        if not isinstance(output, torch.Tensor):
            return 0.0
        spatial = math.prod(output.shape[2:])
        # weight: [Cout, Cin/groups, *k] -> Cout*Cin*prod(k)/groups per output position
        return float(module.weight.numel() * spatial)
    if isinstance(module, _RELU):
        x = inputs[0] if inputs else output
        return float(_per_sample(x)) if isinstance(x, torch.Tensor) else 0.0
    if isinstance(module, _POOL):
        if not isinstance(output, torch.Tensor):
            output = output[0]  # MaxPool with return_indices
        dims = output.dim() - 2
        k = math.prod(_pair(module.kernel_size, dims))
        return float(_per_sample(output) * k)
    if isinstance(module, _ADAPTIVE_POOL):
        if not isinstance(output, torch.Tensor):
            output = output[0]
        x = inputs[0]
        k = math.prod(math.ceil(i / o) for i, o in zip(x.shape[2:], output.shape[2:]))
        return float(_per_sample(output) * k)
    if isinstance(module, nn.Linear):
        x = inputs[0]
        rows = _per_sample(x) // module.in_features if x.dim() > 1 else 1
        per_row = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
        return float(per_row * max(rows, 1))
    return 0.0


class CostCounter:
    """Running MAC and parameter totals of the modules of ``model`` while the context is open.

    >>> with CostCounter(model, marks=heads) as counter:
    ...     model(x)
    >>> counter.macs, counter.params, counter.snapshots  # snapshots: {mark index: (macs, params)}

    ``marks`` are modules after whose forward the running totals are recorded (the last call wins
    when a mark runs several times). Hooks are removed when the context closes, even on error.
    ``convention`` (a key of :data:`CONVENTIONS`) is fixed when the counter is made; default:
    :func:`current_convention`.
    """

    def __init__(self, model: nn.Module, marks: Sequence[nn.Module] = (), convention: str | None = None):
        self.model = model
        self.convention = _check(convention) if convention is not None else current_convention()
        self.marks = list(marks)
        self._mark_index = {id(m): i for i, m in enumerate(self.marks)}
        if len(self._mark_index) != len(self.marks):
            raise ValueError("CostCounter: the same module is given twice as a mark")
        self.macs = 0.0
        self.params = 0
        self.snapshots: dict[int, tuple[float, int]] = {}
        self._seen_params: set[int] = set()
        self._handles: list = []

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        for p in module.parameters(recurse=False):
            if id(p) not in self._seen_params:
                self._seen_params.add(id(p))
                self.params += p.numel()
        self.macs += module_macs(module, inputs, output, self.convention)
        k = self._mark_index.get(id(module))
        if k is not None:
            self.snapshots[k] = (self.macs, self.params)

    def __enter__(self) -> "CostCounter":
        modules = list(self.model.modules())
        known = {id(m) for m in modules}
        for m in self.marks:
            if id(m) not in known:
                raise ValueError(f"CostCounter: mark {type(m).__name__} is not a sub-module of the model")
        try:
            for m in modules:
                self._handles.append(m.register_forward_hook(self._hook))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


def _input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(shape, device=device, dtype=dtype)


def count_forward(
    model: nn.Module, input_shape: Sequence[int], marks: Sequence[nn.Module] = (), convention: str | None = None
) -> CostCounter:
    """Count one forward pass of ``model`` on a zero input of ``input_shape`` (``(C, H, W)`` or
    ``(1, C, H, W)``), in eval mode under no_grad; the modules' train/eval modes are restored
    afterwards. Returns the closed :class:`CostCounter` (totals, and a snapshot per mark).
    ``convention``: see :class:`CostCounter`."""
    modes = [(m, m.training) for m in model.modules()]
    x = _input(model, input_shape)
    counter = CostCounter(model, marks, convention)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, mode in modes:
            m.training = mode
    return counter


def _names(model: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    by_id = {id(m): name for name, m in model.named_modules()}
    return [by_id.get(id(m), f"exit{k}") or f"exit{k}" for k, m in enumerate(modules)]


def measure_exits(
    model: nn.Module, input_shape: Sequence[int], exit_modules: Sequence[nn.Module], convention: str | None = None
) -> CostTable:
    """Cumulative MACs and parameters at each exit, in the order of ``exit_modules``.

    ``input_shape`` is ``(C, H, W)`` or ``(1, C, H, W)``. Raises if an exit never runs or the exits
    run out of the given order (cumulative costs would then not be increasing by construction).
    """
    exit_modules = list(exit_modules)
    counter = count_forward(model, input_shape, exit_modules, convention)
    missing = [k for k in range(len(exit_modules)) if k not in counter.snapshots]
    if missing:
        raise ValueError(f"measure_exits: exit module(s) {missing} did not run in the forward pass")
    macs = [counter.snapshots[k][0] for k in range(len(exit_modules))]
    params = [counter.snapshots[k][1] for k in range(len(exit_modules))]
    if any(b < a for a, b in zip(macs, macs[1:])):
        raise ValueError("measure_exits: exits ran in a different order than given (cumulative MACs decrease)")
    return CostTable(macs=macs, params=params, names=_names(model, exit_modules))


def measure_total(model: nn.Module, input_shape: Sequence[int], convention: str | None = None) -> tuple[float, int]:
    """MACs and parameters of one whole forward pass (only modules that execute count)."""
    counter = count_forward(model, input_shape, convention=convention)
    return counter.macs, counter.params
