import json

import pytest

from dynlab import config, sweeps, tracking


def test_expand_grid_random_extra_and_repeats_are_deterministic():
    base = config.cli_config(["sweep.repeats=2", "sweep.num_samples=3", "seed=7"])
    grid = {"boostnet.temperature": [0.0, 0.5]}
    random = {"optim.lr": ("loguniform", 1e-3, 1e-1), "boostnet.gradient_rescale": ("choice", [True, False])}
    trials = sweeps.expand(base, grid=grid, random=random, extra=[{"method": "joint"}])
    assert len(trials) == (2 * 3 + 1) * 2
    assert trials == sweeps.expand(base, grid=grid, random=random, extra=[{"method": "joint"}])  # same seed, same trials
    assert len({t.id for t in trials}) == len(trials)
    seeds = sorted({t.cfg().run.seed for t in trials})
    assert seeds == [7, 8]
    for t in trials:
        cfg = t.cfg()
        assert t.train_key == cfg.train_hash()
        if cfg.method == "boostnet":
            assert 1e-3 <= cfg.optim.lr <= 1e-1 and cfg.method_cfg.temperature in (0.0, 0.5)
    other = sweeps.expand(config.cli_config(["sweep.repeats=2", "sweep.num_samples=3", "seed=8"]), grid=grid, random=random)
    assert [t.cfg().optim.lr for t in other] != [t.cfg().optim.lr for t in trials if t.cfg().method == "boostnet"]


def test_expand_validates_every_trial_config():
    from dynlab.errors import ConfigError

    with pytest.raises(ConfigError, match="boostnet.temperature"):
        sweeps.expand(config.cli_config([]), grid={"boostnet.temperature": [0.5, -1.0]})


def test_training_cache_is_published_atomically(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "best.pt").write_bytes(b"weights")
    (ckpt / "config.yaml").write_text("a: 1")
    cache = tmp_path / "cache"
    # a half-written entry (crash before result.json) is not a result
    (cache / "train" / "abc").mkdir(parents=True)
    (cache / "train" / "abc" / "best.pt").write_bytes(b"partial")
    assert sweeps.cached_training(cache, "abc") is None
    (cache / "train" / "abc" / "best.pt").unlink()
    (cache / "train" / "abc").rmdir()
    done = sweeps.publish_training(cache, "abc", str(ckpt), {"train_key": "abc", "run_id": "r1"})
    assert done["run_id"] == "r1" and (cache / "train" / "abc" / "best.pt").read_bytes() == b"weights"
    assert json.loads((cache / "train" / "abc" / "result.json").read_text())["train_key"] == "abc"
    assert list((cache / ".tmp").iterdir()) == []


def test_runs_of_trials_stopped_early_are_closed(in_tmp):
    parent = tracking.open_run("close-test", "parent")
    stopped = tracking.open_run("close-test", "trial", parent_run_id=parent.run_id)
    finished = tracking.open_run("close-test", "trial2", parent_run_id=parent.run_id)
    finished.end()
    sweeps.close_open_children(parent, "close-test")
    assert stopped.status() == "KILLED" and finished.status() == "FINISHED" and parent.status() == "RUNNING"
