"""A sweep of more than sweeps.MAX_TRIALS trials is asked for explicitly (sweep.allow_large=true):
a stray sweep.repeats=100000 or a pasted list of 1,000 values would otherwise start them all."""

from __future__ import annotations

import time

import pytest

from dynlab import config, sweeps
from dynlab.errors import ConfigError


def test_a_sweep_over_the_limit_names_the_key_that_makes_it_large():
    base = config.cli_config(["sweep.repeats=100000"])
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        sweeps.expand(base, grid={"boostnet.temperature": [0.5, 1.0]})
    assert time.monotonic() - t0 < 1  # refused before 200,000 trial configs are resolved
    assert info.value.key == "sweep.repeats" and "200000 (2 point(s) x 100000 seed(s))" in str(info.value)

    values = [i / 1000 for i in range(sweeps.MAX_TRIALS + 1)]
    with pytest.raises(ConfigError) as info:
        sweeps.expand(config.cli_config([]).with_overrides({"sweep.values": values}), grid={"boostnet.temperature": values})
    assert info.value.key == "sweep.values" and "sweep.allow_large=true" in str(info.value)

    with pytest.raises(ConfigError) as info:
        sweeps.expand(config.cli_config(["sweep.num_samples=500"]), random={"optim.lr": ("loguniform", 1e-3, 1e-1)})
    assert info.value.key == "sweep.num_samples"


def test_the_limit_itself_and_allow_large_pass():
    grid = {"boostnet.temperature": [i / 100 for i in range(sweeps.MAX_TRIALS // 2)]}
    assert len(sweeps.expand(config.cli_config(["sweep.repeats=2"]), grid=grid)) == sweeps.MAX_TRIALS
    big = sweeps.expand(config.cli_config(["sweep.repeats=3", "sweep.allow_large=true"]), grid=grid)
    assert len(big) == 3 * len(grid["boostnet.temperature"]) > sweeps.MAX_TRIALS


def test_allow_large_does_not_change_what_is_cached():
    a, b = config.cli_config([]), config.cli_config(["sweep.allow_large=true"])
    assert a.hash() == b.hash() and a.train_hash() == b.train_hash()
