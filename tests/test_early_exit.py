import contextlib
import math

import pytest
import torch

from dynlab import config, evaluation
from dynlab.data import static_info
from dynlab.early_exit import early_exit
from dynlab.registry import get_method


def build(method: str, *args, dtype=torch.float64):
    cfg = config.cli_config([f"method={method}", *(args or ["msdnet.n_blocks=4"])])
    return _prepared(get_method(method).cls(cfg), dtype)


def build_tiny(method: str, backbone: str, dtype=torch.float64):
    if backbone == "ranet":
        return build(method, "backbone=ranet", "ranet.n_blocks=2", "ranet.block_step=1", dtype=dtype)
    return build(method, dtype=dtype)


def _prepared(m, dtype=torch.float64):
    torch.manual_seed(0)
    model = m.build_model(static_info("digits")).to(dtype).eval()
    for m in model.modules():  # random BN statistics, so that exits disagree and confidences spread
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


# precision -> (parameter and input dtype, autocast dtype or None)
PRECISIONS = {"float64": (torch.float64, None), "float32": (torch.float32, None), "bf16-autocast": (torch.float32, torch.bfloat16)}


def in_precision(precision: str):
    autocast = PRECISIONS[precision][1]
    return torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()


def simulated(model, x, precision: str):
    """Every exit for every sample (the simulation), in the given precision."""
    with torch.no_grad(), in_precision(precision):
        logits = torch.stack(model(x))
    return evaluation.confidence(logits)


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("backbone", ["msdnet", "ranet"])
@pytest.mark.parametrize("method", ["joint", "boostnet"])
@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_real_early_exit_equals_the_simulated_exits(method, q, backbone, precision, chunk_size):
    dtype = PRECISIONS[precision][0]
    model = build_tiny(method, backbone, dtype)
    x = torch.randn(96, 3, 32, 32, dtype=dtype)
    conf, pred = simulated(model, x, precision)
    thresholds = evaluation.calibrate(conf, evaluation.geometric_distribution(q, conf.shape[0]))
    sim_exit = evaluation.exit_indices(conf, thresholds)

    with in_precision(precision):
        res = early_exit(model, x, thresholds, chunk_size=chunk_size)
    assert torch.equal(res.exit, sim_exit)
    assert torch.equal(res.pred, pred[sim_exit, torch.arange(len(x))])
    assert len(set(res.exit.tolist())) > 1  # the case is not trivial: samples leave at several exits


@pytest.mark.parametrize("precision", ["float32", "bf16-autocast"])
@pytest.mark.parametrize("backbone", ["msdnet", "ranet"])
def test_python_float_thresholds_between_float32_values_decide_alike(backbone, precision):
    """Thresholds given as Python floats (float64) that fall just above a float32 confidence: a
    comparison in float32 rounds them down onto that confidence and lets the sample exit; the
    simulated rule must not, and the engine must agree with it."""
    model = build_tiny("boostnet", backbone, torch.float32)
    x = torch.randn(64, 3, 32, 32)
    conf, _ = simulated(model, x, precision)
    assert conf.dtype == torch.float32
    # at every exit but the last: just above the median confidence, by less than a float32 step
    medians = conf[:-1].median(dim=1).values.double()
    thresholds = [math.nextafter(float(m), math.inf) for m in medians] + [-math.inf]
    assert all(float(torch.tensor(t, dtype=torch.float32)) == float(m) for t, m in zip(thresholds, medians))
    sim_exit = evaluation.exit_indices(conf, thresholds)
    on_threshold = (conf[0].double() == medians[0]).nonzero().flatten()
    assert (sim_exit[on_threshold] > 0).all()  # the median sample itself stays: conf < threshold

    with in_precision(precision):
        res = early_exit(model, x, thresholds)
    assert torch.equal(res.exit, sim_exit)


def test_thresholds_must_match_the_models_number_of_exits():
    model = build("joint")  # 4 exits
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for wrong in ([0.5, 0.5, -math.inf], [0.5] * 5):
        with pytest.raises(ValueError, match=rf"shape \({len(wrong)},\).*4 exits"):
            early_exit(model, x, wrong)


def boostnet_with_geometric_exits():
    """A 4-exit BoostNet, 64 random images and thresholds that exit them geometrically (q = 0.5)."""
    model = build("boostnet")
    x = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        conf, _ = evaluation.confidence(torch.stack(model(x)))
    return model, x, evaluation.calibrate(conf, evaluation.geometric_distribution(0.5, 4))


def test_later_blocks_run_only_for_undecided_samples():
    model, x, thresholds = boostnet_with_geometric_exits()
    seen, res = block_batches(model, x, thresholds)
    expected = [(k, int((res.exit >= k).sum())) for k in range(4) if (res.exit >= k).any()]
    assert seen == expected and expected[-1][1] < 64


def block_batches(model, x, thresholds, **kw):
    """(block, batch size) of every call of a backbone block during early_exit, and its result."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, inp, k=k: seen.append((k, inp[0].shape[0] if torch.is_tensor(inp[0]) else inp[0][0].shape[0]))) for k, b in enumerate(model.backbone.blocks)]
    try:
        return seen, early_exit(model, x, thresholds, **kw)
    finally:
        for h in hooks:
            h.remove()


def test_chunks_split_each_block_into_nearly_equal_parts_of_at_most_chunk_size():
    model, x, thresholds = boostnet_with_geometric_exits()
    seen, res = block_batches(model, x, thresholds, chunk_size=10)
    whole, _ = block_batches(model, x, thresholds)
    for k, n in whole:  # every undecided sample once, in ceil(n / 10) parts differing by at most one
        parts = [m for j, m in seen if j == k]
        assert sum(parts) == n and len(parts) == -(-n // 10) and max(parts) <= 10 and max(parts) - min(parts) <= 1
    assert torch.equal(res.exit, early_exit(model, x, thresholds).exit)


@pytest.mark.parametrize("threshold", [0.0, 2.0])  # everybody leaves at exit 0; nobody leaves before the last
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_all_or_none_leaving_at_a_block(threshold, chunk_size):
    model = build("boostnet")
    x = torch.randn(12, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        conf, pred = evaluation.confidence(torch.stack(model(x)))
    thresholds = [threshold] * 3 + [-math.inf]
    seen, res = block_batches(model, x, thresholds, chunk_size=chunk_size)
    sim_exit = evaluation.exit_indices(conf, thresholds)
    assert torch.equal(res.exit, sim_exit) and torch.equal(res.pred, pred[sim_exit, torch.arange(12)])
    assert {k for k, _ in seen} == ({0} if threshold == 0.0 else {0, 1, 2, 3})


def test_chunks_keep_a_channels_last_state_channels_last():
    model = build_tiny("boostnet", "msdnet", torch.float32).to(memory_format=torch.channels_last)
    x = torch.randn(40, 3, 32, 32).to(memory_format=torch.channels_last)
    conf, pred = simulated(model, x, "float32")
    thresholds = evaluation.calibrate(conf, evaluation.geometric_distribution(1.0, conf.shape[0]))
    formats = []
    hook = model.backbone.blocks[1].register_forward_pre_hook(lambda m, inp: formats.extend(t.is_contiguous(memory_format=torch.channels_last) for t in inp[0]))
    try:
        res = early_exit(model, x, thresholds, chunk_size=9)
    finally:
        hook.remove()
    sim_exit = evaluation.exit_indices(conf, thresholds)
    assert torch.equal(res.exit, sim_exit) and torch.equal(res.pred, pred[sim_exit, torch.arange(len(x))])
    assert formats and all(formats)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_chunk_size_must_be_a_positive_int(bad):
    model = build("joint")
    with pytest.raises(ValueError, match="chunk_size"):
        early_exit(model, torch.randn(4, 3, 32, 32, dtype=torch.float64), [0.5] * 4, chunk_size=bad)


def test_models_without_exit_steps_are_refused():
    from tests.stand_ins import TwoDepthNet

    with pytest.raises(TypeError, match="exit_step"):
        early_exit(TwoDepthNet(10).eval(), torch.randn(2, 3, 32, 32), torch.zeros(2))
