"""Numbers from the literature that tests compare our measurements with, each with its source.

ADN's costs (GMACs per 224x224 image; the papers' "GFLOPs" are multiply-accumulates) exist in two
versions that disagree on two base-nets:
- the paper as we have it, arXiv v1 (../shared/papers/004_3723f3367b703e3b.txt, Table 1);
- the authors' later release, the NeurIPS 2024 code (wchkang/depth, README "Model Zoo"), whose
  MobileNetV2 and Swin-T split their stages differently. Our default splits (presets adn-mobilenetv2,
  adn-swin-t) follow this release; the presets adn-mobilenetv2-v1 and adn-swin-t-v1 have splits that
  fit v1. Each preset is compared with its own source.
"""

ADN_PAPER_V1 = "../shared/papers/004_3723f3367b703e3b.txt, Table 1"
ADN_RELEASE = "wchkang/depth README, Model Zoo"

# architecture -> source -> (super-net, base-net) in GMACs
ADN_COSTS = {
    "resnet50": {ADN_PAPER_V1: (4.11, 2.58), ADN_RELEASE: (4.11, 2.58)},
    "vit_b16": {ADN_PAPER_V1: (17.58, 11.76), ADN_RELEASE: (17.58, 11.76)},
    "swin_t": {ADN_PAPER_V1: (4.49, 2.69), ADN_RELEASE: (4.49, 2.34)},
    "mobilenetv2": {ADN_PAPER_V1: (0.32, 0.25), ADN_RELEASE: (0.32, 0.22)},
}


def adn_macs(arch: str, source: str) -> tuple[float, float]:
    """(super-net, base-net) cost of ``arch`` in MACs, as ``source`` prints it."""
    return tuple(g * 1e9 for g in ADN_COSTS[arch][source])


def adn_release_macs(arch: str) -> tuple[float, float]:
    """The release's (super-net, base-net) cost of ``arch`` in MACs: what our default splits must give."""
    return adn_macs(arch, ADN_RELEASE)
