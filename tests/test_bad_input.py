"""Bad input, one row each: the command exits 2 with one line naming the key, the value and what
is allowed, before anything is written: no MLflow store or run, no checkpoint, no cache entry.

Every row runs the real command-line entry in-process (no Ray is started: the checks come first)."""

from __future__ import annotations

import functools
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

from dynlab import preflight
from pipelines import ablation_temperature, infer, reproduce_adn, reproduce_boostnet, reproduce_dmnn, reproduce_imta, train

TINY = ["msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2"]


def _image_tree(root: Path, train_classes, val_classes) -> Path:
    from PIL import Image

    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / c / "a.png")
    return root


def _truncated_zip(tmp: Path) -> Path:
    tree = _image_tree(tmp / "tree", ["a", "b"], ["a", "b"])
    z = tmp / "data.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in sorted(tree.rglob("*.png")):
            zf.write(f, f.relative_to(tree))
    z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])  # the central directory is gone
    return z


@functools.lru_cache(maxsize=None)
def _image_bytes(fmt: str, size: tuple[int, int]) -> bytes:
    """An image file's bytes (noise, so that a JPEG cut short loses pixels, not padding)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _zip_of(path: Path, members: dict[str, bytes], link: str = "") -> Path:
    """A zip of ``members``, plus ``link`` as a symlink member."""
    path.write_bytes(_zip_bytes(tuple(members.items()), link))
    return path


@functools.lru_cache(maxsize=None)
def _zip_bytes(members: tuple[tuple[str, bytes], ...], link: str) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # what `zip --symlinks` stores
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


BOMB = bytes(17 << 20)  # 17 MiB of zeros: a 17 KB "image" member


def _bad_image_data(t: Path) -> None:
    """Image folders and zips that list well but hold a bad file, and weights files that load but
    are no usable start: what the issue-15 rows point at. Every file from cached bytes (fast)."""
    png = _image_bytes("PNG", (8, 8))
    good = {f"{split}/{c}/0.png": png for split in ("train", "val") for c in ("a", "b")}
    for name, extra in {
        "readme": {"train/docs/README.txt": b"about this data set"},
        "mixed": {"train/a/tiny.png": _image_bytes("PNG", (3, 3)), "train/b/photo.jpg": _image_bytes("JPEG", (100, 75))},
        "zerobyte": {"train/a/empty.jpg": b""},
        "text": {"train/b/notes.jpg": b"not an image, whatever its name says"},
        "cut": {"train/a/cut.jpg": _image_bytes("JPEG", (64, 64))[:-1500]},  # the header is whole, the pixels are not
    }.items():
        for rel, data in {**good, **extra}.items():
            (t / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (t / name / rel).write_bytes(data)
    _zip_of(t / "good.zip", good)
    _zip_of(t / "link.zip", good, link="train/a/link.jpg")
    _zip_of(t / "bomb.zip", {**good, "train/a/bomb.png": BOMB})
    locked = _zip_of(t / "locked.zip", good)  # its first member, train/a/0.png, marked encrypted:
    raw = bytearray(locked.read_bytes())  # zipfile writes no encryption, so set the flag bit in the
    raw[6] |= 1  # member's local header and in its central directory entry
    raw[raw.find(b"PK\x01\x02") + 8] |= 1
    locked.write_bytes(bytes(raw))
    os.mkfifo(t / "pipe")
    torch.save({"conv.weight": torch.tensor([[1.0, float("nan")]])}, t / "nan.pt")
    torch.save(torch.zeros(3), t / "tensor.pt")


# (pipeline, args, fragments of the one-line message); "{tmp}" is the test's folder
ROWS = [
    ("train", ["boostnet.temprature=0.5"], ["'boostnet.temprature'", "did you mean 'boostnet.temperature'?"]),
    ("train", ["run.epoch=2"], ["'run.epoch'", "did you mean 'run.epochs'?"]),
    ("train", ["temprature=0.5"], ["'temprature'", "did you mean 'boostnet.temperature'?"]),
    ("train", ["epochs=two"], ["'run.epochs' = 'two'", "an integer"]),
    ("train", ["epochs=0"], ["'run.epochs' = 0", ">= 1"]),
    ("train", ["batch_size=0"], ["'data.batch_size' = 0", ">= 1"]),
    ("train", ["seed=-1"], ["'run.seed' = -1", ">= 0"]),
    ("train", ["boostnet.temperature=-1"], ["'boostnet.temperature' = -1.0", ">= 0.0"]),
    ("train", ["optim.lr=fast"], ["'optim.lr' = 'fast'", "a number"]),
    ("train", ["optim.lr=nan"], ["'optim.lr'", "a finite number"]),
    ("train", ["optim.lr=inf"], ["'optim.lr' = inf", "a finite number"]),
    ("temperature", ["sweep.values=[0.5,-inf]"], ["'sweep.values[1]' = -inf", "a finite number"]),
    ("train", ["optim.momentum=1.5"], ["'optim.momentum' = 1.5", "<= 1.0"]),
    ("train", ["method=dmnn", "preset=dmnn-resnet-small", "dmnn.gate_warmup=1.5"], ["'dmnn.gate_warmup' = 1.5", "<= 1.0"]),
    ("train", ["run.use_gpu=maybe"], ["'run.use_gpu' = 'maybe'", "true or false"]),
    ("train", ["run.amp=fp8"], ["'run.amp' = 'fp8'", "one of none, bf16, fp16"]),
    ("train", ["method=nosuch"], ["'method' = 'nosuch'", "one of adn, boostnet"]),
    ("train", ["backbone=resnet"], ["'backbone' = 'resnet'", "msdnet, ranet"]),
    ("train", ["preset=msdnet-nope"], ["msdnet-nope", "msdnet-cifar100-b7"]),
    ("train", ["dataset=mnist"], ["'data.name' = 'mnist'", "digits"]),
    ("train", ["preset=ranet-cifar100-anytime", "backbone=msdnet"], ["'backbone' = 'msdnet'", "the backbone of preset 'ranet-cifar100-anytime'"]),
    ("train", ["backbone=ranet", "boostnet.gradient_rescale=true"], ["'boostnet.gradient_rescale' = True", "does not implement it"]),
    ("train", ["method=joint", "boostnet.temperature=0.5"], ["'boostnet.temperature'", "a known key"]),
    ("train", ["eval.budgets=[0.001]", *TINY], ["'eval.budgets' = [0.001]", "MMACs per image within"]),
    ("train", ["eval.budgets=[-1]"], ["'eval.budgets' = [-1.0]", "positive budgets"]),
    ("train", ["eval.budgets=[1,2"], ["'eval.budgets' = '[1,2'", "unbalanced brackets"]),
    ("train", ["eval.budgets=1,,2"], ["'eval.budgets'", "an empty item"]),
    ("train", ["boostnet.exit_weights=[1,2,3]", *TINY], ["'boostnet.exit_weights' = [1.0, 2.0, 3.0]", "2 numbers, one per exit"]),
    ("train", ["workers=0", "run.kill_after_epoch=0"], ["'run.kill_after_epoch' = 0", "in-process it would kill the driver"]),
    ("train", ["optim.milestones=[0.8,0.2]"], ["'optim.milestones'", "increasing fractions"]),
    ("train", ["data.heldout=5000"], ["'data.heldout' = 5000", "fewer than the 1297 training images"]),
    ("train", ["data.heldout=0"], ["'data.heldout' = 0", "eval.num_budgets=0 eval.p_grid=false"]),
    ("train", ["data.train_subset=998"], ["'data.train_subset' = 998", "1 image per class .. 997 (the training split of 'digits' after the 300 held-out images)"]),
    ("train", ["data.train_subset=5"], ["'data.train_subset' = 5", "at least one image per class (10 classes)"]),
    ("train", ["dataset=imagefolder"], ["'data.root'", "ImageNet layout"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/nowhere"], ["nowhere", "does not exist"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/data.zip"], ["data.zip", "not a readable .zip archive"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/empty"], ["empty", "no train/ and val/"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/noclasses"], ["noclasses", "no class folders with images"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/mismatch"], ["mismatch", "zebra", "no counterpart in train/"]),
    ("train", ["dataset=cifar10", "data.root={tmp}/nowhere"], ["data.root", "CIFAR-10 not found"]),
    ("train", ["config={tmp}/broken.yaml"], ["broken.yaml", "valid YAML", "line 3"]),
    ("train", ["config={tmp}/missing.yaml"], ["missing.yaml", "an existing YAML file"]),
    ("train", ["config={tmp}/list.yaml"], ["list.yaml", "a YAML mapping"]),
    ("train", ["config={tmp}/typo.yaml"], ["'run.epoch'", "did you mean 'run.epochs'?"]),
    ("train", ["noequals"], ["'noequals'", "key=value"]),
    ("train", ["run.storage_path={tmp}/afile/runs"], ["'run.storage_path'", "a writable folder"]),
    ("train", ["sweep.cache_dir={tmp}/afile/cache"], ["'sweep.cache_dir'", "a writable folder"]),
    ("train", ["run.name=corrupt", "run.storage_path={tmp}/runs"], ["state.pt cannot be read", "use another run.name"]),
    ("train", ["run.name=other-arch", "run.storage_path={tmp}/runs"], ["'run.name' = 'other-arch'", "another architecture"]),
    ("train", ["run.init_from={tmp}/runs/other-arch/epoch_0000/best.pt"], ["'run.init_from'", "weights of this architecture"]),
    ("train", ["run.init_from={tmp}/nothing.pt"], ["'run.init_from'", "a readable .pt file"]),
    ("temperature", ["sweep.values=[0.25,0.25]"], ["'sweep.values' = [0.25, 0.25]", "distinct values"]),
    ("temperature", ["sweep.values=[hot,cold]"], ["'sweep.values[0]' = 'hot'", "a number"]),
    ("temperature", ["sweep.values=-1,0.5"], ["'boostnet.temperature' = -1.0", ">= 0.0"]),
    ("train", ["run.cpus_per_worker=0"], ["'run.cpus_per_worker' = 0.0", "more than 0 for Ray Train workers without a GPU"]),
    ("train", ["run.storage_path={tmp}/ray/session_1/runtime_resources/runs"], ["'run.storage_path'", "outside Ray's session folder"]),
    ("temperature", ["sweep.cache_dir=s3://bucket/cache"], ["'sweep.cache_dir' = 's3://bucket/cache'", "a folder (local, or on a shared file system"]),
    ("train", ["workers=0", "run.storage_path=s3://bucket/runs"], ["'run.num_workers' = 0", "at least 1 with remote storage (s3://bucket/runs)"]),
    ("train", ["method=imta", "imta.alpha=1.5"], ["'imta.alpha' = 1.5", ">= 0.0 and <= 1.0"]),
    ("train", ["method=imta", "imta.temperature=0"], ["'imta.temperature' = 0.0", "a number > 0"]),
    ("train", ["method=imta", "imta.phase=2"], ["'run.init_from' = ''", "a phase-I checkpoint", "imta.phase=2"]),
    ("train", ["method=imta", "imta.phase=2", "run.init_from={tmp}/runs/other-arch/epoch_0000/best.pt"], ["'run.init_from'", "other-arch", "a checkpoint of this msdnet", "differ from this model's", "same backbone settings"]),
    # --- issue 15, image data and weights files ---
    # silently wrong data: a class no image teaches, an input size taken from whichever file came first
    ("train", ["dataset=imagefolder", "data.root={tmp}/readme"], ["class folder(s) train/docs hold no images", "add its images or remove it"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/mixed"], ["image sizes disagree", "train/a/tiny.png is 3x3", "is 100x75", "set data.image_size=N"]),
    # files that look like images until opened: each named before anything starts
    ("train", ["dataset=imagefolder", "data.root={tmp}/zerobyte"], ["train/a/empty.jpg is empty (0 bytes)", "replace or remove it"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/text"], ["image train/b/notes.jpg cannot be read", "UnidentifiedImageError"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/cut"], ["image train/a/cut.jpg cannot be read", "truncated"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/link.zip"], ["zip member train/a/link.jpg is a symbolic link"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/locked.zip"], ["zip member train/a/0.png is encrypted (password-protected)"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/bomb.zip"], ["zip member train/a/bomb.png expands", "a compression bomb"]),
    ("train", ["data.image_size=20000"], ["'data.image_size' = 20000", "0 (the dataset's own size) or 8 .. 256 pixels for digits"]),
    ("train", ["dataset=synthetic", "data.image_size=20000"], ["'data.image_size' = 20000", "8 .. 1024 pixels for synthetic"]),
    # not a folder or a file: /dev/zero was read until the kernel killed it, a named pipe waited for ever
    ("train", ["dataset=imagefolder", "data.root=/dev/zero"], ["/dev/zero", "is a character device, not a folder or a regular file"]),
    ("train", ["dataset=imagefolder", "data.root={tmp}/pipe"], ["pipe", "is a named pipe, not a folder or a regular file"]),
    # the zip is extracted by the first worker: a cache folder under a regular file is unwritable for root too
    ("train", ["dataset=imagefolder", "data.root={tmp}/good.zip", "$DYNLAB_CACHE={tmp}/afile/cache"], ["'DYNLAB_CACHE'", "a writable folder", "Not a directory", "to extract the images of data.root's zip"]),
    ("train", ["run.init_from={tmp}/nan.pt"], ["'run.init_from'", "nan.pt", "finite weights: tensor 'conv.weight' holds NaN or inf"]),
    ("train", ["run.init_from={tmp}/tensor.pt"], ["'run.init_from'", "tensor.pt", "a state dict", "this file holds a Tensor"]),
    # --- issue 15, run names, storage, tracking and Ray address ---
    # a name becomes a folder: one with a path in it wrote (and resumed) outside the storage folder
    ("train", ["run.name=../runs/other-arch"], ["'run.name' = '../runs/other-arch'", "ASCII letters, digits, '-', '_' and '.'", "no path separators, '..'"]),
    ("train", ["run.name={tmp}/runs/other-arch"], ["'run.name'", "other-arch", "no path separators"]),
    ("train", ["run.name=.."], ["'run.name' = '..'", "not starting with '.'"]),
    ("train", ["run.name=" + "x" * 300], ["'run.name' = 'xxx", "(302 characters)", "1 to 100 characters"]),
    ("train", ["run.name=été"], ["'run.name' = 'été'", "ASCII letters"]),
    ("train", ["run.name=a\tb"], ["'run.name' = 'a\\tb'", "ASCII letters"]),
    ("temperature", ["run.experiment=../../elsewhere"], ["'run.experiment' = '../../elsewhere'", "no path separators"]),
    ("train", ["run.storage_path={tmp}/loop"], ["'run.storage_path'", "not a symlink loop"]),
    ("train", ["$MLFLOW_TRACKING_URI=sqlite:///{tmp}/empty"], ["'MLFLOW_TRACKING_URI'", "a SQLite database file", "is a folder"]),
    ("train", ["$MLFLOW_TRACKING_URI=sqlite:///{tmp}/afile"], ["'MLFLOW_TRACKING_URI'", "a SQLite database file", "another kind of file"]),
    # a HOME under a regular file: unwritable for root too (chmod is not); a local Ray writes its token there
    ("train", ["$HOME={tmp}/afile/home", "$RAY_AUTH_MODE=token", "$RAY_AUTH_TOKEN=", "$RAY_AUTH_TOKEN_PATH="], ["'HOME' =", "a writable home folder", ".ray/auth_token", "Not a directory"]),
    ("train", ["$RAY_ADDRESS=127.0.0.1:9"], ["'RAY_ADDRESS' = '127.0.0.1:9'", "a running Ray cluster", "unset RAY_ADDRESS"]),
    ("temperature", ["$RAY_ADDRESS=ray://127.0.0.1:9"], ["'RAY_ADDRESS' = 'ray://127.0.0.1:9'", "a running Ray cluster"]),
    # --- issue 15, YAML and sweep size ---
    ("train", ["config={tmp}/twice.yaml"], ["'run.epochs'", "twice.yaml", "each key once: given at line 2 and again at line 4"]),
    ("train", ["config={tmp}/twice_dotted.yaml"], ["'run.epochs'", "given at line 1 and again at line 3"]),
    ("train", ["config={tmp}/laughs.yaml"], ["laughs.yaml", "at most 10000 values once its aliases (*name) are expanded"]),
    ("train", ["config={tmp}/deep.yaml"], ["deep.yaml", "nests too deep"]),
    ("temperature", ["sweep.repeats=100000"], ["'sweep.repeats' = 100000", "at most 200 trials", "600000 (6 point(s) x 100000 seed(s))", "sweep.allow_large=true"]),
    ("temperature", ["sweep.values=[" + ",".join(str(i) for i in range(1000)) + "]"], ["'sweep.values' = [0.0, 1.0, 2.0", "(6890 characters)", "1001 (1001 point(s) x 1 seed(s))"]),
    ("temperature", ["sweep.values=[" + ",".join(["1"] * 999) + ",x]"], ["'sweep.values[999]' = 'x'", "a number"]),
]


# Rows that depend on what the machine (or the Ray cluster) offers: the refused values are derived
# from the resources the preflight itself reads, so they are refused on any machine: {cpus} CPUs in
# all, {node_cpus} on the largest node, {gpus} GPUs.
RESOURCE_ROWS = [
    ("train", ["workers={over_cpus}"], ["'run.num_workers' = {over_cpus}", "at most {cpus} workers of 1 CPU each", "the Ray cluster has {cpus} CPU(s)"]),
    ("train", ["run.use_gpu=true", "workers={over_gpus}"], ["{gpu_key}", "and {gpus} GPU(s)"]),
    ("train", ["run.cpus_per_worker={over_node}"], ["'run.cpus_per_worker' = {over_node}.0", "at most {node_cpus} (the largest node's CPUs)"]),
    ("temperature", ["workers={all_cpus}"], ["'run.num_workers' = {all_cpus}", "with the trial's own 0.05"]),
    # a paper-scale reproduction asks for GPUs (data.name=synthetic: the row needs no dataset)
    ("reproduce", ["scale=paper", "data.name=synthetic", "data.heldout=-1", "workers={over_gpus}"], ["{gpu_key}", "and {gpus} GPU(s)"]),
]
ROWS += [
    ("reproduce", ["scale=huge"], ["'repro.scale' = 'huge'", "one of smoke, laptop, paper"]),
    ("reproduce", ["repro.only=[imagenet-msdnet]"], ["'repro.only' = ['imagenet-msdnet']", "experiments of scale smoke: cifar100-msdnet, cifar100-ranet"]),
    ("reproduce", ["scale=laptop", "data.root={tmp}/nope.zip"], ["data.root = '{tmp}/nope.zip'", "does not exist"]),
    ("reproduce_dmnn", ["scale=laptop", "repro.only=[table3-cifar100]"], ["'repro.only' = ['table3-cifar100']", "experiments of scale laptop: cifar10-resnet"]),
    ("reproduce_dmnn", ["dmnn_resnet.controller_prev=maybe"], ["'dmnn_resnet.controller_prev' = 'maybe'", "true or false"]),
    ("reproduce", ["scale=paper", "data.name=synthetic", "data.heldout=-1", "repro.only=[cifar100-msdnet]", "data.train_subset=5"], ["'data.train_subset' = 5", "at least one image per class (10 classes)"]),
    ("reproduce_imta", ["method=joint"], ["'method' = 'joint'", "imta (this pipeline trains IMTA's two phases)"]),
    ("reproduce_adn", ["scale=laptop", "repro.only=[table1-resnet50]"], ["'repro.only' = ['table1-resnet50']", "experiments of scale laptop: cifar10-resnet, cifar10-resnet-ablation, cifar10-vit"]),
    ("reproduce_adn", ["adn.subnets=[base,TTT]"], ["'adn.subnets' = ['base', 'TTT']", "or base / super"]),
    ("train", ["run.register_model=my model"], ["'run.register_model' = 'my model'", "ASCII letters, digits"]),
    ("train", ["optim.decay_norms=sometimes"], ["'optim.decay_norms' = 'sometimes'", "true or false"]),
    ("infer", ["model={tmp}/no-such-model", "data.root={tmp}"], ["'model' = '{tmp}/no-such-model'", "the URI of a logged dynlab model"]),
    ("infer", ["data.root={tmp}"], ["'model' is required"]),
    ("infer", ["model=models:/m/1", "size=3"], ["argument 'size=3' is not allowed", "model, data.root, budget, out, batch_size"]),
]
ROWS += [  # the training-recipe keys (dynlab.recipe)
    ("train", ["optim.name=adam"], ["'optim.name' = 'adam'", "one of sgd, adamw"]),
    ("train", ["data.mixup=-0.2"], ["'data.mixup' = -0.2", ">= 0.0"]),
    ("train", ["method=adn", "preset=adn-resnet-cifar", "adn.feature_stages=[0,9]"], ["'adn.feature_stages' = [0, 9]", "distinct stage numbers from 1"]),
    ("train", ["method=adn", "preset=adn-mobilenetv2", "adn_mobilenetv2.mandatory=[99]"], ["'adn_mobilenetv2.mandatory' = [99]", "5 block counts, each from 1 to its group's size"]),
    ("train", ["method=dmnn", "preset=dmnn-resnet-small", "data.cutmix=1"], ["'data.cutmix' = 1.0", "0 with method=dmnn", "class indices only"]),
    ("train", ["optim.label_smoothing=1"], ["'optim.label_smoothing' = 1.0", "< 1"]),
    ("train", ["optim.min_lr=0.001"], ["'optim.min_lr' = 0.001", "0 with optim.schedule=multistep"]),
    ("train", ["data.auto_augment=autoaugment"], ["'data.auto_augment' = 'autoaugment'", "one of none, randaugment, trivialaugment"]),
    ("train", ["data.random_erasing=0.25", "data.augment=false"], ["'data.random_erasing' = 0.25", "0 with data.augment=false"]),
    ("train", ["run.ema_eval=true"], ["'run.ema_eval' = True", "false while run.ema_decay=0"]),
    ("train", ["run.ema_decay=1"], ["'run.ema_decay' = 1.0", "< 1"]),
]
ROWS += RESOURCE_ROWS


def machine_values(nodes: list[dict[str, float]]) -> dict[str, str]:
    """The placeholders of RESOURCE_ROWS for a cluster of ``nodes`` (preflight.cluster_nodes())."""
    cpus = int(sum(n.get("CPU", 0.0) for n in nodes))
    node_cpus = int(max(n.get("CPU", 0.0) for n in nodes))
    gpus = int(sum(n.get("GPU", 0.0) for n in nodes))
    return {
        "cpus": str(cpus), "node_cpus": str(node_cpus), "gpus": str(gpus),
        "over_cpus": str(cpus + 1),  # one 1-CPU worker more than the cluster holds
        "over_node": str(node_cpus + 1),
        "over_gpus": str(gpus + 1),
        # no GPU at all: the line names run.use_gpu; too few: it names the worker count
        "gpu_key": "'run.use_gpu' = True" if gpus == 0 else f"'run.num_workers' = {gpus + 1}",
        "all_cpus": str(max(cpus, 2)),  # every CPU to workers leaves none for the trial's own driver
    }


@pytest.fixture
def inputs(in_tmp):
    """The files the rows point at: broken YAML, bad data trees, a file where a folder should be,
    checkpoints that cannot be resumed."""
    t = in_tmp
    (t / "broken.yaml").write_text("run:\n  epochs: 2\n\tseed: 1\n")  # a tab cannot indent YAML
    (t / "list.yaml").write_text("- epochs\n- 3\n")
    (t / "typo.yaml").write_text("run:\n  epoch: 2\n")
    (t / "afile").write_text("not a folder")
    (t / "empty").mkdir()
    (t / "noclasses" / "train").mkdir(parents=True)
    (t / "noclasses" / "val").mkdir(parents=True)
    _image_tree(t / "mismatch", ["cat", "dog"], ["cat", "zebra"])
    _truncated_zip(t)
    _bad_image_data(t)
    corrupt = t / "runs" / "corrupt" / "epoch_0000"
    corrupt.mkdir(parents=True)
    for name in ("state.pt", "best.pt", "config.yaml"):
        (corrupt / name).write_bytes(b"\x80\x02 truncated")
    other = t / "runs" / "other-arch" / "epoch_0000"
    other.mkdir(parents=True)
    state = {"model": {"conv.weight": torch.zeros(3, 3, 1, 1)}}
    torch.save(state, other / "state.pt")
    torch.save(state["model"], other / "best.pt")
    (other / "config.yaml").write_text("method: boostnet\n")
    (t / "loop").symlink_to(t / "loop")  # a symlink to itself
    (t / "twice.yaml").write_text("run:\n  epochs: -5\n  seed: 1\n  epochs: 2\n")  # the invalid first value was hidden
    (t / "twice_dotted.yaml").write_text("run.epochs: 2\nrun:\n  epochs: 3\n")
    # "billion laughs": 10 aliases to 10 aliases ... six levels deep, 10^6 values from a few lines
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcde", "bcdef")]
    (t / "laughs.yaml").write_text("\n".join(levels) + "\nrun:\n  epochs: *f\n")
    (t / "deep.yaml").write_text("run: " + "[" * 50000 + "]" * 50000 + "\n")
    return t


def _written(root: Path) -> list[str]:
    """What a run would leave: an MLflow store, checkpoints or a step cache."""
    names = ("mlflow.db", "mlruns", "dynlab_runs", "cache")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name in names or p.name.startswith(".dynlab-probe"))


@pytest.mark.parametrize("pipeline, args, fragments", ROWS, ids=[f"{i:02d}-{' '.join(r[1])[:40]}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_and_leaves_no_trace(inputs, capsys, monkeypatch, pipeline, args, fragments):
    values = machine_values(preflight.cluster_nodes())  # before the row's environment (a RAY_ADDRESS) applies
    for var, _, value in (a[1:].partition("=") for a in args if a.startswith("$")):  # "$VAR=value": the environment it runs in
        monkeypatch.setenv(var, value.replace("{tmp}", str(inputs)))
    args = [a for a in args if not a.startswith("$")]
    assert_refused(inputs, capsys, pipeline, args, fragments, values)


def assert_refused(root: Path, capsys, pipeline: str, args: list[str], fragments: list[str], values: dict[str, str]) -> None:
    """One row: exit 2, one line with every fragment, nothing written under ``root``."""
    before = _written(root)
    values = {**values, "tmp": str(root)}
    fill = lambda text: re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)  # noqa: E731
    args = [fill(a) for a in args]
    main = {"train": train.main, "temperature": ablation_temperature.main, "reproduce": reproduce_boostnet.main, "reproduce_dmnn": reproduce_dmnn.main, "reproduce_imta": reproduce_imta.main, "reproduce_adn": reproduce_adn.main, "infer": infer.main}[pipeline]
    assert main(args) == 2
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.out
    assert "Traceback" not in out.out + out.err, out.err[-3000:]
    for fragment in map(fill, fragments):
        assert fragment in lines[0], lines[0]
    assert _written(root) == before  # no MLflow store, run, checkpoint or cache entry appeared


@pytest.mark.slow
def test_resource_rows_are_refused_by_a_cluster_larger_than_this_machine(inputs, capsys):
    """The resource rows read the cluster, not the machine: a local Ray that declares more CPUs
    (8 more) and a GPU than this machine has still refuses every one of them, at its own sizes."""
    import ray

    here = machine_values(preflight.cluster_nodes())
    ray.init(address="local", num_cpus=int(here["cpus"]) + 8, num_gpus=1, include_dashboard=False)
    capsys.readouterr()  # Ray's own start-up lines are not the rows' output
    try:
        nodes = preflight.cluster_nodes()
        values = machine_values(nodes)
        assert int(values["cpus"]) > int(here["cpus"]) and values["gpus"] == "1"
        for pipeline, args, fragments in RESOURCE_ROWS:
            assert_refused(inputs, capsys, pipeline, args, fragments, values)
    finally:
        ray.shutdown()


def test_the_table_is_long_enough():
    assert len(ROWS) >= 30


def test_unreachable_tracking_server_fails_in_seconds(in_tmp, capsys, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    t0 = time.time()
    assert train.main([]) == 2
    assert time.time() - t0 < 15
    line = capsys.readouterr().out.strip()
    assert line.startswith("error: config 'MLFLOW_TRACKING_URI' = 'http://127.0.0.1:9'") and "reachable MLflow tracking server" in line
    assert not (in_tmp / "mlflow.db").exists()
