"""Parts every ADN backbone shares: skip-aware norms kept inside a block and swapped in while the
block runs in a skipped stage, and the measured cost of every sub-network."""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Iterator

from torch import nn

from dynlab import costs

NORMS = (nn.BatchNorm2d, nn.LayerNorm)


def mandatory_count(n_blocks: int) -> int:
    """Blocks in a stage's mandatory half: min(n-1, ceil(n/2)) (ResNet-50 [3,4,6,3] -> [2,2,3,2])."""
    return min(n_blocks - 1, (n_blocks + 1) // 2)


def subnet_names(stages: int) -> list[str]:
    """Every sub-network, base-net first and super-net last (``TTTT`` ... ``FFFF``)."""
    return ["".join(p) for p in itertools.product("TF", repeat=stages)]


def parse_skip(skip, stages: int) -> list[bool]:
    """``None`` (super-net), a name like ``"TFFT"`` or a list of bools -> one bool per stage."""
    if skip is None:
        return [False] * stages
    if isinstance(skip, str):
        if len(skip) != stages or set(skip) - {"T", "F"}:
            raise ValueError(f"skip {skip!r}: expected {stages} letters T/F, one per stage")
        return [c == "T" for c in skip]
    skip = [bool(s) for s in skip]
    if len(skip) != stages:
        raise ValueError(f"skip has {len(skip)} entries for {stages} stages")
    return skip


def add_skip_norms(block: nn.Module, paths: dict[str, str] | None = None) -> None:
    """Give ``block`` a second copy of each of its norm layers (``block.skip_norms``: same init,
    separate parameters and running statistics). ``paths``: skip-norm key -> path of the norm it
    stands in for (default: every norm of the block, keyed by its path with ``_`` for ``.``);
    recorded as ``block.skip_norm_paths``."""
    if paths is None:
        paths = {name.replace(".", "_"): name for name, m in block.named_modules() if isinstance(m, NORMS)}
    block.skip_norms = nn.ModuleDict({k: copy.deepcopy(block.get_submodule(p)) for k, p in paths.items()})
    block.skip_norm_paths = dict(paths)


@contextlib.contextmanager
def skip_norms_in(block: nn.Module, active: bool) -> Iterator[None]:
    """While open (and ``active``), ``block`` runs with its second norm set in place of the first:
    the block's own forward is reused unchanged. The original modules are put back on exit."""
    if not active or not hasattr(block, "skip_norms"):
        yield
        return
    swapped = []
    try:
        for key, path in block.skip_norm_paths.items():
            parent_path, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            swapped.append((parent, leaf, parent._modules[leaf]))
            parent._modules[leaf] = block.skip_norms[key]
        yield
    finally:
        for parent, leaf, original in reversed(swapped):
            parent._modules[leaf] = original


# ---- torchvision weights -------------------------------------------------------------------------

SKIP_NORMS = ".skip_norms."  # in the state-dict key of every skip-aware norm tensor


def skip_norm_pairs(net: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(name, skip-aware norm, the main norm it stands in for) for every skip-aware norm of ``net``."""
    for name, block in net.named_modules():
        if hasattr(block, "skip_norms") and hasattr(block, "skip_norm_paths"):
            for key, path in block.skip_norm_paths.items():
                yield f"{name}.skip_norms.{key}", block.skip_norms[key], block.get_submodule(path)


def copy_main_norms(net: nn.Module) -> None:
    """Every skip-aware norm becomes a copy of its main norm (weights, biases, running statistics),
    so that the base-net starts from the loaded norms (as the ADN reference does)."""
    for _, skip, main in skip_norm_pairs(net):
        skip.load_state_dict(main.state_dict())


def torchvision_mismatches(net: nn.Module, state_dict: dict) -> list[str]:
    """What keeps ``state_dict`` from being a torchvision state dict of ``net``'s architecture: keys
    it lacks (other than the skip-aware norms, which torchvision has not), keys ``net`` lacks (the
    skip-aware norms included: a state dict holding them is an ADN checkpoint), tensors of another
    shape. Empty when it loads."""
    import torch

    own = net.state_dict()
    out = [f"{k} (not a tensor)" for k, v in state_dict.items() if not torch.is_tensor(v)]
    out += [f"{k} (a skip-aware norm: torchvision has none, this is an ADN checkpoint)" for k in state_dict if SKIP_NORMS in k]
    out += [f"{k} (not in this {type(net).__name__})" for k in state_dict if k not in own and SKIP_NORMS not in k]
    out += [f"{k} (missing)" for k in own if k not in state_dict and SKIP_NORMS not in k]
    out += [f"{k} (shape {tuple(v.shape)}, this {type(net).__name__} has {tuple(own[k].shape)})"
            for k, v in state_dict.items() if k in own and torch.is_tensor(v) and v.shape != own[k].shape]
    return out


def load_torchvision(net: nn.Module, state_dict: dict) -> None:
    """Load a torchvision state dict (same keys as torchvision's model; the skip-aware norms may be
    absent, nothing else) into the ADN super-net ``net``, then start every skip-aware norm as a copy
    of its loaded main norm. Anything else is a ValueError naming one offending key."""
    bad = torchvision_mismatches(net, state_dict)
    if bad:
        raise ValueError(f"not a torchvision state dict of this {type(net).__name__}: {len(bad)} key(s) differ, e.g. {bad[0]}")
    net.load_state_dict(state_dict, strict=False)
    copy_main_norms(net)


class TorchvisionWeights:
    """Mixin: ``net.load_torchvision(state_dict)`` (see :func:`load_torchvision`)."""

    def load_torchvision(self, state_dict: dict) -> None:
        load_torchvision(self, state_dict)


class _Subnet(nn.Module):
    """A network with a fixed skip pattern, for cost counting."""

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net, self.name = net, name

    def forward(self, x):
        return self.net(x, skip=self.name)


def measure_with_extras(net: nn.Module, name: str, input_shape) -> tuple[float, int]:
    """dynlab.costs' MACs and parameters of sub-network ``name``, plus what modules with a ``macs``
    method (attention run functionally, matmuls) state for themselves where dynlab.costs counted 0
    (so nothing is counted twice once dynlab.costs learns about them)."""
    import torch

    macs, params = costs.measure_total(_Subnet(net, name), input_shape)
    counted = [m for m in net.modules() if callable(getattr(m, "macs", None))]
    if not counted:
        return macs, params
    extra = [0.0, 0]

    def hook(module, inputs, output):
        if costs.module_macs(module, inputs, output) == 0:
            extra[0] += module.macs(inputs, output)
            extra[1] += module.unhooked_params()

    handles = [m.register_forward_hook(hook) for m in counted]
    modes = [(m, m.training) for m in net.modules()]
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(input_shape), skip=name)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return macs + extra[0], params + extra[1]


class SubnetCosts:
    """Mixin for an ADN network with ``num_stages`` and ``input_shape``: MACs and parameters of
    every sub-network, measured by running it with dynlab.costs."""

    _cost_table: costs.CostTable | None = None

    def subnet_cost(self, name: str) -> tuple[float, int]:
        return measure_with_extras(self, name, self.input_shape)

    @property
    def cost_table(self) -> costs.CostTable:
        """One row per sub-network (base-net first, super-net last), measured once on first use."""
        if self._cost_table is None:
            names = subnet_names(self.num_stages)
            rows = [self.subnet_cost(n) for n in names]
            self._cost_table = costs.CostTable(macs=[r[0] for r in rows], params=[r[1] for r in rows], names=names)
        return self._cost_table
