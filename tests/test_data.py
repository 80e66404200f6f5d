"""dynlab.data: datasets, held-out split, transforms, zip extraction, errors."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dynlab.config import DataConfig
from dynlab.errors import ConfigError, DataError
from dynlab import data as D

SHARED_CIFAR_ZIP = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10-jpg.zip"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits():
    return D.build_datasets(DataConfig(name="digits"), seed=0)


# ---------------------------------------------------------------- digits


def test_digits_shapes_sizes_labels(digits):
    b = digits
    assert len(b.train) + len(b.heldout) == 1297 and len(b.test) == 500
    assert len(b.heldout) == 300 and len(b.train) == 997
    assert b.info.name == "digits" and b.info.num_classes == 10 and b.info.image_size == 32
    x, y = b.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated to RGB
    labels = {b.test[i][1] for i in range(len(b.test))}
    assert labels == set(range(10))
    # normalised with the training statistics: roughly zero mean, unit std over the training images
    xs = torch.stack([b.heldout[i][0] for i in range(len(b.heldout))])
    assert abs(float(xs.mean())) < 0.2 and 0.8 < float(xs.std()) < 1.2


def test_digits_test_set_is_fixed_across_run_seeds(digits):
    other = D.build_datasets(DataConfig(name="digits"), seed=7)
    for i in (0, 123, 499):
        a, b = digits.test[i], other.test[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_heldout_split_deterministic_per_seed_and_disjoint(digits):
    same = D.build_datasets(DataConfig(name="digits"), seed=0)
    other = D.build_datasets(DataConfig(name="digits"), seed=1)
    assert np.array_equal(digits.heldout_indices, same.heldout_indices)
    assert np.array_equal(digits.train_indices, same.train_indices)
    assert not np.array_equal(digits.heldout_indices, other.heldout_indices)
    for b in (digits, other):
        h, t = b.heldout_indices, b.train_indices
        assert h.dtype == np.int64 and t.dtype == np.int64
        assert len(np.intersect1d(h, t)) == 0
        assert np.array_equal(np.sort(np.concatenate([h, t])), np.arange(1297))
    # the held-out items are the training-set items at those indices
    full_eval = digits.heldout.dataset
    k = int(digits.heldout_indices[5])
    assert torch.equal(digits.heldout[5][0], full_eval[k][0])


def test_heldout_not_augmented_train_augmented(digits):
    a, b = digits.heldout[3][0], digits.heldout[3][0]
    assert torch.equal(a, b)
    torch.manual_seed(0)
    draws = [digits.train[3][0] for _ in range(12)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # an augmented draw is a shifted copy: its label is unchanged
    assert digits.train[3][1] == digits.train.dataset[int(digits.train_indices[3])][1]


def test_augment_false_serves_eval_transform():
    b = D.build_datasets(DataConfig(name="digits", augment=False), seed=0)
    assert torch.equal(b.train[0][0], b.train[0][0])


def test_heldout_sizes_and_errors():
    b = D.build_datasets(DataConfig(name="digits", heldout=0), seed=0)
    assert len(b.heldout) == 0 and len(b.train) == 1297 and b.heldout_indices.dtype == np.int64
    b = D.build_datasets(DataConfig(name="digits", heldout=100), seed=0)
    assert len(b.heldout) == 100 and len(b.train) == 1197
    with pytest.raises(ConfigError, match="data.heldout") as e:
        D.build_datasets(DataConfig(name="digits", heldout=1297), seed=0)
    assert "1296" in str(e.value)
    with pytest.raises(ConfigError, match="data.heldout"):
        D.build_datasets(DataConfig(name="synthetic", synthetic_train=10, heldout=50), seed=0)


def test_default_heldout_sizes():
    assert D.default_heldout("cifar10", 50_000) == 5000
    assert D.default_heldout("cifar100", 50_000) == 5000
    assert D.default_heldout("digits", 1297) == 300
    assert D.default_heldout("imagefolder", 1_281_167) == 50_000
    assert D.default_heldout("imagefolder", 50_000) == 5000
    assert D.default_heldout("synthetic", 512) == 51


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_per_index_and_sized():
    cfg = DataConfig(name="synthetic", synthetic_train=100, synthetic_test=40, synthetic_classes=5, image_size=48)
    a, b = D.build_datasets(cfg, 0), D.build_datasets(cfg, 3)
    assert len(a.train) + len(a.heldout) == 100 and len(a.heldout) == 10 and len(a.test) == 40
    assert a.info.num_classes == 5 and a.info.image_size == 48
    x, y = a.test[7]
    assert x.shape == (3, 48, 48) and 0 <= y < 5
    assert torch.equal(x, a.test[7][0]) and torch.equal(x, b.test[7][0]) and y == b.test[7][1]
    assert not torch.equal(a.test[7][0], a.test[8][0])
    assert D.dataset_info(cfg) == a.info


def test_synthetic_huge_is_lazy_and_learnable():
    ds = D.SyntheticDataset(10**9, 4, 16, split=0)
    x, y = ds[10**9 - 1]
    assert x.shape == (3, 16, 16) and y == ds.label(10**9 - 1)
    # class-dependent means: per-class average images differ clearly
    small = D.SyntheticDataset(400, 4, 16, split=0)
    items = [small[i] for i in range(400)]
    means = [torch.stack([x for x, y in items if y == c]).mean(0) for c in range(4)]
    assert min((means[i] - means[j]).abs().mean() for i in range(4) for j in range(i + 1, 4)) > 0.3


# ---------------------------------------------------------------- imagefolder


def _tree(root: Path, per_class: int = 3, size: int = 32, test_name: str = "test") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", test_name):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _zip(tree: Path, zip_path: Path, top: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(tree.rglob("*")):
            zf.write(p, (top + "/" if top else "") + p.relative_to(tree).as_posix())
    return zip_path


def _check_tiny(b, n_train=6, n_test=6, heldout=2, size=32):
    assert len(b.train) + len(b.heldout) == n_train and len(b.heldout) == heldout and len(b.test) == n_test
    assert b.info.num_classes == 2 and b.info.image_size == size and b.classes == ["a", "b"]
    x, y = b.test[0]
    assert x.shape == (3, size, size) and x.dtype == torch.float32 and y in (0, 1)
    assert sorted(b.test.targets) == [0, 0, 0, 1, 1, 1]
    assert torch.equal(b.heldout[0][0], b.heldout[0][0])
    assert b.train[0][0].shape == (3, size, size)


def test_imagefolder_folder(tmp_path):
    root = _tree(tmp_path / "tree")
    cfg = DataConfig(name="imagefolder", root=str(root), heldout=2)
    b = D.build_datasets(cfg, seed=0)
    _check_tiny(b)
    assert D.dataset_info(cfg) == b.info
    assert all(os.path.isabs(p) for p, _ in b.test.samples)
    # size override and the default held-out size (10% of 6 -> 1)
    b = D.build_datasets(DataConfig(name="imagefolder", root=str(root), image_size=24), seed=0)
    assert b.info.image_size == 24 and b.test[0][0].shape == (3, 24, 24) and len(b.heldout) == 1


def test_imagefolder_relative_path_made_absolute(tmp_path, monkeypatch):
    _tree(tmp_path / "tree")
    monkeypatch.chdir(tmp_path)
    b = D.build_datasets(DataConfig(name="imagefolder", root="tree", heldout=2), seed=0)
    monkeypatch.chdir("/")  # Ray workers chdir: paths must still resolve
    _check_tiny(b)


def test_imagefolder_large_images_imagenet_style(tmp_path):
    root = _tree(tmp_path / "big", per_class=1, size=80, test_name="val")
    b = D.build_datasets(DataConfig(name="imagefolder", root=str(root), heldout=0), seed=0)
    assert b.info.image_size == 224 and b.test[0][0].shape == (3, 224, 224)
    assert b.train[0][0].shape == (3, 224, 224)


def test_imagefolder_zip_extracted_once(tmp_path, monkeypatch):
    zp = _zip(_tree(tmp_path / "tree"), tmp_path / "tiny.zip", top="tiny")
    cfg = DataConfig(name="imagefolder", root=str(zp), heldout=2)
    info = D.dataset_info(cfg)  # read from the zip index, nothing extracted yet
    assert info.num_classes == 2 and info.image_size == 32
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())

    b = D.build_datasets(cfg, seed=0)
    _check_tiny(b)
    target = D.zip_cache_dir(zp)
    assert target.parent == tmp_path / "cache" and target.name.startswith("tiny-")
    assert b.test.samples[0][0].startswith(str(target))

    def no_extract(*a, **k):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extract)
    b2 = D.build_datasets(cfg, seed=0)
    _check_tiny(b2)
    assert np.array_equal(b.heldout_indices, b2.heldout_indices)
    assert D.dataset_info(cfg) == b.info
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == [target.name]  # no temp dirs left


def test_partial_extraction_not_mistaken_for_complete(tmp_path):
    zp = _zip(_tree(tmp_path / "tree"), tmp_path / "tiny.zip")
    target = D.zip_cache_dir(zp)
    (target / "train" / "a").mkdir(parents=True)  # left by a killed extraction: no completion marker
    (target.parent / f".{target.name}.tmp-dead").mkdir()  # another interrupted one
    b = D.build_datasets(DataConfig(name="imagefolder", root=str(zp), heldout=2), seed=0)
    _check_tiny(b)
    assert (target / D.COMPLETE_MARKER).is_file()


def test_imagefolder_missing_path_and_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        D.build_datasets(DataConfig(name="imagefolder", root=str(missing)), seed=0)
    assert "data.root" in str(e.value) and str(missing) in str(e.value) and "train/<class>" in str(e.value)

    (tmp_path / "flat" / "train" / "a").mkdir(parents=True)  # no val/ or test/
    with pytest.raises(DataError, match="data.root") as e:
        D.build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "flat")), seed=0)
    assert "val/" in str(e.value)

    bad_zip = _zip(tmp_path / "flat", tmp_path / "flat.zip")
    with pytest.raises(DataError, match="data.root"):
        D.build_datasets(DataConfig(name="imagefolder", root=str(bad_zip)), seed=0)
    with pytest.raises(DataError, match="data.root"):
        D.dataset_info(DataConfig(name="imagefolder", root=str(bad_zip)))


# ---------------------------------------------------------------- imagefolder: what the data itself can get wrong


def _save(path: Path, img) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _sized_tree(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """Noise images of the given ``(width, height)`` at the given relative paths."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for rel, (w, h) in sizes.items():
        _save(root / rel, Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return root


def test_a_16_bit_grey_png_is_read_with_its_values_scaled_to_8_bits(tmp_path):
    from PIL import Image

    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    for split in ("train", "test"):
        for c in ("a", "b"):
            _save(tmp_path / "grey" / split / c / "0.png", Image.fromarray(gradient))
    with Image.open(tmp_path / "grey" / "train" / "a" / "0.png") as img:
        assert img.mode.startswith("I")  # what Pillow opens a 16-bit grey PNG as (convert("RGB") clips it to white)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "grey"), heldout=0)
    assert D.check(cfg).image_size == 16
    b = D.build_datasets(cfg, seed=0)
    pixels = np.asarray(D.ImageFolderDataset(b.test.samples, b.classes)[0][0])
    assert pixels.shape == (16, 16, 3) and (pixels[..., 0] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0].astype(int) - np.round(gradient / 257)).max() <= 1  # 0 .. 255, not all 255
    assert pixels.min() == 0 and pixels.max() == 255


def test_classes_are_the_train_folders_holding_images_in_the_check_and_the_dataset(tmp_path):
    root = _tree(tmp_path / "tree")
    (root / "train" / "a" / "nested").mkdir()
    (root / "train" / "a" / "0.png").rename(root / "train" / "a" / "nested" / "0.png")  # images below a class folder count
    (root / "train" / "__MACOSX").mkdir()  # skipped, as hidden files are
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0\1")
    (root / "test" / "notes").mkdir()  # a test folder without images is not a class: ignored
    (root / "test" / "notes" / "README.txt").write_text("about the test set")
    cfg = DataConfig(name="imagefolder", root=str(root), heldout=2)
    b = D.build_datasets(cfg, seed=0)
    assert b.classes == ["a", "b"] and D.check(cfg).num_classes == b.info.num_classes == 2
    assert len(b.train) + len(b.heldout) == 6

    (root / "train" / "docs").mkdir()
    (root / "train" / "docs" / "README.txt").write_text("about the data")  # would be class 0 of 3, never taught
    for call in (lambda: D.check(cfg), lambda: D.build_datasets(cfg, seed=0)):
        with pytest.raises(DataError, match=r"class folder\(s\) train/docs hold no images"):
            call()


def test_the_input_size_is_the_images_one_size_or_224_for_photos_else_data_image_size(tmp_path):
    photos = {f"{s}/{c}/{i}.jpg": size for s in ("train", "val") for c in ("a", "b") for i, size in enumerate([(120, 90), (80, 100)])}
    cfg = DataConfig(name="imagefolder", root=str(_sized_tree(tmp_path / "photos", photos)), heldout=0)
    assert D.check(cfg).image_size == 224  # photos of any sizes: ImageNet-style at 224
    b = D.build_datasets(cfg, seed=0)
    assert b.info.image_size == 224 and b.test[0][0].shape == b.train[0][0].shape == (3, 224, 224)

    tiny = _sized_tree(tmp_path / "tiny", {**photos, "train/a/zz.png": (3, 3)})  # listed last, smallest
    for bad in (DataConfig(name="imagefolder", root=str(tiny)), DataConfig(name="imagefolder", root=str(_sized_tree(tmp_path / "small", {**{k: (32, 32) for k in photos}, "val/b/x.png": (28, 28)})))):
        for call in (lambda: D.check(bad), lambda: D.dataset_info(bad), lambda: D.build_datasets(bad, seed=0)):
            with pytest.raises(DataError, match=r"image sizes disagree \(.* is (3x3|28x28), .*\): .*set data.image_size=N"):
                call()
    b = D.build_datasets(DataConfig(name="imagefolder", root=str(tiny), image_size=48, heldout=0), seed=0)
    assert b.info.image_size == 48 and all(b.train[i][0].shape == (3, 48, 48) for i in range(len(b.train)))


def test_data_image_size_is_bounded_where_the_memory_is():
    D.check_image_size(DataConfig(name="digits", image_size=256))
    D.check_image_size(DataConfig(name="synthetic", image_size=1024))
    for name, size, top in [("digits", 257, "8 .. 256"), ("synthetic", 20000, "8 .. 1024"), ("imagefolder", 4, "8 .. 1024")]:
        with pytest.raises(ConfigError, match=f"'data.image_size' = {size} .*{top} pixels"):
            D.check_image_size(DataConfig(name=name, image_size=size))


def test_only_a_zips_images_are_extracted_and_its_sample_is_the_folders(tmp_path):
    zp = _zip(_tree(tmp_path / "tree"), tmp_path / "tiny.zip")
    with zipfile.ZipFile(zp, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("blob.bin", bytes(4 << 20))  # 4 KB in the zip, 4 MiB extracted: not an image, not extracted
        zf.writestr("train/a/notes.txt", "about class a")
    cfg = DataConfig(name="imagefolder", root=str(zp), heldout=2)
    from_zip = D._imagefolder_index(cfg)
    assert from_zip.base is None and from_zip.zip_bytes == sum(zipfile.ZipFile(zp).getinfo(n).file_size for n, _ in from_zip.train + from_zip.test)
    _check_tiny(D.build_datasets(cfg, seed=0))
    extracted = D.zip_cache_dir(zp)
    assert sorted(p.name for p in extracted.rglob("*") if p.is_file()) == sorted([D.COMPLETE_MARKER] + ["0.png", "1.png", "2.png"] * 4)
    from_folder = D._imagefolder_index(cfg)  # the worker's view: the same images, the same sample
    assert from_folder.base == extracted and from_folder.sample(5) == from_zip.sample(5) and from_folder.classes == from_zip.classes
    assert sorted(from_folder.train) == sorted(from_zip.train)


def test_zip_members_that_are_empty_or_twice_are_named(tmp_path):
    tree = _tree(tmp_path / "tree")
    (tree / "train" / "b" / "0.png").write_bytes(b"")
    zp = _zip(tree, tmp_path / "empty.zip")
    with pytest.raises(DataError, match=r"zip member train/b/0.png is empty \(0 bytes\)"):
        D.dataset_info(DataConfig(name="imagefolder", root=str(zp)))
    zp = _zip(_tree(tmp_path / "tree2"), tmp_path / "twice.zip")
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(zp, "a") as zf:
        zf.writestr("train/a/1.png", (tmp_path / "tree2" / "train" / "a" / "1.png").read_bytes())
    with pytest.raises(DataError, match=r"zip member train/a/1.png appears twice"):
        D.dataset_info(DataConfig(name="imagefolder", root=str(zp)))


def test_an_image_a_loader_worker_cannot_decode_is_one_line_naming_it(tmp_path):
    from torch.utils.data import DataLoader

    root = _tree(tmp_path / "tree", per_class=1)
    cut = root / "train" / "a" / "0.png"
    cut.write_bytes(cut.read_bytes()[:100])  # the header is whole, the pixels are not
    ds = D.build_datasets(DataConfig(name="imagefolder", root=str(root), heldout=0, augment=False), seed=0).train
    with pytest.raises(DataError) as e:
        list(DataLoader(ds, batch_size=1, num_workers=1))  # the worker process's error, re-raised here
    assert "\n" not in str(e.value) and str(e.value).startswith(f"image {cut} cannot be read (") and str(e.value).endswith("replace or remove it")


def test_the_zip_cache_must_take_the_images(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from dynlab import preflight

    zp = _zip(_tree(tmp_path / "tree"), tmp_path / "tiny.zip")
    cfg = DataConfig(name="imagefolder", root=str(zp))
    preflight.check_zip_cache(cfg)  # writable, room enough: nothing left behind
    assert not (tmp_path / "cache").exists()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))  # a nearly full disk
    with pytest.raises(ConfigError, match=r"'DYNLAB_CACHE' .* room for the images of data.root's zip \(0.0 GB to extract, 0.0 GB free\)"):
        preflight.check_zip_cache(cfg)
    monkeypatch.undo()
    D.build_datasets(cfg, seed=0)
    preflight.check_zip_cache(cfg)  # extracted already: nothing to check


def test_init_weights_load_with_integer_buffers_and_from_a_full_state(tmp_path):
    from dynlab import training

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))  # num_batches_tracked: an int64 buffer
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "state.pt")
    assert set(training.read_weights(str(tmp_path / "state.pt"))) == set(model.state_dict())
    torch.save({"1.weight": torch.ones(4), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ConfigError, match=r"a state dict .* this file holds 'epoch' -> int"):
        training.read_weights(str(tmp_path / "mixed.pt"))
    inf = model.state_dict()
    inf["0.bias"][1] = float("inf")
    torch.save(inf, tmp_path / "inf.pt")
    with pytest.raises(ConfigError, match=r"finite weights: tensor '0.bias' holds NaN or inf"):
        training.read_weights(str(tmp_path / "inf.pt"))


# ---------------------------------------------------------------- cifar


def test_cifar_missing_root_errors_without_download(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(tvu, "download_url", no_download)
    monkeypatch.setattr(tvu, "download_and_extract_archive", no_download)
    for name in ("cifar10", "cifar100"):
        root = tmp_path / "empty"
        with pytest.raises(DataError) as e:
            D.build_datasets(DataConfig(name=name, root=str(root)), seed=0)
        msg = str(e.value)
        assert "data.root" in msg and str(root) in msg and "data.download=true" in msg


def test_cifar_info_needs_no_images_but_checks_the_folder(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert D.dataset_info(DataConfig(name="cifar100", root=str(tmp_path))).num_coarse_classes == 20
    assert D.dataset_info(DataConfig(name="cifar10", root=str(tmp_path))).num_classes == 10
    assert D.dataset_info(DataConfig(name="cifar10", root=str(tmp_path), image_size=64)).image_size == 64
    with pytest.raises(DataError, match="data.root"):
        D.dataset_info(DataConfig(name="cifar10", root=str(tmp_path / "elsewhere")))


def test_cifar100_coarse_labels_reader(tmp_path):
    with open(tmp_path / "train", "wb") as f:
        pickle.dump({"fine_labels": [5, 6, 7], "coarse_labels": [1, 19, 0]}, f)
    assert D.read_coarse_labels(tmp_path, "train") == [1, 19, 0]


def _fake_cifar100(root, fine, coarse):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train", "wb") as f:  # the real file's keys, as pickle.load(encoding="latin1") gives them
        pickle.dump({"filenames": [f"{i}.png" for i in range(len(fine))], "fine_labels": fine, "coarse_labels": coarse}, f)
    return DataConfig(name="cifar100", root=str(root))


def test_cifar100_categories_map_each_fine_class_to_its_superclass(tmp_path):
    fine = [i for i in range(100) for _ in range(2)][::-1]  # two samples per class, any order
    cfg = _fake_cifar100(tmp_path, fine, [(f * 7) % 20 for f in fine])
    mapping = D.cifar100_categories(cfg)
    assert mapping == [(f * 7) % 20 for f in range(100)] and sorted(set(mapping)) == list(range(20))
    assert D.class_categories("auto", cfg, 100) == mapping and D.class_categories("none", cfg, 100) is None
    # superclass names from the meta file when there is one, else numbered
    assert D.category_names("auto", cfg, 20) == [f"category {i}" for i in range(20)]
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)], "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    assert D.category_names("auto", cfg, 20)[19] == "super19"


def test_cifar100_categories_refuse_a_missing_or_inconsistent_fine_class(tmp_path):
    no_42 = [f for f in range(100) if f != 42]
    with pytest.raises(DataError, match=r"data.root.*no sample of fine class\(es\) \[42\]"):
        D.cifar100_categories(_fake_cifar100(tmp_path / "a", no_42, [f // 5 for f in no_42]))
    twice = list(range(100)) + [3]
    with pytest.raises(DataError, match=r"fine class 3 has two superclasses \(0 and 7\)"):
        D.cifar100_categories(_fake_cifar100(tmp_path / "b", twice, [f // 5 for f in range(100)] + [7]))
    with pytest.raises(DataError, match="fine and coarse labels"):
        D.cifar100_categories(_fake_cifar100(tmp_path / "c", list(range(100)), [0] * 99))  # one label short
    folder = tmp_path / "d" / "cifar-100-python"
    folder.mkdir(parents=True)
    with open(folder / "train", "wb") as f:
        pickle.dump({"fine_labels": list(range(100))}, f)  # no coarse labels at all
    with pytest.raises(DataError, match="fine and coarse labels"):
        D.cifar100_categories(DataConfig(name="cifar100", root=str(tmp_path / "d")))
    with pytest.raises(DataError, match="unknown fine class"):
        D.cifar100_categories(_fake_cifar100(tmp_path / "e", [*range(100), 100], [*(f // 5 for f in range(100)), 0]))


def test_static_info_kept():
    assert D.static_info("cifar100").num_classes == 100
    with pytest.raises(ConfigError):
        D.static_info("nope")


# ---------------------------------------------------------------- CIFAR-10 as JPEGs in a zip (the README's command)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The order in which the shared zip lists its class folders: not sorted, so a class index that
# followed the zip's order instead of the names would show.
SHARED_ZIP_CLASS_ORDER = ["bird", "frog", "dog", "automobile", "airplane", "ship", "cat", "truck", "deer", "horse"]


def cifar10_jpg_zip(path: Path, train_per_class: int, test_per_class: int) -> Path:
    """A small zip in the layout of ../shared/datasets/cifar10-jpg.zip (that folder's README; checked
    against the real zip where it is present): no top folder, a directory entry per folder,
    ``train/<class>/<nnnn>.jpg`` and ``test/<class>/<nnnn>.jpg``, stored uncompressed, 32 x 32 RGB
    baseline JPEGs. Each image is its class's colour plus noise, so a model can learn it."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            zf.mkdir(split)
            for name in SHARED_ZIP_CLASS_ORDER:
                zf.mkdir(f"{split}/{name}")
                colour = np.array([37, 91, 173]) * (CIFAR10_CLASSES.index(name) + 1) % 256
                for i in range(n):
                    pixels = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                    jpeg = io.BytesIO()
                    Image.fromarray(pixels).save(jpeg, "JPEG")
                    zf.writestr(f"{split}/{name}/{i:04d}.jpg", jpeg.getvalue())
    return path


def zip_layout(path: Path) -> dict:
    """What a reader of the zip depends on: top folders, classes per split in listed order, folder
    entries, member names, compression, and one image's format, mode and size."""
    import re

    from PIL import Image

    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        files = [i.filename for i in infos if not i.is_dir()]
        with zf.open(files[0]) as f, Image.open(f) as img:
            image = (img.format, img.mode, img.size)
    folders = {i.filename.rstrip("/") for i in infos if i.is_dir()}
    return {
        "tops": sorted({n.split("/")[0] for n in files}),
        "classes": {split: list(dict.fromkeys(n.split("/")[1] for n in files if n.startswith(split + "/"))) for split in ("train", "test")},
        "every_folder_has_an_entry": folders == {"/".join(n.split("/")[:k]) for n in files for k in (1, 2)},
        "names_like_split_class_nnnn_jpg": all(re.fullmatch(r"(train|test)/[a-z]+/\d{4}\.jpg", n) for n in files),
        "compression": sorted({i.compress_type for i in infos}),
        "image": image,
    }


def _check_cifar_bundle(b, n_train: int, n_test: int):
    """A CIFAR-10 bundle from JPEGs: counts, the ten classes in sorted order, 32 x 32 RGB tensors."""
    assert len(b.train) + len(b.heldout) == n_train and len(b.test) == n_test
    assert len(b.heldout) == D.default_heldout("imagefolder", n_train)
    assert b.info.num_classes == 10 and b.info.image_size == 32 and b.classes == CIFAR10_CLASSES
    assert sorted(set(b.test.targets)) == list(range(10))
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert b.test[0][0].shape == (3, 32, 32)


def test_a_zip_in_the_shared_cifar10_layout_builds_the_datasets(tmp_path):
    zp = cifar10_jpg_zip(tmp_path / "cifar10-jpg.zip", train_per_class=5, test_per_class=2)
    cfg = DataConfig(name="imagefolder", root=str(zp))
    assert D.check(cfg) == D.dataset_info(cfg) and D.dataset_info(cfg).num_classes == 10  # zip index only
    b = D.build_datasets(cfg, seed=0)
    _check_cifar_bundle(b, n_train=50, n_test=20)
    assert b.classes[b.test.targets[0]] == Path(b.test.samples[0][0]).parent.name  # label = the sorted class index of its folder


@pytest.mark.slow
def test_readme_command_trains_on_a_cifar10_jpg_zip(tmp_path):
    """The README's ``python -m pipelines.train dataset=imagefolder data.root=<cifar10-jpg.zip>``,
    as a user runs it, on a zip of the shared one's layout (tiny network, one epoch)."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    zp = cifar10_jpg_zip(tmp_path / "cifar10-jpg.zip", train_per_class=8, test_per_class=3)
    repo, uri = Path(__file__).resolve().parents[1], f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=uri, DYNLAB_CACHE=str(tmp_path / "cache"), PYTHONPATH=f"{repo}{os.pathsep}{repo / 'platform'}")
    args = ["dataset=imagefolder", f"data.root={zp}", "epochs=1", "msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2",
            "eval.num_budgets=2", "eval.p_grid=false", f"run.storage_path={tmp_path / 'runs'}"]
    done = subprocess.run([sys.executable, "-m", "pipelines.train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "imagefolder" in done.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dynlab-train").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.root"] == str(zp)
    assert len(client.get_metric_history(run.info.run_id, "anytime/test_accuracy")) == 2  # both exits evaluated on test/


@pytest.mark.skipif(not SHARED_CIFAR_ZIP.is_file(), reason="shared cifar10-jpg.zip not present")
def test_the_built_zip_has_the_shared_zips_layout(tmp_path):
    shared, built = zip_layout(SHARED_CIFAR_ZIP), zip_layout(cifar10_jpg_zip(tmp_path / "built.zip", 2, 1))
    assert built == shared
    assert shared["classes"]["train"] == SHARED_ZIP_CLASS_ORDER and shared["image"] == ("JPEG", "RGB", (32, 32))
    info = D.dataset_info(DataConfig(name="imagefolder", root=str(SHARED_CIFAR_ZIP)))  # zip index only
    assert info.num_classes == 10 and info.image_size == 32


@pytest.mark.skipif(not SHARED_CIFAR_ZIP.is_file(), reason="shared cifar10-jpg.zip not present")
def test_shared_cifar10_jpg_zip_counts_and_a_subset_of_its_images(tmp_path):
    """The real zip: its index counts (5,000 training and 1,000 test images per class, nothing
    extracted), and the same path as the built zip's on a subset of its own JPEGs."""
    with zipfile.ZipFile(SHARED_CIFAR_ZIP) as src:
        files = [i for i in src.infolist() if not i.is_dir()]
        per_split_class = Counter(tuple(i.filename.split("/")[:2]) for i in files)
        assert set(per_split_class.values()) == {5000, 1000} and len(per_split_class) == 20
        assert all(n == (5000 if split == "train" else 1000) for (split, _), n in per_split_class.items())
        D.check(DataConfig(name="imagefolder", root=str(SHARED_CIFAR_ZIP)))  # 50,000 training images: the default held-out 5,000 fits
        subset, kept = tmp_path / "cifar10-jpg-subset.zip", Counter()
        with zipfile.ZipFile(subset, "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                key = tuple(info.filename.split("/")[:2])
                if info.is_dir() or kept[key] < (5 if key[0] == "train" else 2):
                    dst.writestr(info, src.read(info))
                    kept[key] += not info.is_dir()
    _check_cifar_bundle(D.build_datasets(DataConfig(name="imagefolder", root=str(subset)), seed=0), n_train=50, n_test=20)


def test_an_image_folder_with_cifar10s_classes_gets_cifar10s_grouping_under_auto(tmp_path):
    from PIL import Image

    def folder(root: Path, classes: list[str]) -> DataConfig:
        for split in ("train", "test"):
            for c in classes:
                (root / split / c).mkdir(parents=True)
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / c / "0.png")
        return DataConfig(name="imagefolder", root=str(root), heldout=0)

    cifar = folder(tmp_path / "cifar", ["truck", "ship", "horse", "frog", "dog", "deer", "cat", "bird", "automobile", "airplane"])
    # airplane/ship = air/sea vehicles, automobile/truck = road vehicles, cat/deer/dog/horse =
    # four-legged mammals, bird/frog = other animals (classes in sorted order, as ImageFolder indexes them)
    assert D.class_categories("auto", cifar, 10) == [0, 1, 3, 2, 2, 2, 3, 2, 0, 1]
    assert D.category_names("auto", cifar, 4)[2] == "four-legged mammals"
    other = folder(tmp_path / "other", ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
    assert D.class_categories("auto", other, 10) is None  # ten classes are not enough: the names must be CIFAR-10's
