"""Datasets, the held-out split and transforms.

``build_datasets(cfg.data, seed)`` returns a :class:`DataBundle`:

* ``train``   - the training images minus the held-out ones, with training augmentation
  (``data.augment=false`` serves them with the eval transform instead);
* ``heldout`` - the held-out subset of the *training* set, served with the eval transform (no
  augmentation), for model selection; ``heldout_indices`` / ``train_indices`` index the full
  training set and are what a run saves;
* ``test``    - the test (or ``val``) split, eval transform;
* ``info``    - a :class:`~dynlab.registry.DatasetInfo` for the model builders.

Every dataset yields ``(float tensor [3, H, W], int label)``.

The held-out split is ``np.random.default_rng(seed).permutation(n_train)``: its first ``heldout``
entries are held out. ``data.heldout=-1`` picks the dataset default (5,000 for CIFAR; 300 for
digits; 50,000 for an image folder with >= 500k training images, else 10%; 10% for synthetic).
``data.heldout=0`` is allowed and gives an empty held-out set; model selection (``run.select=best``)
then has nothing to score, so use ``run.select=last`` with it.
``data.train_subset=N`` (0 = off) then keeps N images of the training split: per class in
proportion to the split's class counts (largest remainder, at least one per class), each class's
picked by a permutation seeded from ``[seed, TRAIN_SUBSET_SEED]``; held-out and test are unchanged.

Datasets (``data.name``):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled to [0, 1],
  resized bilinearly to 32x32 (or ``data.image_size``) and replicated to 3 channels. A fixed split
  (fixed seed, independent of the run seed) gives 1,297 train / 500 test images. Kept in memory;
  augmentation is a random 32 crop of the image padded by 2 (no flips), done with tensor ops.
* ``cifar10`` / ``cifar100``: torchvision's datasets under ``data.root`` (downloaded there only with
  ``data.download=true``). CIFAR-100 datasets also carry ``coarse_targets`` (the 20 superclasses),
  read from the pickled files torchvision keeps.
* ``imagefolder``: ``data.root`` is a folder or a ``.zip`` with ``train/<class>/*`` and
  ``val/<class>/*`` (or ``test/``), possibly under one top-level folder; every class folder of
  ``train/`` must hold images (each is one of the model's classes). A zip's images, and nothing
  else it holds, are extracted once into ``$DYNLAB_CACHE`` (default ``~/.cache/dynlab``) as
  ``<zip stem>-<hash>``; the extraction is atomic. The input size is ``data.image_size=N`` when
  given (every image resized to N x N), else read from the images' headers (a fixed sample of
  1,000): all of one size up to 64 px on the longer side (e.g. CIFAR as JPEGs): that side;
  all larger than 64 px, of any sizes (photos, ImageNet): 224, each image resized and cropped;
  anything else (small images of several sizes, or a 3 x 3 image among photos) is refused, as no
  one size is right for all: set ``data.image_size``. Inputs up to 64 px get CIFAR-style
  augmentation (random crop of the padded image + flip), larger ones ImageNet-style
  (RandomResizedCrop + flip; eval Resize 256/224 of the side + CenterCrop). 16-bit grey images
  are scaled to 8 bits. Normalised with the ImageNet mean/std. What is checked before training
  starts, and how thoroughly: see the imagefolder section below.
* ``synthetic``: seeded random images, generated lazily and deterministically per index (so any
  size costs no memory), with class-dependent low-frequency patterns so models can learn them.

Training images (of every dataset but synthetic, with ``data.augment``) can also get
``data.auto_augment`` (RandAugment or TrivialAugmentWide after the crop and flip) and
``data.random_erasing`` (on the normalised tensor), both torchvision.transforms.v2.

All paths are made absolute, as Ray workers change directory.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from dynlab.errors import ConfigError, DataError
from dynlab.registry import DatasetInfo

if TYPE_CHECKING:  # only for annotations: keeps dynlab.data importable from config/registry
    from dynlab.config import DataConfig

# Classes and input size of the datasets the presets are defined for (no data needed to know them).
STATIC_INFO = {
    "digits": DatasetInfo("digits", 10, 32),
    "cifar10": DatasetInfo("cifar10", 10, 32),
    "cifar100": DatasetInfo("cifar100", 100, 32, num_coarse_classes=20),
    "imagenet": DatasetInfo("imagenet", 1000, 224),
}


def static_info(name: str) -> DatasetInfo:
    if name not in STATIC_INFO:
        raise ConfigError("dataset", name, "one of " + ", ".join(STATIC_INFO))
    return STATIC_INFO[name]


# data.image_size: a batch of 64 images at 1024 x 1024 is already 800 MB of floats; digits keeps its
# 1,797 images in memory at that side (470 MB at 256), so it is bounded lower.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, MAX_IN_MEMORY_SIZE = 8, 1024, 256


def check_image_size(cfg: DataConfig) -> None:
    """``data.image_size`` is 0 (the dataset's own size) or a side the memory can hold."""
    top = MAX_IN_MEMORY_SIZE if cfg.name == "digits" else MAX_IMAGE_SIZE
    if cfg.image_size != 0 and not MIN_IMAGE_SIZE <= cfg.image_size <= top:
        why = " (its 1,797 images are kept in memory at this size)" if cfg.name == "digits" else ""
        raise ConfigError("data.image_size", cfg.image_size, f"0 (the dataset's own size) or {MIN_IMAGE_SIZE} .. {top} pixels for {cfg.name}{why}")


# --------------------------------------------------------------------------------------------------
# Bundle and held-out split


@dataclass
class DataBundle:
    train: Dataset
    heldout: Dataset
    test: Dataset
    heldout_indices: np.ndarray  # int64, sorted, into the full training set
    train_indices: np.ndarray  # int64, sorted, into the full training set
    info: DatasetInfo
    classes: list[str] = field(default_factory=list)


class IndexedSubset(Subset):
    """``torch.utils.data.Subset`` that also exposes the subset's ``targets`` / ``coarse_targets``."""

    def _pick(self, name):
        values = getattr(self.dataset, name, None)
        if values is None:
            return None
        return [int(values[i]) for i in self.indices]

    @property
    def targets(self):
        return self._pick("targets")

    @property
    def coarse_targets(self):
        return self._pick("coarse_targets")


def default_heldout(name: str, n_train: int) -> int:
    """Held-out size used when ``data.heldout=-1``."""
    if name in ("cifar10", "cifar100"):
        return 5000
    if name == "digits":
        return 300
    if name == "imagefolder" and n_train >= 500_000:
        return 50_000
    return max(1, n_train // 10) if n_train >= 2 else 0  # imagefolder (small) and synthetic: 10%


def heldout_split(n_train: int, heldout: int, seed: int, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """``(train_indices, heldout_indices)``: sorted int64 arrays from a seeded permutation."""
    default = default_heldout(name, n_train)
    size = default if heldout == -1 else heldout
    if size < 0 or size >= n_train:
        raise ConfigError(
            "data.heldout", heldout,
            f"-1 (the default, {default}) or 0 .. {n_train - 1}: fewer than the {n_train} training images of '{name}'",
        )
    perm = np.random.default_rng(seed).permutation(n_train).astype(np.int64)
    return np.sort(perm[size:]), np.sort(perm[:size])


TRAIN_SUBSET_SEED = 7919  # offset from the run seed: the subset's permutation differs from the held-out one


def check_train_subset(n: int, split: int, heldout: int, num_classes: int, name: str) -> None:
    """``data.train_subset=n`` must fit the training split (``split`` images after ``heldout``
    held-out ones) and give every one of the ``num_classes`` classes an image."""
    if n == 0:
        return
    if n > split:
        raise ConfigError(
            "data.train_subset", n,
            f"0 (all) or 1 image per class .. {split} (the training split of '{name}' after the {heldout} held-out images)",
        )
    if n < num_classes:
        raise ConfigError("data.train_subset", n, f"0 (all) or at least one image per class ({num_classes} classes) .. {split}")


def stratified_counts(class_counts: np.ndarray, n: int) -> np.ndarray:
    """Images per class for a subset of ``n``: each class's share of ``n`` in proportion to its
    count, rounded by largest remainder (so they sum to ``n``), at least one for every class
    present. A class whose share is under one image gets one, and the rest is shared again among
    the others; one class at a time, so no class is asked for more images than it has."""
    counts = np.asarray(class_counts, dtype=np.int64)
    forced = np.zeros(len(counts), dtype=bool)
    while True:  # integer arithmetic: share = budget * count / total = whole + rest / total
        free = (counts > 0) & ~forced
        budget, total = n - int(forced.sum()), int(counts[free].sum())
        scaled = np.where(free, budget * counts, 0)
        small = np.flatnonzero(free & (scaled < total))
        if len(small) == 0:
            break
        forced[small[np.argmin(scaled[small])]] = True
    whole, rest = scaled // total, scaled % total
    out = whole + forced
    order = np.argsort(-rest, kind="stable")  # largest remainder first; ties: the lower class
    out[order[: n - int(out.sum())]] += 1
    return out


def train_subset(train_idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of ``n`` of ``train_idx`` (``labels[i]`` = the class of
    ``train_idx[i]``), as sorted int64 indices into the full training set."""
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, TRAIN_SUBSET_SEED])
    picked = [
        rng.permutation(train_idx[labels == c])[:k] for c, k in zip(classes, stratified_counts(counts, n))
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _labels(dataset, indices: np.ndarray) -> np.ndarray:
    """The classes of ``dataset[indices]``: its ``targets``, else its ``label(i)`` (synthetic)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets, dtype=np.int64)[indices]
    return np.array([dataset.label(int(i)) for i in indices], dtype=np.int64)


def _assemble(name, train_aug, train_eval, test, seed, heldout, info, classes, subset: int = 0) -> DataBundle:
    train_idx, held_idx = heldout_split(len(train_eval), heldout, seed, name)
    if subset:
        check_train_subset(subset, len(train_idx), len(held_idx), info.num_classes, name)
        train_idx = train_subset(train_idx, _labels(train_eval, train_idx), subset, seed)
    return DataBundle(
        train=IndexedSubset(train_aug, train_idx.tolist()),
        heldout=IndexedSubset(train_eval, held_idx.tolist()),
        test=test,
        heldout_indices=held_idx,
        train_indices=train_idx,
        info=info,
        classes=list(classes),
    )


def build_datasets(cfg: DataConfig, seed: int) -> DataBundle:
    """Train (augmented), held-out (from train, not augmented) and test datasets for ``cfg``."""
    builders = {
        "digits": _build_digits,
        "cifar10": _build_cifar,
        "cifar100": _build_cifar,
        "imagefolder": _build_imagefolder,
        "synthetic": _build_synthetic,
    }
    if cfg.name not in builders:
        raise ConfigError("data.name", cfg.name, "one of " + ", ".join(builders))
    check_image_size(cfg)
    return builders[cfg.name](cfg, seed)


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Classes and input size for ``cfg`` without loading the images where possible."""
    check_image_size(cfg)
    size = cfg.image_size
    if cfg.name in ("cifar10", "cifar100"):
        _cifar_location(cfg)  # fail early (in the driver) when the files are missing
    if cfg.name in ("digits", "cifar10", "cifar100"):
        info = STATIC_INFO[cfg.name]
        return replace(info, image_size=size) if size > 0 else info
    if cfg.name == "synthetic":
        return DatasetInfo("synthetic", cfg.synthetic_classes, size or 32)
    if cfg.name == "imagefolder":
        index = _imagefolder_index(cfg)
        return DatasetInfo("imagefolder", len(index.classes), _input_size(cfg, index)[0])
    raise ConfigError("data.name", cfg.name, "one of digits, cifar10, cifar100, imagefolder, synthetic")


def _abs(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def cache_base() -> Path:
    """``$DYNLAB_CACHE`` or ``~/.cache/dynlab`` (absolute)."""
    return _abs(os.environ.get("DYNLAB_CACHE") or "~/.cache/dynlab")


# --------------------------------------------------------------------------------------------------
# digits

DIGITS_SPLIT_SEED = 1797  # fixed: the digits test set never depends on the run seed
DIGITS_TEST = 500


class DigitsDataset(Dataset):
    """In-memory digits: ``images`` [N, 1, S, S] in [0, 1]; normalised (and augmented) per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, augment: bool, pad: int, auto=None, erase=None):
        self.images, self.labels = images, labels
        self.mean, self.std, self.augment, self.pad = mean, std, augment, pad
        self.auto, self.erase = auto, erase  # data.auto_augment on the [0, 1] image, data.random_erasing on the normalised one

    @property
    def targets(self):
        return self.labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment and self.pad > 0:
            s, p = x.shape[-1], self.pad
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = F.pad(x, (p, p, p, p))[:, dy:dy + s, dx:dx + s]  # zero = background ink level
        if self.augment and self.auto is not None:
            x = self.auto(x)
        x = ((x - self.mean) / self.std).repeat(3, 1, 1)
        if self.augment and self.erase is not None:
            x = self.erase(x)
        return x, int(self.labels[i])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (images [1797, 8, 8], targets), read from the file it ships without
    importing scikit-learn (seconds in every fresh process: the driver, each trial, each task)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    raw = np.loadtxt(path, delimiter=",")  # what load_digits reads
    return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(int)


def _digits_arrays(size: int):
    digits, target = _load_digits()
    images = torch.from_numpy(digits.astype(np.float32) / 16.0).unsqueeze(1)  # [1797, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = torch.from_numpy(target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels)))
    test_idx, train_idx = perm[:DIGITS_TEST], perm[DIGITS_TEST:]
    return images[train_idx].contiguous(), labels[train_idx], images[test_idx].contiguous(), labels[test_idx]


def _build_digits(cfg: DataConfig, seed: int) -> DataBundle:
    size = cfg.image_size or 32
    tr_x, tr_y, te_x, te_y = _digits_arrays(size)
    # Normalisation from the (fixed) training images: computed here in milliseconds rather than
    # hard-coded (about mean 0.19, std 0.30 at 32x32).
    mean, std = float(tr_x.mean()), float(tr_x.std())
    pad = max(1, round(2 * size / 32))
    auto, erase = recipe_augmentations(cfg)
    train_aug = DigitsDataset(tr_x, tr_y, mean, std, augment=cfg.augment, pad=pad, auto=auto[0] if auto else None, erase=erase[0] if erase else None)
    train_eval = DigitsDataset(tr_x, tr_y, mean, std, augment=False, pad=pad)
    test = DigitsDataset(te_x, te_y, mean, std, augment=False, pad=pad)
    info = replace(STATIC_INFO["digits"], image_size=size)
    return _assemble("digits", train_aug, train_eval, test, seed, cfg.heldout, info, [str(i) for i in range(10)], cfg.train_subset)


# --------------------------------------------------------------------------------------------------
# CIFAR

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _ResizeIfNeeded:
    """``Resize(size)`` + ``CenterCrop(size)``, skipped for an image already ``size`` x ``size``
    (where both are the identity: CIFAR as 32x32 JPEGs spent ~10% of their loading time there)."""

    def __init__(self, size: int):
        from torchvision import transforms as T

        self.size, self.resize = size, T.Compose([T.Resize(size), T.CenterCrop(size)])

    def __call__(self, img):
        return img if tuple(img.size) == (self.size, self.size) else self.resize(img)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded(size={self.size})"


def recipe_augmentations(cfg: DataConfig | None) -> tuple[list, list]:
    """``data.auto_augment`` (on the image after crop and flip) and ``data.random_erasing`` (on the
    normalised tensor, noise-filled as DeiT's 'pixel' mode), as torchvision.transforms.v2 lists."""
    from torchvision.transforms import v2

    if cfg is None:
        return [], []
    auto = {"none": [], "randaugment": [v2.RandAugment()], "trivialaugment": [v2.TrivialAugmentWide()]}[cfg.auto_augment]
    erase = [v2.RandomErasing(p=cfg.random_erasing, value="random")] if cfg.random_erasing > 0 else []
    return auto, erase


def _small_transforms(size: int, stats, augment: bool, resize: bool, cfg: DataConfig | None = None):
    """CIFAR-style: (resize,) random crop with 1/8 padding + horizontal flip (+ the recipe's
    augmentations of ``cfg``); eval: (resize,) tensor."""
    from torchvision import transforms as T

    pre = [_ResizeIfNeeded(size)] if resize else []
    post = [T.ToTensor(), T.Normalize(*stats)]
    ev = T.Compose(pre + post)
    if not augment:
        return ev, ev
    auto, erase = recipe_augmentations(cfg)
    tr = T.Compose(pre + [T.RandomCrop(size, padding=max(1, size // 8)), T.RandomHorizontalFlip()] + auto + post + erase)
    return tr, ev


def _large_transforms(size: int, stats, augment: bool, cfg: DataConfig | None = None):
    """ImageNet-style: RandomResizedCrop + flip (+ the recipe's augmentations of ``cfg``); eval:
    Resize(size*256/224) + CenterCrop."""
    from torchvision import transforms as T

    post = [T.ToTensor(), T.Normalize(*stats)]
    ev = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size)] + post)
    if not augment:
        return ev, ev
    auto, erase = recipe_augmentations(cfg)
    tr = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + auto + post + erase)
    return tr, ev


CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def read_coarse_labels(folder: str | os.PathLike, split: str) -> list[int]:
    """CIFAR-100 superclass labels from ``<folder>/{train,test}`` (torchvision loads fine labels only)."""
    with open(Path(folder) / split, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return [int(c) for c in entry["coarse_labels"]]


def _cifar_root(cfg: DataConfig) -> Path:
    root = _abs(cfg.root) if cfg.root else cache_base() / "datasets"
    if root.name == CIFAR_FOLDERS[cfg.name]:  # pointed at the batches folder itself
        root = root.parent
    return root


def _cifar_location(cfg: DataConfig) -> tuple[Path, Path, str]:
    """``(root, batches folder, description)``; a DataError when absent and not to be downloaded."""
    root = _cifar_root(cfg)
    folder = root / CIFAR_FOLDERS[cfg.name]
    where = f"data.root = {cfg.root!r} (resolved: {root})"
    if not cfg.download and not folder.is_dir():
        raise DataError(
            f"{where}: {CIFAR_TITLES[cfg.name]} not found (expected the folder {folder}). Set data.download=true to "
            f"download it there, or point data.root at the folder that contains {CIFAR_FOLDERS[cfg.name]}."
        )
    return root, folder, where


def _build_cifar(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision import datasets

    name, title = cfg.name, CIFAR_TITLES[cfg.name]
    root, folder, where = _cifar_location(cfg)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        train_ds = cls(str(root), train=True, download=cfg.download)
        test_ds = cls(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{where}: {title} files in {folder} are missing or corrupted ({e}). Set data.download=true "
            f"to download them again, or point data.root at a complete copy."
        ) from e
    except OSError as e:  # download failed (no network, disk full, ...)
        raise DataError(f"{where}: downloading {title} failed ({e}). Point data.root at an existing copy.") from e

    size = cfg.image_size or 32
    tr_t, ev_t = _small_transforms(size, CIFAR_STATS[name], cfg.augment, resize=size != 32, cfg=cfg)
    if name == "cifar100":
        train_ds.coarse_targets = read_coarse_labels(folder, "train")
        test_ds.coarse_targets = read_coarse_labels(folder, "test")
    train_eval = copy.copy(train_ds)  # shares the image array; only the transform differs
    train_ds.transform, train_eval.transform, test_ds.transform = tr_t, ev_t, ev_t
    info = replace(STATIC_INFO[name], image_size=size)
    return _assemble(name, train_ds, train_eval, test_ds, seed, cfg.heldout, info, train_ds.classes, cfg.train_subset)


# --------------------------------------------------------------------------------------------------
# imagefolder
#
# An image folder (or a zip of one) is checked in three passes of growing cost per file, so that bad
# data costs one line before anything starts while ImageNet's 1.3M files cost seconds, not an hour:
#
# 1. the listing of every file, nothing opened (a folder walk, or the zip's index): the layout, the
#    classes, empty files, entries that are not regular files, zip members that are links,
#    encrypted, implausibly large or duplicated;
# 2. the headers of a fixed sample of SIZE_SAMPLE images (every image of a smaller dataset; about
#    0.1 s per 1,000): each must open as an image; their sizes give the input size;
# 3. a full decode of DECODE_SAMPLE of those, by the driver only (ImageNet JPEGs: about 5 ms each).
#
# A file beyond the samples that cannot be decoded stops the run when a training worker reaches it:
# one line naming the file, the run FAILED (ImageReadError).

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_SPLITS = ("val", "test")
LAYOUT = (
    "a folder or .zip in ImageNet layout: train/<class>/<image> and val/<class>/<image> "
    "(or test/<class>/<image>), optionally inside one top-level folder"
)
COMPLETE_MARKER = ".dynlab-extracted"
SMALL_IMAGE = 64  # images up to this side get CIFAR-style augmentation at native size
LARGE_INPUT = 224  # input side of larger images (ImageNet-style augmentation)
SIZE_SAMPLE = 1000  # images whose headers are read (all of a smaller dataset)
DECODE_SAMPLE = 200  # of those, decoded in full by the driver's check
SAMPLE_SEED = 15  # fixed: the driver and every worker read the same sample
MAX_MEMBER_BYTES = 256 << 20  # one image of a zip, uncompressed (a 8000 x 8000 RGB bitmap is 192 MB)
BOMB_BYTES, BOMB_RATIO = 16 << 20, 100  # a member over 16 MiB compressed over 100:1 is no photo


def _skip(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")  # .DS_Store, __MACOSX, ...


def _locate_splits(has_dir: Callable[[str], bool], top_dirs: list[str]) -> tuple[str, str] | None:
    """Relative ``(train, test)`` folder names, at the top or inside one top-level folder."""
    for prefix in ["", *[d + "/" for d in top_dirs]]:
        if has_dir(prefix + "train"):
            for t in TEST_SPLITS:
                if has_dir(prefix + t):
                    return prefix + "train", prefix + t
    return None


def _data_error(cfg: DataConfig, path: Path, problem: str) -> DataError:
    return DataError(f"data.root = {cfg.root!r} (resolved: {path}): {problem}")


def _layout_error(cfg: DataConfig, path: Path, problem: str) -> DataError:
    return _data_error(cfg, path, f"{problem}; expected {LAYOUT}")


def _file_kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    kinds = {stat.S_ISFIFO: "named pipe", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device", stat.S_ISSOCK: "socket"}
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def _imagefolder_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise _layout_error(cfg, Path(""), "not set")
    path = _abs(cfg.root)
    if not path.exists():
        raise _layout_error(cfg, path, "does not exist")
    if not (path.is_dir() or path.is_file()):  # /dev/zero would be read for ever, a named pipe waits for a writer
        raise _layout_error(cfg, path, f"is a {_file_kind(path)}, not a folder or a regular file")
    return path


def zip_cache_dir(zip_path: str | os.PathLike) -> Path:
    """Where ``zip_path`` is extracted: ``<cache>/<stem>-<hash of path, size and mtime>``."""
    p = _abs(zip_path)
    st = p.stat()
    key = hashlib.sha1(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_base() / f"{p.stem}-{key}"


def _is_extracted(d: Path) -> bool:
    return (d / COMPLETE_MARKER).is_file()


def extract_zip(zip_path: str | os.PathLike, members: list[str]) -> Path:
    """Extract ``members`` (the images the index found, nothing else the archive holds) once into
    :func:`zip_cache_dir` and return it.

    The archive is unpacked into a temporary folder beside the target, marked complete, then renamed
    into place, so a partial extraction (killed, or still running elsewhere) is never taken for a
    complete one. A lock file avoids duplicate work between processes on one machine; if the lock
    is not honoured (e.g. some network filesystems) the rename still keeps the result consistent.
    """
    src = _abs(zip_path)
    final = zip_cache_dir(src)
    if _is_extracted(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        if _is_extracted(final):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            with zipfile.ZipFile(src) as zf:
                zf.extractall(tmp, members=members)
            (tmp / COMPLETE_MARKER).write_text(str(src) + "\n")
            if final.exists():  # an incomplete leftover under the final name: move it aside
                stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=final.parent))
                os.rename(final, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_extracted(final):  # lost a race only counts if the winner finished
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# Listing: per split, class folder -> image names relative to the folder read (a class folder
# without images maps to []), and the problems found, one sentence each.
Listing = tuple[tuple[str, str], dict[str, dict[str, list[str]]], list[str]]


def _walk_images(base: Path, rel: str, out: list[str], problems: list[str]) -> None:
    """Images under ``base/rel`` in the order of ``os.walk`` with sorted names (a folder's files,
    then its subfolders); a linked subfolder is not followed (no loops), as ``os.walk`` does."""
    with os.scandir(base / rel) as it:
        entries = sorted(it, key=lambda e: e.name)
    subdirs = []
    for e in entries:
        if _skip(e.name):
            continue
        if e.is_dir():
            if not e.is_symlink():
                subdirs.append(e.name)
        elif e.name.lower().endswith(IMG_EXTENSIONS):
            name = f"{rel}/{e.name}"
            if not e.is_file():
                problems.append(f"{name} is not a regular file (a named pipe, a device or a broken link): replace or remove it")
            elif e.stat().st_size == 0:
                problems.append(f"{name} is empty (0 bytes): replace or remove it")
            else:
                out.append(name)
    for d in subdirs:
        _walk_images(base, f"{rel}/{d}", out, problems)


def _list_folder(cfg: DataConfig, base: Path, shown: Path) -> Listing:
    def subdirs(rel: str) -> list[str]:
        with os.scandir(base / rel) as it:
            return sorted(e.name for e in it if e.is_dir() and not _skip(e.name))

    splits = _locate_splits(lambda rel: (base / rel).is_dir(), subdirs(""))
    if splits is None:
        raise _layout_error(cfg, shown, "no train/ and val/ (or test/) folders found")
    files: dict[str, dict[str, list[str]]] = {}
    problems: list[str] = []
    for split in splits:
        files[split] = {}
        for c in subdirs(split):
            files[split][c] = []
            _walk_images(base, f"{split}/{c}", files[split][c], problems)
    return splits, files, problems


@functools.lru_cache(maxsize=4)
def _zip_infos(path: str, size: int, mtime_ns: int) -> list[zipfile.ZipInfo]:
    """A zip's index, read once per process and version of the file (ImageNet's takes seconds)."""
    with zipfile.ZipFile(path) as zf:
        return zf.infolist()


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    import stat

    name, size = info.filename, info.file_size
    if stat.S_ISLNK(info.external_attr >> 16):  # extracted, it would be a file holding the link's target
        return f"zip member {name} is a symbolic link: put the image itself in the zip (zip without --symlinks)"
    if info.flag_bits & 0x1:
        return f"zip member {name} is encrypted (password-protected): zip the images without a password"
    if size == 0:
        return f"zip member {name} is empty (0 bytes): replace or remove it"
    if size > MAX_MEMBER_BYTES:
        return f"zip member {name} is {size / 2**20:.0f} MiB uncompressed, over the {MAX_MEMBER_BYTES >> 20} MiB an image may have"
    if size > BOMB_BYTES and size > BOMB_RATIO * max(1, info.compress_size):
        return f"zip member {name} expands {size // max(1, info.compress_size)}:1 to {size / 2**20:.0f} MiB (a compression bomb, not an image)"
    return None


def _list_zip(cfg: DataConfig, path: Path) -> Listing:
    try:
        st = path.stat()
        infos = _zip_infos(str(path), st.st_size, st.st_mtime_ns)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        raise _layout_error(cfg, path, f"is not a readable .zip archive ({err})") from None
    dirs = set()
    for info in infos:
        parts = info.filename.rstrip("/").split("/")
        for i in range(1, len(parts) + info.is_dir()):
            dirs.add("/".join(parts[:i]))
    splits = _locate_splits(lambda rel: rel in dirs, sorted(d for d in dirs if "/" not in d and not _skip(d)))
    if splits is None:
        raise _layout_error(cfg, path, "no train/ and val/ (or test/) folders found in the zip")
    files: dict[str, dict[str, list[str]]] = {s: {} for s in splits}
    for d in dirs:
        split, _, cls = d.rpartition("/")
        if split in files and not _skip(cls):
            files[split].setdefault(cls, [])
    problems: list[str] = []
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        split = next((s for s in splits if name.startswith(s + "/")), None)
        if split is None or info.is_dir() or not name.lower().endswith(IMG_EXTENSIONS):
            continue
        parts = name[len(split) + 1:].split("/")
        if len(parts) < 2 or any(p == "" or _skip(p) for p in parts):  # as the folder walk skips them
            continue
        problem = _member_problem(info) or (f"zip member {name} appears twice in the zip" if name in seen else None)
        seen.add(name)
        if problem:
            problems.append(problem)
        else:
            files[split][parts[0]].append(name)
    return splits, files, problems


@dataclass
class FolderIndex:
    """An image folder or zip as listed and checked file by file, nothing decoded."""

    root: Path  # data.root, resolved
    base: Path | None  # the folder read: data.root, or its zip's extraction; None: the zip itself
    classes: list[str]  # the class folders of train/ (each holds images); position = label
    train: list[tuple[str, int]]  # (image relative to base, label), in the dataset's order
    test: list[tuple[str, int]]
    zip_bytes: int = 0  # what extracting the zip writes (0: nothing to extract)

    @property
    def n_train(self) -> int:
        return len(self.train)

    def sample(self, k: int) -> list[str]:
        """A fixed, shuffled sample of ``k`` images of both splits (all of them when fewer): the
        same in the driver and in every worker, so that all agree on the input size."""
        names = sorted(name for name, _ in self.train + self.test)
        return [names[i] for i in np.random.default_rng(SAMPLE_SEED).permutation(len(names))[:k]]

    @contextlib.contextmanager
    def reader(self):
        """``open(name)`` -> a binary file of one image, valid inside the block."""
        if self.base is not None:
            yield lambda name: open(self.base / name, "rb")  # noqa: SIM115 - the caller closes it
        else:
            with zipfile.ZipFile(self.root) as zf:
                yield zf.open


def _imagefolder_index(cfg: DataConfig) -> FolderIndex:
    """Classes and images of both splits from a folder walk or a zip's index (nothing extracted),
    so that layout problems and bad files fail in the driver, in one line."""
    path = _imagefolder_root(cfg)
    if path.is_dir():
        base = path
    elif not zipfile.is_zipfile(path):
        raise _layout_error(cfg, path, "is a file but not a readable .zip archive (truncated or corrupt?)")
    else:
        base = zip_cache_dir(path) if _is_extracted(zip_cache_dir(path)) else None
    try:
        splits, files, problems = _list_folder(cfg, base, path) if base is not None else _list_zip(cfg, path)
    except OSError as err:
        raise _data_error(cfg, path, f"cannot be listed ({err})") from None
    if problems:
        raise _data_error(cfg, path, problems[0] + (f" (and {len(problems) - 1} more such file(s))" if len(problems) > 1 else ""))
    (train_split, test_split), train, test = splits, files[splits[0]], files[splits[1]]
    if not any(train.values()):
        raise _layout_error(cfg, path, f"no class folders with images under {train_split}/")
    if not any(test.values()):
        raise _layout_error(cfg, path, f"no class folders with images under {test_split}/")
    empty = sorted(c for c, names in train.items() if not names)
    if empty:  # it would be a class of the model that no image teaches
        shown = ", ".join(f"{train_split}/{c}" for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise _data_error(cfg, path, f"class folder(s) {shown} hold no images ({', '.join(IMG_EXTENSIONS)}): every class folder of {train_split}/ is one of the model's classes: add its images or remove it")
    extra = sorted(c for c, names in test.items() if names and c not in train)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise _layout_error(cfg, path, f"class folder(s) {shown} of {test_split}/ have no counterpart in {train_split}/")
    classes = sorted(train)
    label = {c: i for i, c in enumerate(classes)}
    index = FolderIndex(path, base, classes, [(n, label[c]) for c in classes for n in train[c]], [(n, label[c]) for c in sorted(test) for n in test[c]])
    if base is None:
        st = path.stat()
        sizes = {i.filename: i.file_size for i in _zip_infos(str(path), st.st_size, st.st_mtime_ns)}
        index.zip_bytes = sum(sizes[n] for n, _ in index.train + index.test)
    return index


def _why_unreadable(err: BaseException) -> str:
    from PIL import UnidentifiedImageError

    detail = "not an image format Pillow reads" if isinstance(err, UnidentifiedImageError) else str(err)[:200]  # its text repeats the path
    return f"{type(err).__name__}: {detail}"


def _unreadable(cfg: DataConfig, index: FolderIndex, name: str, err: BaseException) -> DataError:
    return _data_error(cfg, index.root, f"image {name} cannot be read ({_why_unreadable(err)}): replace or remove it")


def _image_sizes(cfg: DataConfig, index: FolderIndex, names: list[str]) -> dict[str, tuple[int, int]]:
    """``(width, height)`` of ``names`` from their headers (nothing decoded)."""
    from PIL import Image

    sizes = {}
    with index.reader() as open_image:
        for name in names:
            try:
                with open_image(name) as f, Image.open(f) as img:
                    sizes[name] = img.size
            except Exception as err:  # noqa: BLE001 - any header PIL cannot read is a bad file
                raise _unreadable(cfg, index, name, err) from None
    return sizes


def _decode(cfg: DataConfig, index: FolderIndex, names: list[str]) -> None:
    """Decode ``names`` in full, as training will: a truncated or undecodable file fails here."""
    with index.reader() as open_image:
        for name in names:
            try:
                with open_image(name) as f:
                    _open_rgb(f)
            except Exception as err:  # noqa: BLE001 - as in ImageFolderDataset.__getitem__
                raise _unreadable(cfg, index, name, err) from None


def _input_size(cfg: DataConfig, index: FolderIndex, sizes: dict[str, tuple[int, int]] | None = None) -> tuple[int, bool]:
    """``(side, small)``: the input side of an image folder and its augmentation style (``small``:
    CIFAR-style, else ImageNet-style). ``data.image_size=N`` resizes every image to N (CIFAR-style
    up to 64 px). Otherwise the sizes of the sampled images decide: all of one size up to 64 px on
    the longer side: that side (CIFAR as JPEGs: 32); all larger than 64 px, of any sizes (photos,
    ImageNet): 224, each image resized and cropped; else (small images of several sizes, or small
    and large ones mixed, e.g. a 3 x 3 image among photos) no size is right for all: refused."""
    if cfg.image_size > 0:
        return cfg.image_size, cfg.image_size <= SMALL_IMAGE
    sizes = sizes if sizes is not None else _image_sizes(cfg, index, index.sample(SIZE_SAMPLE))
    smallest = min(sizes, key=lambda n: (max(sizes[n]), n))
    if max(sizes[smallest]) > SMALL_IMAGE:
        return LARGE_INPUT, False
    if len(set(sizes.values())) == 1:
        return max(sizes[smallest]), True
    largest = max(sizes, key=lambda n: (max(sizes[n]), sizes[n][0] * sizes[n][1], n))
    other = largest if sizes[largest] != sizes[smallest] else next(n for n in sorted(sizes) if sizes[n] != sizes[smallest])
    (w, h), (w2, h2) = sizes[smallest], sizes[other]
    raise _data_error(
        cfg, index.root,
        f"image sizes disagree ({smallest} is {w}x{h}, {other} is {w2}x{h2}): the input size is read from the images only when they "
        f"all have one size or are all larger than {SMALL_IMAGE} px (then {LARGE_INPUT}); set data.image_size=N to resize every image to N x N",
    )


class ImageReadError(DataError):
    """An image a training worker cannot decode. A DataLoader worker process's error comes back as
    ``type(err)(message + its traceback)``: only the message is kept, so the run ends in one line."""

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition(f"{type(self).__name__}: ")[2] or message
        super().__init__(message)


def _open_rgb(fp):
    from PIL import Image

    img = Image.open(fp)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG, TIFF): convert("RGB") clips every value over 255 to white; scale instead
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no fixed range: save the image with 8 or 16 bits")
    return img.convert("RGB")


class ImageFolderDataset(Dataset):
    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform=None):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [y for _, y in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = _open_rgb(f)
        except Exception as err:  # noqa: BLE001 - a corrupt or unreadable image is a data problem, named
            raise ImageReadError(f"image {path} cannot be read ({_why_unreadable(err)}): replace or remove it") from None
        return (self.transform(img) if self.transform is not None else img), y


def _build_imagefolder(cfg: DataConfig, seed: int) -> DataBundle:
    index = _imagefolder_index(cfg)
    if index.base is None:  # a zip: extract its images once, then read them from the folder
        extract_zip(index.root, [name for name, _ in index.train + index.test])
        index = _imagefolder_index(cfg)
    size, small = _input_size(cfg, index)
    if small:
        tr_t, ev_t = _small_transforms(size, IMAGENET_STATS, cfg.augment, resize=True, cfg=cfg)
    else:
        tr_t, ev_t = _large_transforms(size, IMAGENET_STATS, cfg.augment, cfg=cfg)
    train_samples = [(str(index.base / name), y) for name, y in index.train]
    test_samples = [(str(index.base / name), y) for name, y in index.test]
    train_aug = ImageFolderDataset(train_samples, index.classes, tr_t)
    train_eval = ImageFolderDataset(train_samples, index.classes, ev_t)
    test = ImageFolderDataset(test_samples, index.classes, ev_t)
    info = DatasetInfo("imagefolder", len(index.classes), size)
    return _assemble("imagefolder", train_aug, train_eval, test, seed, cfg.heldout, info, index.classes, cfg.train_subset)


def zip_extraction(cfg: DataConfig) -> tuple[Path, int] | None:
    """``(cache folder, bytes)`` that extracting ``data.root``'s zip will write, where data.root is
    a zip not extracted yet (else None): the preflight checks that folder takes them."""
    if cfg.name != "imagefolder":
        return None
    index = _imagefolder_index(cfg)
    return (cache_base(), index.zip_bytes) if index.base is None else None


CIFAR_TRAIN = 50_000
DIGITS_TRAIN = 1797 - DIGITS_TEST  # sklearn digits has 1,797 images


def check(cfg: DataConfig, seed: int = 0) -> DatasetInfo:
    """Everything about the data that can be known in the driver before a worker starts: the
    dataset exists and has the expected layout, its files pass the checks above (an image folder's
    listing, a sample's headers and decoding) and the held-out size fits the training set.
    Returns the dataset's info (classes, input size)."""
    if cfg.name == "imagefolder":
        check_image_size(cfg)
        index = _imagefolder_index(cfg)
        sample = index.sample(SIZE_SAMPLE)
        sizes = _image_sizes(cfg, index, sample)
        _decode(cfg, index, sample[:DECODE_SAMPLE])
        info = DatasetInfo("imagefolder", len(index.classes), _input_size(cfg, index, sizes)[0])
        n_train = index.n_train
    else:
        info = dataset_info(cfg)
        n_train = {"digits": DIGITS_TRAIN, "cifar10": CIFAR_TRAIN, "cifar100": CIFAR_TRAIN, "synthetic": cfg.synthetic_train}[cfg.name]
    train_idx, held_idx = heldout_split(n_train, cfg.heldout, seed, cfg.name)  # raises a ConfigError naming data.heldout
    check_train_subset(cfg.train_subset, len(train_idx), len(held_idx), info.num_classes, cfg.name)
    return info


# --------------------------------------------------------------------------------------------------
# synthetic

SYNTHETIC_SEED = 20240917  # fixed: the synthetic data never depends on the run seed
PATTERN = 4  # class patterns are PATTERN x PATTERN per channel, upsampled to the image size


class SyntheticDataset(Dataset):
    """Image ``i`` of split ``split`` = its class's smooth pattern + unit Gaussian noise.

    Label and noise come from ``default_rng([SYNTHETIC_SEED, split, i])``: deterministic per index,
    nothing stored per image, so any length costs no memory.
    """

    def __init__(self, n: int, classes: int, size: int, split: int):
        self.n, self.num_classes, self.size, self.split = n, classes, size, split
        rng = np.random.default_rng([SYNTHETIC_SEED, classes])
        self.patterns = torch.from_numpy(rng.standard_normal((classes, 3, PATTERN, PATTERN)).astype(np.float32))

    def __len__(self):
        return self.n

    def label(self, i: int) -> int:
        return int(np.random.default_rng([SYNTHETIC_SEED, self.split, i]).integers(self.num_classes))

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            if -self.n <= i < 0:
                i += self.n
            else:
                raise IndexError(i)
        rng = np.random.default_rng([SYNTHETIC_SEED, self.split, i])
        y = int(rng.integers(self.num_classes))
        noise = torch.from_numpy(rng.standard_normal((3, self.size, self.size), dtype=np.float32))
        pattern = F.interpolate(self.patterns[y:y + 1], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return pattern + noise, y


def _build_synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    size = cfg.image_size or 32
    k = cfg.synthetic_classes
    train = SyntheticDataset(cfg.synthetic_train, k, size, split=0)
    test = SyntheticDataset(cfg.synthetic_test, k, size, split=1)
    info = DatasetInfo("synthetic", k, size)
    # No augmentation: train and held-out share one (stateless) dataset.
    return _assemble("synthetic", train, train, test, seed, cfg.heldout, info, [f"class_{i}" for i in range(k)], cfg.train_subset)


# --------------------------------------------------------------------------------------------------
# class -> category mappings (DMNN's category supervision of its controllers)

# Built-in groupings for datasets whose classes have no official coarse labels (index = class).
# digits: closed loops (0 6 8 9), straight strokes (1 4 7), open curves (2 3 5).
# CIFAR-10: air/sea vehicles (airplane, ship), road vehicles (automobile, truck),
# four-legged mammals (cat, deer, dog, horse), other animals (bird, frog).
BUILTIN_CATEGORIES = {
    "digits": [0, 1, 2, 2, 1, 2, 0, 1, 0, 0],
    "cifar10": [0, 1, 3, 2, 2, 2, 3, 2, 0, 1],
}
# an image folder whose classes are exactly these (as the CIFAR-10 JPEG copies name them) gets
# CIFAR-10's grouping under ``auto``
CIFAR10_CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BUILTIN_CATEGORY_NAMES = {
    "digits": ["closed loops", "straight strokes", "open curves"],
    "cifar10": ["air/sea vehicles", "road vehicles", "four-legged mammals", "other animals"],
}


def check_categories(mapping: list[int], num_classes: int, key: str, value) -> list[int]:
    """A class -> category list: one entry per class, categories contiguous from 0."""
    if len(mapping) != num_classes:
        raise ConfigError(key, value, f"a category for each of the {num_classes} classes, got {len(mapping)}")
    used = sorted(set(mapping))
    if used != list(range(len(used))):
        gaps = sorted(set(range(max(used) + 1)) - set(used)) if used and min(used) >= 0 else []
        raise ConfigError(key, value, f"contiguous categories 0..K-1 (found {used[:10]}{' ...' if len(used) > 10 else ''}" + (f"; missing {gaps[:10]})" if gaps else ")"))
    return list(mapping)


def _category_pairs(path: Path, key: str) -> list[tuple[str, object]]:
    """(class, category) pairs of a CSV (``class,category`` rows, optional header) or JSON file
    (an object ``{"class": category}`` or a list of categories indexed by class)."""
    import csv
    import json

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(key, str(path), f"a readable CSV or JSON mapping file ({err})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(key, str(path), f"valid JSON ({err})") from None
        if isinstance(data, list):
            return [(str(i), c) for i, c in enumerate(data)]
        if isinstance(data, dict):
            return [(str(k), v) for k, v in data.items()]
        raise ConfigError(key, str(path), "a JSON object {class: category} or a list of categories")
    if path.suffix.lower() != ".csv":
        raise ConfigError(key, str(path), "a .csv or .json mapping file")
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if rows and not rows[0][-1].strip().lstrip("-").isdigit():
        rows = rows[1:]  # a header row
    if any(len(r) != 2 for r in rows):
        bad = next(r for r in rows if len(r) != 2)
        raise ConfigError(key, str(path), f"CSV rows 'class,category' (two columns), got {bad}")
    return [(r[0].strip(), r[1].strip()) for r in rows]


def load_categories(path: str | os.PathLike, num_classes: int, classes: list[str] | None = None, key: str = "categories") -> list[int]:
    """Class -> category list from a mapping file, validated: every class (index or name) mapped
    exactly once, integer categories contiguous from 0. Errors are ConfigErrors naming ``key``."""
    p = _abs(path)
    if not p.is_file():
        raise ConfigError(key, str(path), "an existing .csv or .json class -> category mapping file")
    names = {n: i for i, n in enumerate(classes or [])}
    out: dict[int, int] = {}
    for cls, cat in _category_pairs(p, key):
        idx = names.get(cls, int(cls) if cls.lstrip("-").isdigit() else None)
        if idx is None or not 0 <= idx < num_classes:
            raise ConfigError(key, str(path), f"classes given as indices 0..{num_classes - 1}" + (" or class names" if names else "") + f"; '{cls}' is neither")
        if idx in out:
            raise ConfigError(key, str(path), f"each class mapped once; class {cls} appears twice")
        try:
            out[idx] = int(str(cat))
        except ValueError:
            raise ConfigError(key, str(path), f"integer categories; class {cls} has {cat!r}") from None
    missing = [i for i in range(num_classes) if i not in out]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ConfigError(key, str(path), f"a category for every one of the {num_classes} classes; class(es) {shown} missing")
    return check_categories([out[i] for i in range(num_classes)], num_classes, key, str(path))


def cifar100_categories(cfg: DataConfig) -> list[int]:
    """CIFAR-100 fine class -> superclass, read from the training file's fine and coarse labels;
    a DataError when the file lacks them, a fine class has no sample or two superclasses."""
    _, folder, where = _cifar_location(cfg)
    try:
        with open(folder / "train", "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        pairs = [(int(a), int(b)) for a, b in zip(entry["fine_labels"], entry["coarse_labels"], strict=True)]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{where}: {folder / 'train'} is not a CIFAR-100 training file with fine and coarse labels ({err!r})") from None
    mapping: dict[int, int] = {}
    for fine, coarse in pairs:
        if mapping.setdefault(fine, coarse) != coarse:
            raise DataError(f"{where}: fine class {fine} has two superclasses ({mapping[fine]} and {coarse}) in {folder / 'train'}")
    missing, extra = sorted(set(range(100)) - set(mapping)), sorted(set(mapping) - set(range(100)))
    if missing or extra:
        raise DataError(f"{where}: {folder / 'train'} must label fine classes 0..99" + (f"; no sample of fine class(es) {missing[:10]}" if missing else "") + (f"; unknown fine class(es) {extra[:10]}" if extra else ""))
    return check_categories([mapping[i] for i in range(100)], 100, "data.root", cfg.root)


def _builtin_kind(cfg: DataConfig) -> str:
    """The dataset whose built-in grouping ``auto`` uses: the dataset's name, or ``cifar10`` for an
    image folder with CIFAR-10's ten class names."""
    if cfg.name == "imagefolder" and cfg.root and _imagefolder_index(cfg).classes == CIFAR10_CLASS_NAMES:
        return "cifar10"
    return cfg.name


def category_names(spec: str, cfg: DataConfig, k: int) -> list[str]:
    """Names of the ``k`` categories of :func:`class_categories`: the built-in groups', CIFAR-100's
    superclass names (its ``meta`` file), else ``category <i>``."""
    names = BUILTIN_CATEGORY_NAMES.get(_builtin_kind(cfg)) if spec == "auto" else None
    if spec == "auto" and cfg.name == "cifar100":
        try:
            with open(_cifar_location(cfg)[1] / "meta", "rb") as f:
                names = pickle.load(f, encoding="latin1")["coarse_label_names"]
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError):
            names = None
    return [str(n) for n in names] if names is not None and len(names) == k else [f"category {i}" for i in range(k)]


def class_categories(spec: str, cfg: DataConfig, num_classes: int, key: str = "categories") -> list[int] | None:
    """The class -> category list that ``spec`` names: ``none`` (no categories: None), ``auto``
    (CIFAR-100 superclasses, the built-in digits / CIFAR-10 groupings, the latter also for an image
    folder with CIFAR-10's class names; else None) or a mapping
    file path (see :func:`load_categories`; imagefolder class names may be used as keys)."""
    if spec == "none":
        return None
    if spec == "auto":
        if cfg.name == "cifar100":
            return cifar100_categories(cfg)
        builtin = BUILTIN_CATEGORIES.get(_builtin_kind(cfg))
        return list(builtin) if builtin and len(builtin) == num_classes else None
    classes = _imagefolder_index(cfg).classes if cfg.name == "imagefolder" else None
    return load_categories(spec, num_classes, classes, key)


# --------------------------------------------------------------------------------------------------
# inference on image files (pipelines.infer)


def eval_transform(cfg: DataConfig, image_size: int):
    """What evaluation does to one image of this dataset's kind, for image files from outside it:
    PIL image -> [3, S, S], normalised as in training (digits: grey, its own mean and std; CIFAR:
    its statistics; image folders: ImageNet's, CIFAR-style up to 64 px, else resize and centre crop)."""
    from torchvision import transforms as T

    if cfg.name == "digits":
        tr_x, *_ = _digits_arrays(image_size)
        mean, std = float(tr_x.mean()), float(tr_x.std())
        return T.Compose([T.Grayscale(), T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize([mean], [std]), T.Lambda(lambda x: x.repeat(3, 1, 1))])
    if cfg.name in CIFAR_STATS:
        return T.Compose([T.Lambda(lambda im: im.convert("RGB")), _small_transforms(image_size, CIFAR_STATS[cfg.name], False, resize=True)[1]])
    if cfg.name != "imagefolder":
        raise DataError(f"data.name={cfg.name}: its images are generated, not files; a model trained on it cannot read image files")
    small = image_size <= SMALL_IMAGE
    ev = _small_transforms(image_size, IMAGENET_STATS, False, resize=True)[1] if small else _large_transforms(image_size, IMAGENET_STATS, False)[1]
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), ev])


def class_names(cfg: DataConfig) -> list[str]:
    """The class names a model of this dataset predicts, by index ([] where unnamed)."""
    if cfg.name == "digits":
        return [str(i) for i in range(10)]
    if cfg.name == "cifar10":
        return list(CIFAR10_CLASS_NAMES)
    if cfg.name == "imagefolder" and cfg.root:
        return list(_imagefolder_index(cfg).classes)
    return []
