"""Per-exit MACs and parameters of every preset, pinned to exact integers so they cannot drift.

The numbers were produced by ``python -m pipelines.costs preset=<name> --json`` on the day they
were checked against the reference implementations' own counter (they matched). A change to a
backbone or to the counting convention that moves any of them fails here; if the change is
intended, re-derive the numbers the same way and say why in the commit.
"""

from __future__ import annotations

import pytest

import methods  # noqa: F401  (registers backbones and presets)
from dynlab import registry
from tests.presets import preset_model

# preset -> (cumulative MACs per exit, cumulative parameters per exit)
PINNED = {
    "msdnet-cifar100-b7": (
        [15140452, 25505992, 37095980, 46331024, 57335540, 66960728, 75937724],
        [433876, 876792, 1274952, 1695548, 2178352, 2603252, 3067960],
    ),
    "msdnet-cifar100-b10": (
        [15140452, 25505992, 37788460, 52061840, 62181620, 74070872, 87729596, 100038944, 110121860, 121679336],
        [433876, 876792, 1381628, 1827836, 2279536, 2793444, 3369560, 3864948, 4378040, 4955644],
    ),
    "msdnet-cifar100-b6": (
        [15140452, 25751240, 33659180, 43336592, 51822068, 60307544],
        [433876, 783712, 1157652, 1593800, 1988348, 2431552],
    ),
    "msdnet-cifar100-lingrow5": (
        [6859876, 14350024, 27536684, 41714576, 58480628],
        [299704, 649740, 1018308, 1492424, 2078924],
    ),
    "msdnet-cifar100-lingrow7": (
        [6859876, 14350024, 27291436, 48448912, 76432628, 108850520, 137280956],
        [299704, 649740, 1111388, 1727200, 2384968, 3052244, 3966664],
    ),
    "msdnet-imagenet-s4": (
        [339902824, 685456720, 1008156120, 1254472688, 1360529624],
        [4238504, 8772240, 13073272, 16748416, 23958440],
    ),
    "msdnet-imagenet-s5": (
        [422731560, 933845008, 1453512760, 1915234016, 2156907688],
        [5569800, 11798672, 17423864, 29475808, 38754952],
    ),
    "msdnet-imagenet-s6": (
        [514661608, 1171181872, 1844515080, 2501402480, 2742059056],
        [7076712, 15689808, 24014008, 42187744, 56529304],
    ),
    "msdnet-imagenet-s7": (
        [615692968, 1436392016, 2283210200, 2967421456, 3253794488],
        [8759240, 20154896, 31730040, 41860288, 62314472],
    ),
    "ranet-cifar100-anytime": (
        [15826020, 31306440, 44690220, 50404752, 60712628, 63717656, 90255228, 94997472],
        [482052, 1097000, 1511586, 1914854, 2223662, 2523154, 2952906, 3354710],
    ),
    "ranet-cifar100-budgeted1": (
        [8372324, 21788360, 32878892, 41570192, 53283828, 58990680],
        [358660, 899880, 1304995, 1800711, 2188193, 2617261],
    ),
    "ranet-cifar100-budgeted2": (
        [10739812, 24155848, 35246380, 43937680, 93068276, 114677336, 164023356, 175743648],
        [367940, 909160, 1314275, 1809991, 2717647, 3685779, 4462599, 5186987],
    ),
    "ranet-cifar100-budgeted3": (
        [10748004, 24164040, 35254572, 43945872, 55659508, 61366360, 105640124, 117360416],
        [360996, 902216, 1307331, 1803047, 2190529, 2619597, 3336189, 4060577],
    ),
    "ranet-imagenet-c32": (
        [246472360, 631164048, 860403190, 1041144878, 1869847124, 2160379452, 2734279235, 2828311039],
        [9916712, 37916432, 48345820, 65121348, 85601768, 113060656, 121474513, 131123991],
    ),
    "ranet-imagenet-c64": (
        [434968808, 888669904, 1153356020, 1352449308, 2279913603, 2588473759, 3235517799, 3333484943],
        [14083432, 48077136, 60103248, 78659176, 100951482, 130170440, 139095138, 149144186],
    ),
}


def test_every_registered_early_exit_preset_is_pinned():
    # DMNN and ADN presets are pinned beside their own tests (test_dmnn_presets, test_adn*)
    assert {n for n, p in registry.PRESETS.items() if p.backbone in ("msdnet", "ranet")} == set(PINNED)


@pytest.mark.parametrize("name", list(PINNED))  # all 14 build in ~6 s on 2 cores, so none is marked slow
def test_preset_costs_are_pinned(name):
    macs, params = PINNED[name]
    table = preset_model(name).cost_table
    assert [int(m) for m in table.macs] == macs
    assert [m == int(m) for m in table.macs] == [True] * len(macs)  # MACs are whole numbers
    assert list(table.params) == params
