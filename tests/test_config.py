import dataclasses

import pytest

from dynlab import config
from dynlab.errors import ConfigError


def test_defaults_resolve_to_typed_sections():
    cfg = config.resolve()
    assert cfg.method == "boostnet" and cfg.backbone == "msdnet" and cfg.data.name == "digits"
    assert type(cfg.method_cfg).__name__ == "BoostNetConfig"
    assert type(cfg.backbone_cfg).__name__ == "MSDNetConfig"
    assert cfg.method_cfg.temperature == 0.5


def test_overrides_dotted_keys_shortcuts_and_types():
    cfg = config.cli_config(["method=joint", "epochs=7", "dataset=synthetic", "optim.lr=0.05", "msdnet.n_blocks=3", "joint.gradient_rescale=true", "optim.milestones=[0.3,0.6]"])
    assert cfg.method == "joint" and cfg.run.epochs == 7 and cfg.data.name == "synthetic"
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.backbone_cfg.n_blocks == 3 and cfg.method_cfg.gradient_rescale is True
    assert cfg.optim.milestones == [0.3, 0.6]


@pytest.mark.parametrize(
    "args, key, fragment",
    [
        (["run.epochs=0"], "run.epochs", ">= 1"),
        (["optim.momentum=1.5"], "optim.momentum", "<= 1.0"),
        (["run.amp=fp8"], "run.amp", "one of none, bf16, fp16"),
        (["run.nonsense=1"], "run.nonsense", "a key of 'run'"),
        (["ranet.n_blocks=2"], "ranet.n_blocks", "a known key"),
        (["method=nosuch"], "method", "one of adn, boostnet"),
        (["boostnet.temperature=-1"], "boostnet.temperature", ">= 0.0"),
        (["epochs=two"], "run.epochs", "an integer"),
        (["run.use_gpu=maybe"], "run.use_gpu", "true or false"),
        (["preset=msdnet-nope"], "backbone.preset", "msdnet-cifar100-b7"),
        (["optim.milestones=[0.8,0.2]"], "optim.milestones", "increasing fractions"),
        (["dataset=imagefolder"], "data.root", "ImageNet layout"),
        (["noequals"], "noequals", "key=value"),
    ],
)
def test_bad_values_name_key_value_and_allowed(args, key, fragment):
    with pytest.raises(ConfigError) as info:
        config.cli_config(args)
    err = info.value
    assert err.key == key
    assert key in str(err) and fragment in str(err)


def test_preset_sets_backbone_values_and_overrides_win():
    cfg = config.cli_config(["preset=msdnet-cifar100-b7", "msdnet.growth_rate=8"])
    assert cfg.backbone == "msdnet" and cfg.preset == "msdnet-cifar100-b7"
    assert cfg.backbone_cfg.n_blocks == 7 and cfg.backbone_cfg.growth_rate == 8
    assert cfg.backbone_cfg.n_channels == 16


def test_hash_is_stable_and_ignores_where_results_go():
    a = config.cli_config(["epochs=3"])
    b = config.cli_config(["epochs=3", "run.name=other", "run.experiment=x", "run.storage_path=/tmp/x"])
    c = config.cli_config(["epochs=4"])
    assert a.hash() == b.hash() == config.cli_config(["run.epochs=3"]).hash()
    assert a.hash() != c.hash()
    assert len(a.hash()) == 12


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = config.cli_config(["method=joint", "epochs=2", "msdnet.gr_factor=1-2-4"])
    assert config.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = config.cli_config([f"config={path}", "seed=3"])
    assert again.run.seed == 3 and again.method == "joint" and again.run.epochs == 2
    assert again.backbone_cfg == cfg.backbone_cfg


def test_with_overrides_keeps_other_values():
    cfg = config.cli_config(["method=boostnet", "boostnet.temperature=0.25", "epochs=2"])
    new = cfg.with_overrides(["boostnet.temperature=1.0"])
    assert new.method_cfg.temperature == 1.0 and new.run.epochs == 2
    assert dataclasses.replace(new.method_cfg, temperature=0.25) == cfg.method_cfg


def test_missing_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config"):
        config.cli_config([f"config={tmp_path / 'nope.yaml'}"])


def test_train_hash_ignores_evaluation_and_sweep_settings():
    a = config.cli_config(["epochs=3"])
    b = config.cli_config(["epochs=3", "eval.num_budgets=3", "sweep.max_concurrent=2", "run.predict_batches=2"])
    assert a.train_hash() == b.train_hash() and a.hash() != b.hash()
    assert a.train_hash() != config.cli_config(["epochs=3", "boostnet.temperature=1.0"]).train_hash()


def test_switching_method_drops_the_old_method_section():
    cfg = config.cli_config(["boostnet.temperature=0.25", "epochs=2"])
    joint = cfg.with_overrides({"method": "joint"})
    assert joint.method == "joint" and type(joint.method_cfg).__name__ == "JointConfig" and joint.run.epochs == 2


def test_config_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("a.b", 3, ">= 4")))
    assert (err.key, err.value, err.allowed) == ("a.b", 3, ">= 4") and "a.b" in str(err)


@pytest.mark.parametrize(
    "arg, key, expected",
    [
        ("sweep.values=-0.5,1", "sweep.values", [-0.5, 1.0]),  # a minus sign is part of its number
        ("sweep.values=[-0.5,1]", "sweep.values", [-0.5, 1.0]),
        ("boostnet.temperatures=0,0.5", "temperatures", [0.0, 0.5]),
        ("optim.weight_decay=1e-4", "optim.weight_decay", 1e-4),  # YAML 1.1 reads 1e-4 as a string
        ("optim.lr=5E-2", "optim.lr", 0.05),
        ("optim.lr=1_0", "optim.lr", 10.0),
        ("eval.budgets=[1e-1,2]", "eval.budgets", [0.1, 2.0]),
        ("eval.budgets=1e-1,2.5e0", "eval.budgets", [0.1, 2.5]),
        ("epochs=1e1", "run.epochs", 10),
        ("msdnet.gr_factor=1-2-4", "gr_factor", [1, 2, 4]),  # the MSDNet reference's list form
    ],
)
def test_every_numeric_form_python_reads_and_no_lost_minus_signs(arg, key, expected):
    cfg = config.cli_config([arg])
    section, _, name = key.rpartition(".")
    value = getattr(getattr(cfg, section), name) if section else getattr(cfg.method_cfg if arg.startswith("boostnet") else cfg.backbone_cfg, name)
    assert value == expected and type(value) is type(expected)


def test_negative_values_in_lists_reach_validation_not_silently_dropped():
    with pytest.raises(ConfigError, match=r"boostnet.temperatures' = \[-1.0, 0.5\]"):
        config.cli_config(["boostnet.temperatures=-1,0.5"])


def test_numbers_in_a_yaml_file_in_every_form(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  lr: 5e-2\n  weight_decay: 1e-4\neval:\n  budgets: [1e-1, 2]\nsweep:\n  values: [-0.5, 1]\n")
    cfg = config.cli_config([f"config={f}"])
    assert cfg.optim.lr == 0.05 and cfg.optim.weight_decay == 1e-4
    assert cfg.eval.budgets == [0.1, 2.0] and cfg.sweep.values == [-0.5, 1.0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["boostnet.temprature=0.5"], "did you mean 'boostnet.temperature'?"),
        (["run.epoch=2"], "did you mean 'run.epochs'?"),
        (["optim.weight_dacay=0"], "did you mean 'optim.weight_decay'?"),
        (["epoch=2"], "did you mean 'epochs'?"),
        (["heldout=0"], "did you mean 'data.heldout'?"),
    ],
)
def test_misspelled_keys_suggest_the_closest(args, fragment):
    with pytest.raises(ConfigError) as info:
        config.cli_config(args)
    assert fragment in str(info.value)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("run:\n  epochs: 2\n\tseed: 1\n")
    with pytest.raises(ConfigError) as info:
        config.cli_config([f"config={f}"])
    assert str(f) in str(info.value) and "line 3" in str(info.value)


def test_duplicate_sweep_values_are_refused():
    with pytest.raises(ConfigError, match="distinct values"):
        config.cli_config(["sweep.values=[0.25,0.25]"])


def test_unsupported_backbone_option_is_an_error_when_set_and_off_when_not():
    # RANet has no gradient rescaling: left at its default the config says so (one hash for one
    # model); asked for explicitly it is an error
    a = config.cli_config(["backbone=ranet"])
    b = config.cli_config(["backbone=ranet", "boostnet.gradient_rescale=false"])
    assert a.method_cfg.gradient_rescale is False and a.train_hash() == b.train_hash()
    with pytest.raises(ConfigError, match="gradient_rescale"):
        config.cli_config(["backbone=ranet", "boostnet.gradient_rescale=true"])
    assert config.cli_config([]).with_overrides({"backbone": "ranet"}).method_cfg.gradient_rescale is False


def test_budgeted_evaluation_without_heldout_is_refused_and_anytime_only_is_allowed():
    with pytest.raises(ConfigError, match="eval.num_budgets=0 eval.p_grid=false"):
        config.cli_config(["data.heldout=0"])
    cfg = config.cli_config(["data.heldout=0", "eval.num_budgets=0", "eval.p_grid=false"])
    assert cfg.data.heldout == 0


# ------------------------------------------------------------------ issue 15: names, YAML, long values


@pytest.mark.parametrize("name", ["my-run_1.2", "A", "0", "_x", "x" * config.NAME_MAX])
def test_plain_names_are_accepted(name):
    cfg = config.cli_config([f"run.name={name}", f"run.experiment={name}"])
    assert cfg.run.name == cfg.run.experiment == name


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", ".hidden", "-flag", "a b", "a\tb", "été", "x" * (config.NAME_MAX + 1)])
@pytest.mark.parametrize("key", ["run.name", "run.experiment"])
def test_a_name_that_is_a_path_or_odd_is_refused(key, name):
    with pytest.raises(ConfigError) as info:
        config.resolve({key: name})
    assert info.value.key == key and "ASCII letters, digits" in str(info.value)


def test_a_name_from_a_saved_config_is_checked_too():
    d = config.cli_config([]).to_dict()
    d["run"]["name"] = "../../elsewhere"
    with pytest.raises(ConfigError, match="run.name"):
        config.from_dict(d)


def test_a_huge_value_is_cut_in_the_line_but_kept_whole_on_the_error():
    value = list(range(100_000))
    err = ConfigError("sweep.values", value, "something")
    line = str(err)
    assert len(line) < 400 and "\n" not in line and line.endswith("expected something")
    assert "[0, 1, 2" in line and "99999]" in line and f"({len(repr(value))} characters)" in line
    assert err.value is value  # the program still has the whole value


def test_a_newline_in_a_value_stays_on_one_line():
    assert "\n" not in str(ConfigError("run.name", "a\nb", "x")) and "\n" not in str(ConfigError("a\nb", 1, "x"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("run:\n  epochs: -5\n  seed: 1\n  epochs: 2\n", "'run.epochs'"),  # the invalid first value would be hidden
        ("run.epochs: 2\nrun:\n  epochs: 3\n", "given at line 1 and again at line 3"),
        ("optim:\n  lr: 0.1\n  lr: 0.2\n", "given at line 2 and again at line 3"),
    ],
)
def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path, text, fragment):
    f = tmp_path / "twice.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="each key once") as info:
        config.cli_config([f"config={f}"])
    assert fragment in str(info.value)


def test_yaml_anchors_within_bounds_still_work(tmp_path):
    f = tmp_path / "anchors.yaml"
    f.write_text("eval:\n  budgets: &b [1, 2]\nsweep:\n  values: *b\n")
    cfg = config.cli_config([f"config={f}"])
    assert cfg.eval.budgets == cfg.sweep.values == [1.0, 2.0]


def test_yaml_aliases_expanding_past_the_limit_are_refused_without_expanding(tmp_path):
    import time

    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    f = tmp_path / "laughs.yaml"
    f.write_text("\n".join(levels) + "\n")  # 10^9 values once expanded
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="at most 10000 values") as info:
        config.cli_config([f"config={f}"])
    assert time.monotonic() - t0 < 10 and len(str(info.value)) < 300
