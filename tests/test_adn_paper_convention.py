"""Why ADN-MobileNetV2's measured cost is 4% below the authors' published one. The ``"adn-paper"``
convention is a counting rule, not a model change: normalisation layers add 2 ops per output
element (scale and shift; 1 without affine), as ptflops counts them. It was chosen so that our
MobileNetV2 matches the authors' release (wchkang/depth README: super-net 0.32, base-net 0.22 GMACs
at 224x224; the paper's v1 Table 1 prints base-net 0.25 for another split, see tests/published.py),
and is what to use when putting our costs beside the ADN papers'. ResNet-50 (4.11 / 2.58, the
same in both sources) agrees under either convention, so it checks the rule on a network it was
not chosen for. The default convention (the early-exit references') is unchanged by the option."""

import pytest
import torch
from torch import nn

from dynlab import costs
from tests.presets import preset_model
from tests.published import adn_release_macs

PAPER = {"adn-mobilenetv2": adn_release_macs("mobilenetv2"), "adn-resnet50": adn_release_macs("resnet50")}  # super-net, base-net
# the default (reference) convention's numbers, as pinned in test_adn_presets: the option must not move them
REFERENCE = {"adn-mobilenetv2": (306943784, 209599208), "adn-resnet50": (4100700648, 2568676840)}


def _bn_elements(model: nn.Module, name: str) -> int:
    """Output elements (one sample) of every BatchNorm2d that runs in sub-network ``name``,
    counted by hooks of this test, independently of dynlab.costs."""
    total = [0]
    hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + o[0].numel())) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 224, 224), skip=name)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


@pytest.mark.parametrize("preset", list(PAPER))
def test_paper_costs_within_two_percent_under_the_adn_paper_convention(preset):
    model = preset_model(preset)  # ImageNet: 1000 classes, 224x224
    n = model.num_stages
    for name, paper, reference in zip(("F" * n, "T" * n), PAPER[preset], REFERENCE[preset]):  # super-net, base-net
        default, params = model.subnet_cost(name)
        with costs.convention("adn-paper"):
            paper_macs, paper_params = model.subnet_cost(name)
        assert abs(paper_macs - paper) / paper < 0.02, (preset, name, paper_macs / 1e9)
        # the default is the reference convention, and 4% under the paper for MobileNetV2
        assert default == reference, (preset, name, default)
        # exactly two ops per BatchNorm output element more; parameters do not depend on the convention
        assert paper_macs - default == 2 * _bn_elements(model, name)
        assert paper_params == params

