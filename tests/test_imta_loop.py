"""IMTA's two phases through the real training loop (in-process, run.num_workers=0): phase II starts
from phase I's best.pt given as run.init_from, trains only what its config leaves trainable, and a
resumed phase-II run keeps its own weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import methods  # noqa: F401
from dynlab import config, training

SMALL = ["method=imta", "dataset=synthetic", "data.synthetic_train=64", "data.synthetic_test=32", "data.synthetic_classes=3", "data.batch_size=16", "workers=0", "optim.lr=0.05", "msdnet.n_blocks=2"]


def test_phase2_trains_from_phase1_and_keeps_it_frozen(in_tmp, monkeypatch):
    calls = []
    load = training.init_from
    monkeypatch.setattr(training, "init_from", lambda loop: (calls.append(loop.cfg.run.init_from), load(loop)))
    p1 = training.fit(config.cli_config([*SMALL, "epochs=1"]), "imta-p1")
    p1_weights = torch.load(Path(p1.checkpoint_dir) / "best.pt", weights_only=True)

    cfg2 = config.cli_config([*SMALL, "epochs=1", "imta.phase=2", "imta.isc=true", "imta.ofa=true", f"run.init_from={p1.checkpoint_dir}"])
    p2 = training.fit(cfg2, "imta-p2")
    assert calls == [p1.checkpoint_dir]  # phase I has no init_from; phase II loads it once
    p2_weights = torch.load(Path(p2.checkpoint_dir) / "best.pt", weights_only=True)
    assert set(p1_weights) < set(p2_weights)
    for k, v in p1_weights.items():  # the whole phase-I network, BatchNorm statistics included
        assert torch.equal(p2_weights[k], v), k
    new = [k for k in p2_weights if k.startswith(("classifiers.", "isc.")) and k.endswith("weight")]
    assert new and all(k not in p1_weights for k in new)

    # a second epoch of the same run resumes its own checkpoint: init_from is not loaded again
    cfg3 = cfg2.with_overrides({"run.epochs": 2})
    p3 = training.fit(cfg3, "imta-p2")
    assert p3.metrics["epoch"] == 1 and calls == [p1.checkpoint_dir]  # resumed: not loaded again
    state = torch.load(Path(p3.checkpoint_dir) / "state.pt", weights_only=True)
    p2_state = torch.load(Path(p2.checkpoint_dir) / "state.pt", weights_only=True)
    moved = [k for k in new if not torch.equal(state["model"][k], p2_state["model"][k])]
    assert moved  # trained on from its own epoch-0 weights
