"""dynlab: a Ray-distributed experiment platform for adaptive-inference networks.

The platform knows methods only through the protocol in :mod:`dynlab.registry`;
it never imports ``methods`` or ``pipelines``.
"""

__version__ = "0.1.0"
