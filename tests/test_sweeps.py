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


def test_trials_stopped_by_the_scheduler_are_closed_or_salvaged(in_tmp):
    """Tune kills a trial's actor when its scheduler stops it. Stopped before its last epoch, the
    training is published as stopped early (trained on by a sweep without ASHA); after the last
    epoch (ASHA at max_t), as finished; both runs FINISHED. Stopped before any checkpoint: KILLED."""
    import torch

    from dynlab import training

    base = config.cli_config(["epochs=2"])
    early, late, none = sweeps.expand(base, grid={"boostnet.temperature": [0.0, 0.5, 1.0]})
    parent = tracking.open_run("close-test", "parent")
    runs = {t.id: tracking.open_run("close-test", t.id, tags={"dynlab.trial": t.id}, parent_run_id=parent.run_id) for t in (early, late, none)}
    runs[late.id].end("FAILED")  # how Tune's stop reaches a trial function: an exception in fit()
    storage = str(in_tmp / "runs")
    for t, last_epoch in ((early, 0), (late, 1)):
        ckpt = in_tmp / "runs" / sweeps.train_run_name("close-test", t.train_key) / f"epoch_{last_epoch:04d}"
        ckpt.mkdir(parents=True)
        torch.save({"epoch": last_epoch, "best_score": 90.0, "best_epoch": last_epoch}, ckpt / training.STATE_FILE)
        torch.save({}, ckpt / training.BEST_FILE)
        (ckpt / "config.yaml").write_text(t.cfg().to_yaml())
    cache = in_tmp / "cache"
    sweeps.finish_stopped_trials([early, late, none], parent, "close-test", storage, cache)
    assert runs[early.id].status() == "FINISHED" and runs[late.id].status() == "FINISHED" and runs[none.id].status() == "KILLED"
    stopped = sweeps.cached_training(cache, early.train_key)
    assert stopped["stopped_early"] == {"epochs": 1, "of": 2} and sweeps.stopped_note(stopped) == "stopped by ASHA after 1/2 epochs"
    assert not sweeps.needs_training(cache, early, base.with_overrides(["sweep.asha=true"]))  # what ASHA asked for
    assert sweeps.needs_training(cache, early, base)  # without ASHA: trained on
    assert sweeps.cached_training(cache, late.train_key)["run_id"] == runs[late.id].run_id
    assert "stopped_early" not in sweeps.cached_training(cache, late.train_key)
    assert sweeps.cached_training(cache, none.train_key) is None
    assert parent.status() == "RUNNING"


def test_expand_refuses_a_repeated_point_naming_sweep_values():
    from dynlab.errors import ConfigError

    with pytest.raises(ConfigError, match="sweep.values.*temperature=0.25"):
        sweeps.expand(config.cli_config([]), grid={"boostnet.temperature": [0.25, 0.25]})
