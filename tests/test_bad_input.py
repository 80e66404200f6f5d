"""Bad input, one row each: the command exits 2 with one line naming the key, the value and what
is allowed, before anything is written: no MLflow store or run, no checkpoint, no cache entry.

Every row runs the real command-line entry in-process (no Ray is started: the checks come first)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import torch

from dynlab import preflight
from pipelines import ablation_temperature, train

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
    # --- issue 15, run names, storage, tracking and Ray address ---
    # --- issue 15, YAML and sweep size ---
]


# Rows that depend on what the machine (or the Ray cluster) offers: the refused values are derived
# from the resources the preflight itself reads, so they are refused on any machine: {cpus} CPUs in
# all, {node_cpus} on the largest node, {gpus} GPUs.
RESOURCE_ROWS = [
    ("train", ["workers={over_cpus}"], ["'run.num_workers' = {over_cpus}", "at most {cpus} workers of 1 CPU each", "the Ray cluster has {cpus} CPU(s)"]),
    ("train", ["run.use_gpu=true", "workers={over_gpus}"], ["{gpu_key}", "and {gpus} GPU(s)"]),
    ("train", ["run.cpus_per_worker={over_node}"], ["'run.cpus_per_worker' = {over_node}.0", "at most {node_cpus} (the largest node's CPUs)"]),
    ("temperature", ["workers={all_cpus}"], ["'run.num_workers' = {all_cpus}", "with the trial's own 0.05"]),
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
    return t


def _written(root: Path) -> list[str]:
    """What a run would leave: an MLflow store, checkpoints or a step cache."""
    names = ("mlflow.db", "mlruns", "dynlab_runs", "cache")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name in names or p.name.startswith(".dynlab-probe"))


@pytest.mark.parametrize("pipeline, args, fragments", ROWS, ids=[f"{i:02d}-{' '.join(r[1])[:40]}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_and_leaves_no_trace(inputs, capsys, monkeypatch, pipeline, args, fragments):
    assert_refused(inputs, capsys, pipeline, args, fragments, machine_values(preflight.cluster_nodes()))


def assert_refused(root: Path, capsys, pipeline: str, args: list[str], fragments: list[str], values: dict[str, str]) -> None:
    """One row: exit 2, one line with every fragment, nothing written under ``root``."""
    before = _written(root)
    values = {**values, "tmp": str(root)}
    fill = lambda text: re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)  # noqa: E731
    args = [fill(a) for a in args]
    main = train.main if pipeline == "train" else ablation_temperature.main
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
