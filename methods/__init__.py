"""Methods and backbones. Importing this package fills dynlab's registries."""

from methods import backbones  # noqa: F401  (registers backbones and presets)
from methods import boostnet, joint  # noqa: F401  (registers methods)
from methods import imta  # noqa: F401  (IMTA: gradient equilibrium, ISC, one-for-all KD)
from methods import adn  # noqa: F401  (ADN: adaptive-depth networks)
from methods import dmnn  # noqa: F401  (DMNN: gated sub-blocks trained towards a FLOPs target)
