"""DMNN ResNet (Dynamic Multi-path Neural Network, paper 002 / REFERENCE.md section 5).

Every bottleneck block is split into ``subblocks`` parallel sub-blocks (1x1 -> 3x3 -> 1x1, each
with its own narrower width) whose widths are chosen so that the split block keeps the parameter
count of the original bottleneck (eqs. 1-3 of the paper; :func:`subblock_width`). The block output
is ``ReLU(shortcut(x) + sum_i g_i * subblock_i(x))`` with gates g_i in {0, 1} from a per-block
controller (:class:`Controller`): ``e = ReLU(FC(GAP(x)))`` to ``hidden`` units,
``h = ReLU(e + FC(h_prev))``, gate logits from ``h``.

Three ways to run the same weights:
- ``forward`` (training and the "masked" reference): every sub-block runs on every sample and is
  multiplied by its gate; training samples gates with Gumbel noise (straight-through);
- ``forward_skipping`` (inference): each sub-block runs only on the samples whose gate is open
  (gathered, run, scattered back), so the executed work follows the gates;
- ``force_gates`` = 1.0 / 0.0 opens / closes every gate (tests, dense reference).

``gated=false`` builds no controllers and runs every sub-block: with ``subblocks=1`` that is the
unmodified ResNet (the dense baseline of the sweeps).

Costs are measured once at build with :mod:`dynlab.costs` (every gate open) into ``cost_table``:
the fixed part (stem, shortcuts, head), every sub-block, every controller and the dense total.
The executed cost of a sample is fixed + its open sub-blocks + every controller.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dynlab.config import bounded, choice
from dynlab.costs import CostCounter, CostTable
from dynlab.errors import ConfigError
from dynlab.registry import DatasetInfo, register_backbone, register_preset


@dataclass
class DMNNResNetConfig:
    layers: list[int] = field(default_factory=lambda: [1, 1, 1], metadata={"help": "bottleneck blocks per stage (ResNet-50: 3,4,6,3)"})
    widths: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"help": "bottleneck width per stage (output = width * expansion)"})
    stem_channels: int = bounded(16, 1, help="channels of the stem convolution")
    stem: str = choice("cifar", "cifar", "imagenet", help="cifar: 3x3 conv; imagenet: 7x7/2 conv + 3x3/2 max-pool")
    expansion: int = bounded(1, 1, help="bottleneck expansion (output channels = width * expansion; ResNet-50: 4)")
    subblocks: int = bounded(2, 1, help="N: sub-blocks per block")
    hidden: int = bounded(32, 1, help="controller hidden size")
    gate_open_init: float = bounded(0.85, 0.01, 0.99, help="initial probability that a gate is open (gate bias)")
    gated: bool = field(default=True, metadata={"help": "false: no controllers, every sub-block runs (the dense network)"})

    def validate(self, section: str) -> None:
        if not self.layers or any(n < 1 for n in self.layers):
            raise ConfigError(f"{section}.layers", self.layers, "a non-empty list of positive block counts")
        if len(self.widths) != len(self.layers) or any(w < 1 for w in self.widths):
            raise ConfigError(f"{section}.widths", self.widths, f"{len(self.layers)} positive widths, one per stage of {section}.layers")


def bottleneck_params(c_in: int, width: int, c_out: int) -> int:
    """Convolution weights of one bottleneck path: 1x1 c_in->w, 3x3 w->w, 1x1 w->c_out."""
    return c_in * width + 9 * width * width + width * c_out


def subblock_width(c_in: int, width: int, c_out: int, n: int) -> int:
    """Width w' of each of ``n`` sub-blocks such that n * params(w') ~= params(w) (paper eq. 1 = eq. 2).

    n * (a w' + 9 w'^2) = a w + 9 w^2 with a = c_in + c_out: the positive root, rounded.
    Plain w/n would drop the 3x3 weights to 1/n of the original (eq. 3)."""
    if n == 1:
        return width
    a = c_in + c_out
    target = bottleneck_params(c_in, width, c_out)
    root = (-n * a + math.sqrt((n * a) ** 2 + 36 * n * target)) / (18 * n)
    return max(1, round(root))


class SubBlock(nn.Sequential):
    """One path of a split bottleneck: 1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 -> BN."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )


class Controller(nn.Module):
    """Gate logits [B, N, 2] (index 1 = open) and the state h [B, hidden] passed to the next block."""

    def __init__(self, c_in: int, hidden: int, n: int, has_prev: bool, open_init: float):
        super().__init__()
        self.n = n
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(c_in, hidden)
        self.embed_relu = nn.ReLU()
        self.prev = nn.Linear(hidden, hidden) if has_prev else None
        self.state_relu = nn.ReLU() if has_prev else None
        self.gate = nn.Linear(hidden, 2 * n)
        # small weights, bias favouring "open": P(open) = sigmoid(bias_on - bias_off) with Gumbel noise
        nn.init.normal_(self.gate.weight, 0.0, 0.01)
        with torch.no_grad():
            self.gate.bias.view(n, 2)[:, 0] = 0.0
            self.gate.bias.view(n, 2)[:, 1] = math.log(open_init / (1 - open_init))

    def forward(self, x: torch.Tensor, h_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embed_relu(self.embed(torch.flatten(self.pool(x), 1)))
        h = e if self.prev is None else self.state_relu(e + self.prev(h_prev))
        return self.gate(h).view(-1, self.n, 2), h


class _HardStraightThrough(torch.autograd.Function):
    """Forward: exactly 0 or 1 (p_open > 0.5, the argmax of two classes). Backward: the gradient
    passes to the soft sample unchanged. (``hard + soft - soft.detach()`` is not exactly 0/1 in
    floating point.)"""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sample_gates(logits: torch.Tensor, training: bool, tau: float) -> torch.Tensor:
    """[B, N, 2] logits -> [B, N] gates, exactly 0 or 1. Training: Gumbel-softmax with a hard
    forward and the soft sample's gradient (straight-through). Evaluation: no noise, argmax."""
    if not training:
        return (logits[..., 1] > logits[..., 0]).to(logits.dtype)
    u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)[..., 1]
    return _HardStraightThrough.apply(soft)


class GatedBlock(nn.Module):
    def __init__(self, c_in: int, width: int, c_out: int, stride: int, n: int, controller: Controller | None):
        super().__init__()
        w = subblock_width(c_in, width, c_out, n)
        self.subs = nn.ModuleList(SubBlock(c_in, w, c_out, stride) for _ in range(n))
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.controller = controller
        self.relu = nn.ReLU(inplace=False)

    def masked(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every sub-block on every sample, times its gate ([B, N])."""
        out = self.shortcut(x)
        for i, sub in enumerate(self.subs):
            out = out + gates[:, i].view(-1, 1, 1, 1).to(out.dtype) * sub(x)
        return self.relu(out)

    def skipping(self, x: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Each sub-block only on the samples whose gate is open; also the sample count per sub-block.
        Same additions in the same order as :meth:`masked` (adding g*s with g = 1 is adding s)."""
        out = self.shortcut(x).clone()
        counts = []
        for i, sub in enumerate(self.subs):
            idx = torch.nonzero(gates[:, i] > 0.5).squeeze(1)
            counts.append(int(idx.numel()))
            if idx.numel():
                out.index_add_(0, idx, sub(x.index_select(0, idx)).to(out.dtype))
        return self.relu(out), counts


class DMNNResNet(nn.Module):
    """Stem -> gated bottleneck blocks -> GAP -> linear. See the module docstring."""

    def __init__(self, cfg: DMNNResNetConfig, num_classes: int, in_channels: int = 3):
        super().__init__()
        s = cfg.stem_channels
        if cfg.stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, s, 7, 2, 3, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True))
        self.gated, self.n, self.hidden = cfg.gated, cfg.subblocks, cfg.hidden
        blocks, c_in, self.stage_of_block = [], s, []
        for stage, (count, width) in enumerate(zip(cfg.layers, cfg.widths)):
            c_out = width * cfg.expansion
            for j in range(count):
                stride = 2 if stage > 0 and j == 0 else 1
                ctrl = Controller(c_in, cfg.hidden, cfg.subblocks, bool(blocks), cfg.gate_open_init) if cfg.gated else None
                blocks.append(GatedBlock(c_in, width, c_out, stride, cfg.subblocks, ctrl))
                self.stage_of_block.append(stage)
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.category_heads: nn.ModuleList | None = None  # training only (add_category_heads)
        self.force_gates: float | None = None  # 1.0 / 0.0: every gate open / closed
        self.tau = 1.0  # Gumbel-softmax temperature (set by the method)
        self.last_counts: list[list[int]] = []  # samples run per sub-block by the last forward_skipping
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def add_category_heads(self, num_categories: int) -> None:
        """One linear category classifier per controller state (category supervision; training only)."""
        if self.gated and num_categories > 0:
            self.category_heads = nn.ModuleList(nn.Linear(self.hidden, num_categories) for _ in self.blocks)

    def _gates(self, block: GatedBlock, x, h):
        """Gates [B, N] of one block, the controller state, and the gate logits (None when not gated)."""
        if block.controller is None or self.force_gates is not None:
            value = 1.0 if self.force_gates is None else self.force_gates
            logits, h = (block.controller(x, h) if block.controller is not None else (None, h))
            return torch.full((x.shape[0], self.n), value, dtype=x.dtype, device=x.device), h, logits
        logits, h = block.controller(x, h)
        return sample_gates(logits.float(), self.training, self.tau), h, logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Masked computation. Returns ``logits`` [B, C], ``gates`` [B, blocks * N] (block-major),
        ``categories`` (per block [B, K] category logits, training with heads only)."""
        x = self.stem(x)
        h, gates, cats = None, [], []
        for b, block in enumerate(self.blocks):
            g, h, _ = self._gates(block, x, h)
            if self.training and self.category_heads is not None and h is not None:
                cats.append(self.category_heads[b](h))
            gates.append(g)
            x = block.masked(x, g)
        logits = self.fc(torch.flatten(self.pool(x), 1))
        return {"logits": logits, "gates": torch.cat(gates, 1), "categories": cats}

    @torch.no_grad()
    def forward_skipping(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference that really skips closed sub-blocks: ``(logits [B, C], gates [B, blocks * N])``.
        ``last_counts[b][i]`` is how many samples sub-block i of block b ran on."""
        x = self.stem(x)
        h, gates, self.last_counts = None, [], []
        for block in self.blocks:
            g, h, _ = self._gates(block, x, h)
            gates.append(g)
            x, counts = block.skipping(x, g)
            self.last_counts.append(counts)
        return self.fc(torch.flatten(self.pool(x), 1)), torch.cat(gates, 1)

    # ---------------------------------------------------------------- costs

    def executed_macs(self, gates: torch.Tensor) -> torch.Tensor:
        """Executed MACs per sample [B] (float64, differentiable in the gates): the fixed part + the
        open sub-blocks + every controller, from the costs measured at build."""
        return self.fixed_macs + self.controller_macs + gates.double() @ self.sub_macs.to(gates.device)


@contextlib.contextmanager
def _forced_open(model: DMNNResNet):
    before = model.force_gates
    model.force_gates = 1.0
    try:
        yield
    finally:
        model.force_gates = before


def measure_costs(model: DMNNResNet, input_shape: tuple[int, ...]) -> CostTable:
    """Measure (every gate open, eval mode, one sample) the fixed part, each sub-block, each
    controller and the dense total; store the per-sample cost terms on the model."""
    parts: dict[str, nn.Module] = {}
    for b, block in enumerate(model.blocks):
        for i, sub in enumerate(block.subs):
            parts[f"block{b}.sub{i}"] = sub
        if block.controller is not None:
            parts[f"block{b}.controller"] = block.controller
    modes = [(m, m.training) for m in model.modules()]
    p = next(model.parameters())
    x = torch.zeros((1, *input_shape[-3:]), device=p.device, dtype=p.dtype)
    try:
        model.eval()
        with torch.no_grad(), _forced_open(model), contextlib.ExitStack() as stack:
            total = stack.enter_context(CostCounter(model))
            counters = {name: stack.enter_context(CostCounter(m)) for name, m in parts.items()}
            model(x)
    finally:
        for m, mode in modes:
            m.training = mode
    fixed_macs = total.macs - sum(c.macs for c in counters.values())
    fixed_params = total.params - sum(c.params for c in counters.values())
    subs = [n for n in parts if ".sub" in n]
    ctrls = [n for n in parts if n.endswith("controller")]
    model.fixed_macs = float(fixed_macs)
    model.controller_macs = float(sum(counters[n].macs for n in ctrls))
    model.register_buffer("sub_macs", torch.tensor([counters[n].macs for n in subs], dtype=torch.float64), persistent=False)
    dense_macs = fixed_macs + sum(counters[n].macs for n in subs)
    dense_params = fixed_params + sum(counters[n].params for n in subs)
    model.dense_macs = float(dense_macs)
    names = ["fixed", *parts, "dense total"]
    macs = [fixed_macs, *(counters[n].macs for n in parts), dense_macs]
    params = [fixed_params, *(counters[n].params for n in parts), dense_params]
    return CostTable(macs=[float(m) for m in macs], params=[int(q) for q in params], names=names)


@register_backbone("dmnn_resnet", DMNNResNetConfig)
def build_dmnn_resnet(cfg: DMNNResNetConfig, info: DatasetInfo) -> DMNNResNet:
    """DMNN bottleneck ResNet (CIFAR or ImageNet stem): gated sub-blocks and controllers."""
    model = DMNNResNet(cfg, info.num_classes, info.channels)
    model.cost_table = measure_costs(model, (info.channels, info.image_size, info.image_size))
    return model


_R50 = {"layers": [3, 4, 6, 3], "widths": [64, 128, 256, 512], "stem_channels": 64, "expansion": 4}
register_preset("dmnn-resnet-small", "dmnn_resnet", "digits", "small CIFAR-style DMNN ResNet: 3 stages of 1 block, widths 16-32-64, expansion 1, N=2 (trains in seconds)", layers=[1, 1, 1], widths=[16, 32, 64], stem_channels=16, expansion=1, subblocks=2)
register_preset("dmnn-resnet50", "dmnn_resnet", "cifar100", "DMNN-50 at CIFAR resolution (3x3 stem, no max-pool), N=4", stem="cifar", subblocks=4, **_R50)
register_preset("dmnn-resnet50-n2", "dmnn_resnet", "cifar100", "DMNN-50 at CIFAR resolution, N=2", stem="cifar", subblocks=2, **_R50)
register_preset("dmnn-resnet50-imagenet", "dmnn_resnet", "imagenet", "DMNN-50 for ImageNet (7x7/2 stem + max-pool), N=4", stem="imagenet", subblocks=4, **_R50)
register_preset("dmnn-resnet101-imagenet", "dmnn_resnet", "imagenet", "DMNN-101 for ImageNet, N=4", stem="imagenet", subblocks=4, **{**_R50, "layers": [3, 4, 23, 3]})
