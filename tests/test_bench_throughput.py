"""The throughput and data-loading benchmarks compare like with like (tiny sizes; timings never
asserted), and the accelerator keys (run.channels_last, run.compile, data.pin_memory,
data.loader_workers=-1) keep results as they are."""

from __future__ import annotations

import pytest
import torch

import methods  # noqa: F401
from benchmarks import data_loading, throughput
from dynlab import accel, config, training
from dynlab.errors import ConfigError

# 64 training images of 16x16 (8 held out), batch 16: 4 steps an epoch
TINY = ["dataset=synthetic", "data.synthetic_train=72", "data.image_size=16", "data.heldout=8", "batch_size=16", "msdnet.n_blocks=2"]


def tiny(*extra: str) -> config.Config:
    return config.cli_config(["optim.schedule=constant", "run.num_workers=0", *TINY, *extra])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in training.unwrap(model).state_dict().items()}


def test_our_loop_and_the_bare_loop_train_the_same_weights():
    cfg = tiny()
    ours = throughput.Ours(cfg, torch.device("cpu"))
    bare = throughput.Bare(cfg, torch.device("cpu"), ours.loop.bundle.train, ours.loop.bundle.info, 0, False)
    assert throughput.epoch_images(ours.loader) == throughput.epoch_images(bare.loader) == 64
    assert [i for i in ours.sampler] == [i for i in bare.sampler]  # the same sample order
    w0, b0 = weights(ours.model), weights(bare.model)
    assert all(torch.equal(w0[k], b0[k]) for k in w0)  # the same initial weights
    for _ in range(2):
        metrics = ours.run_epoch()
        bare.run_epoch()
    w, b = weights(ours.model), weights(bare.model)
    assert any(not torch.equal(w[k], w0[k]) for k in w)  # it trained
    for k in w:
        torch.testing.assert_close(w[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert metrics["train/loss"] > 0


def test_throughput_benchmark_prints_both_rates_and_the_ratio(capsys):
    results = throughput.main([*TINY, "--repeats", "2"])
    out = capsys.readouterr().out
    assert "threads" in out and "device cpu" in out
    assert "ours" in out and "bare" in out and "ratio ours/bare" in out
    (label, res), = results
    assert len(res.ours) == len(res.bare) == len(res.ratios) == 2 and res.images == 64
    # the rate a reproduction's --plan takes: forward + backward = 3 forward passes per image
    import re
    import statistics

    from dynlab import data, registry

    cfg = tiny()
    fwd = registry.get_method(cfg.method).cls(cfg).build_model(data.dataset_info(cfg.data)).cost_table.macs[-1]
    printed = float(re.search(r"repro.throughput=(\S+)\)", out).group(1))
    assert printed == pytest.approx(3 * fwd * statistics.median(res.ours), rel=1e-2)


def test_keys_a_cpu_cannot_time_are_skipped_with_a_reason(capsys):
    cpu = torch.device("cpu")
    assert "CUDA" in throughput.skip_reason(tiny().with_overrides({"run.use_gpu": True, "run.amp": "fp16"}), cpu)
    assert "DYNLAB_BENCH_CPU_COMPILE" in throughput.skip_reason(tiny("run.compile=true"), cpu)
    assert throughput.skip_reason(tiny("run.amp=bf16", "run.channels_last=true"), cpu) is None


def test_channels_last_and_bf16_keep_training_results_on_cpu():
    runs = {}
    for name, extra in (("plain", []), ("channels_last", ["run.channels_last=true"]), ("bf16", ["run.amp=bf16"])):
        ours = throughput.Ours(tiny(*extra), torch.device("cpu"))
        if name == "channels_last":
            conv = next(m for m in ours.model.modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        loss = ours.run_epoch()["train/loss"]
        runs[name] = weights(ours.model), loss
    (plain, plain_loss), (cl, cl_loss), (bf16, bf16_loss) = runs["plain"], runs["channels_last"], runs["bf16"]
    for k in plain:
        torch.testing.assert_close(cl[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)
    assert cl_loss == pytest.approx(plain_loss, rel=1e-5)
    assert bf16_loss != plain_loss and bf16_loss == pytest.approx(plain_loss, rel=0.05)  # rounds differently, trains alike


def test_compile_key_compiles_in_place_and_keeps_checkpoint_keys():
    # Running the compiled model on a CPU builds C++ kernels first (beyond this file's budget): the GPU procedure (docs/gpu.md) times it. Here: the wiring, which is lazy.
    cfg = tiny("run.compile=true")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    keys = list(model.state_dict())
    out = accel.prepare_model(model, cfg, torch.device("cpu"))
    assert out is model and list(out.state_dict()) == keys
    assert getattr(out, "_compiled_call_impl", None) is not None


def test_accelerator_keys_are_validated_and_resolved():
    assert tiny("data.pin_memory=true").data.pin_memory == "true"
    assert tiny("data.pin_memory=off").data.pin_memory == "false"
    with pytest.raises(ConfigError, match="data.pin_memory"):
        tiny("data.pin_memory=sometimes")
    with pytest.raises(ConfigError, match="run.amp"):
        tiny("run.amp=fp16")  # fp16 needs a GPU; bf16 runs on a CPU
    with pytest.raises(ConfigError, match="data.loader_workers"):
        tiny("data.loader_workers=-2")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert accel.pin_memory(tiny(), cpu) is False and accel.pin_memory(tiny(), gpu) is True
    assert accel.pin_memory(tiny("data.pin_memory=false"), gpu) is False
    auto = config.cli_config(["data.loader_workers=-1"])  # digits: in memory
    assert accel.loader_workers(auto, gpu) == 0
    folder = auto.with_overrides({"dataset": "imagefolder", "data.root": "/x", "run.cpus_per_worker": 8})
    assert accel.loader_workers(folder, gpu) == 7 and accel.loader_workers(folder.with_overrides({"run.cpus_per_worker": 1}), gpu) == 0
    assert accel.loader_workers(folder.with_overrides({"data.loader_workers": 3}), gpu) == 3


def test_loader_batches_are_identical_with_0_and_2_workers():
    # Without augmentation: with it, each worker draws its own random crops (PyTorch's per-worker seeds).
    batches = {}
    for workers in (0, 2):
        loop = training.build_loop(tiny(f"data.loader_workers={workers}", "data.augment=false"))
        sampler, loader, _ = training.make_loaders(loop)
        assert loader.num_workers == workers
        sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert len(batches[0]) == len(batches[2]) == 4
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_data_loading_benchmark_gives_a_row_per_setting(capsys):
    rows = data_loading.main(["--cases", "digits", "--workers", "0,1", "--subset", "64", "batch_size=16", "msdnet.n_blocks=2"])
    out = capsys.readouterr().out
    assert [(r.case, r.workers) for r in rows] == [("digits", 0), ("digits", 1)]
    assert all(r.images == 64 and r.compute > 0 and r.loader > 0 and r.train > 0 for r in rows)
    assert "pin_memory: not timed" in out and "starving settings" in out
