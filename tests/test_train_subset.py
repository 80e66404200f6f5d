"""``data.train_subset=N``: a seeded, class-stratified subset of the training split (no Ray)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dynlab import config
from dynlab import data as D
from dynlab.config import DataConfig
from dynlab.errors import ConfigError

# synthetic at 8 px: its images are generated per index, so small ones keep the label reads fast
DATASETS = {
    "digits": dict(name="digits"),
    "synthetic": dict(name="synthetic", image_size=8, synthetic_train=400, synthetic_classes=5),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNLAB_CACHE", str(tmp_path / "cache"))


def _bundle(dataset: str, seed: int = 0, **over) -> D.DataBundle:
    return D.build_datasets(DataConfig(**DATASETS[dataset], **over), seed=seed)


def _label_of(bundle: D.DataBundle):
    """Training-set index -> class, read through the held-out (eval) dataset's items, not the code's label lists."""
    full = bundle.heldout.dataset
    return lambda i: int(full[int(i)][1])


@pytest.mark.parametrize("dataset", DATASETS)
def test_subset_is_stratified_inside_the_training_split(dataset):
    full = _bundle(dataset)
    n = 100
    sub = _bundle(dataset, train_subset=n)
    label = _label_of(full)
    split = Counter(label(i) for i in full.train_indices)
    picked = Counter(label(i) for i in sub.train_indices)

    idx = sub.train_indices
    assert idx.dtype == np.int64 and len(idx) == n and np.array_equal(idx, np.sort(idx)) and len(np.unique(idx)) == n
    assert set(idx.tolist()) <= set(full.train_indices.tolist())  # inside the split, so disjoint from held-out
    assert np.array_equal(sub.heldout_indices, full.heldout_indices)  # held-out and test unchanged
    assert len(sub.test) == len(full.test)
    assert len(sub.train) == n and list(sub.train.indices) == idx.tolist()  # what training reads
    assert set(picked) == set(split)  # every class of the split has an image
    total = sum(split.values())
    for c, count in split.items():
        assert abs(picked[c] - n * count / total) < 1, (c, picked[c], n * count / total)


@pytest.mark.parametrize("dataset", DATASETS)
def test_one_image_per_class_at_the_smallest_subset(dataset):
    full = _bundle(dataset)
    k = full.info.num_classes
    sub = _bundle(dataset, train_subset=k)
    label = _label_of(full)
    assert Counter(label(i) for i in sub.train_indices) == {c: 1 for c in range(k)}


@pytest.mark.parametrize("dataset", DATASETS)
def test_same_seed_same_subset_other_seed_other(dataset):
    a, b = _bundle(dataset, train_subset=50), _bundle(dataset, train_subset=50)
    other = _bundle(dataset, seed=1, train_subset=50)
    assert np.array_equal(a.train_indices, b.train_indices)
    assert not np.array_equal(a.train_indices, other.train_indices)


def test_subset_is_not_the_first_images_of_each_class():
    """Within a class the pick is a seeded permutation, not the class's lowest indices."""
    full, sub = _bundle("digits"), _bundle("digits", train_subset=100)
    label = _label_of(full)
    lowest = {c: sorted(i for i in full.train_indices.tolist() if label(i) == c)[:10] for c in range(10)}
    assert any(sorted(i for i in sub.train_indices.tolist() if label(i) == c) != lowest[c] for c in range(10))


@pytest.mark.parametrize("dataset", DATASETS)
def test_zero_leaves_the_split_as_before(dataset):
    cfg = DataConfig(**DATASETS[dataset])
    n_train = 1297 if dataset == "digits" else cfg.synthetic_train
    expected_train, expected_held = D.heldout_split(n_train, cfg.heldout, 0, cfg.name)
    b = _bundle(dataset, train_subset=0)
    assert np.array_equal(b.train_indices, expected_train) and np.array_equal(b.heldout_indices, expected_held)


def test_the_whole_split_is_the_split():
    full, sub = _bundle("digits"), _bundle("digits", train_subset=997)  # 1297 - 300 held out
    assert np.array_equal(sub.train_indices, full.train_indices)


@pytest.mark.parametrize("n, fragment", [(998, "1 image per class .. 997"), (9, "at least one image per class (10 classes)")])
def test_preflight_and_build_refuse_what_does_not_fit(n, fragment):
    for step in (lambda: D.check(DataConfig(name="digits", train_subset=n)), lambda: _bundle("digits", train_subset=n)):
        with pytest.raises(ConfigError) as e:
            step()
        assert "data.train_subset" in str(e.value) and fragment in str(e.value), str(e.value)


def test_the_held_out_size_sets_the_limit():
    D.check(DataConfig(name="digits", heldout=0, train_subset=1297))  # no held-out: every training image
    with pytest.raises(ConfigError, match="after the 1000 held-out"):
        D.check(DataConfig(name="digits", heldout=1000, train_subset=298))


def test_train_subset_changes_the_train_hash():
    base = config.cli_config([])
    assert base.data.train_subset == 0
    assert config.cli_config(["data.train_subset=100"]).train_hash() != base.train_hash()
    assert config.cli_config(["data.train_subset=100"]).train_hash() != config.cli_config(["data.train_subset=200"]).train_hash()
