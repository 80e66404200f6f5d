import pytest
import torch

from dynlab import config, evaluation
from dynlab.data import static_info
from dynlab.early_exit import early_exit
from dynlab.registry import get_method


def build(method: str, *args):
    cfg = config.cli_config([f"method={method}", *(args or ["msdnet.n_blocks=4"])])
    return _prepared(get_method(method).cls(cfg))


def _prepared(m):
    torch.manual_seed(0)
    model = m.build_model(static_info("digits")).double().eval()
    for m in model.modules():  # random BN statistics, so that exits disagree and confidences spread
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("backbone", ["msdnet", "ranet"])
@pytest.mark.parametrize("method", ["joint", "boostnet"])
@pytest.mark.parametrize("q", [0.5, 1.0, 2.0])
def test_real_early_exit_equals_the_simulated_exits(method, q, backbone):
    model = build(method, f"backbone={backbone}", "ranet.n_blocks=2", "ranet.block_step=1") if backbone == "ranet" else build(method)
    x = torch.randn(96, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits = torch.stack(model(x))  # every exit for every sample: the simulation
    conf, pred = evaluation.confidence(logits)
    thresholds = evaluation.calibrate(conf, evaluation.geometric_distribution(q, logits.shape[0]))
    sim_exit = evaluation.exit_indices(conf, thresholds)

    res = early_exit(model, x, thresholds)
    assert torch.equal(res.exit, sim_exit)
    assert torch.equal(res.pred, pred[sim_exit, torch.arange(len(x))])
    assert len(set(res.exit.tolist())) > 1  # the case is not trivial: samples leave at several exits


def test_later_blocks_run_only_for_undecided_samples():
    model = build("boostnet")
    x = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        conf, _ = evaluation.confidence(torch.stack(model(x)))
    thresholds = evaluation.calibrate(conf, evaluation.geometric_distribution(0.5, 4))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, inp, k=k: seen.append((k, inp[0].shape[0] if torch.is_tensor(inp[0]) else inp[0][0].shape[0]))) for k, b in enumerate(model.backbone.blocks)]
    res = early_exit(model, x, thresholds)
    for h in hooks:
        h.remove()
    expected = [(k, int((res.exit >= k).sum())) for k in range(4) if (res.exit >= k).any()]
    assert seen == expected and expected[-1][1] < 64


def test_models_without_exit_steps_are_refused():
    from tests.stand_ins import TwoDepthNet

    with pytest.raises(TypeError, match="exit_step"):
        early_exit(TwoDepthNet(10).eval(), torch.randn(2, 3, 32, 32), torch.zeros(2))
