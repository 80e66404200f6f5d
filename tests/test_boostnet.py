import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynlab import config
from dynlab.data import static_info
from dynlab.errors import ConfigError
from dynlab.predictions import ExitPredictions
from dynlab.registry import get_method
from methods.boostnet import BoostedExits


class LinearExits(nn.Module):
    """Stand-in exit backbone: exit n is its own linear map of the flattened input."""

    def __init__(self, num_exits=3, dim=5, classes=4):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, classes) for _ in range(num_exits))
        self.num_exits = num_exits

    def forward(self, x):
        return [h(x) for h in self.heads]


def tiny_boostnet(*args):
    cfg = config.cli_config(["method=boostnet", "msdnet.n_blocks=3", *args])
    method = get_method("boostnet").cls(cfg)
    return method, method.build_model(static_info("digits"))


def test_boosted_logits_are_t_times_previous_plus_own():
    torch.manual_seed(0)
    method, model = tiny_boostnet("boostnet.temperatures=[0.25,0.75]")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    f = model.backbone(x)
    out = model(x)
    assert len(out) == 3
    torch.testing.assert_close(out[0], f[0])
    torch.testing.assert_close(out[1], 0.25 * out[0] + f[1])
    torch.testing.assert_close(out[2], 0.75 * out[1] + f[2])
    preds = method.predict(model, x)
    assert isinstance(preds, ExitPredictions) and preds.logits.shape == (3, 2, 10)
    assert torch.all(preds.costs[1:] > preds.costs[:-1])


def test_temperature_zero_is_plain_exits():
    torch.manual_seed(0)
    _, model = tiny_boostnet("boostnet.temperature=0")
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(model(x), model.backbone(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("trainable_prev", [False, True])
def test_stop_gradient_blocks_previous_exit_and_switch_restores_it(trainable_prev):
    torch.manual_seed(0)
    t = 0.5
    model = BoostedExits(LinearExits(), [t, t], trainable_prev=trainable_prev)
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    out = model(x)
    F.cross_entropy(out[1], y).backward()  # the loss of exit 2 only
    w1_grad = model.backbone.heads[0].weight.grad
    if not trainable_prev:
        assert w1_grad is None or torch.count_nonzero(w1_grad) == 0
    else:
        # F_2 = t * (W1 x + b1) + f_2  =>  dL/dW1 = t * (softmax(F_2) - onehot(y))^T x / B
        g = (torch.softmax(out[1].detach(), 1) - F.one_hot(y, 4).float()) / len(y)
        torch.testing.assert_close(w1_grad, t * g.T @ x)
    # the current exit always gets its own gradient: dL/dW2 = g^T x
    g = (torch.softmax(out[1].detach(), 1) - F.one_hot(y, 4).float()) / len(y)
    torch.testing.assert_close(model.backbone.heads[1].weight.grad, g.T @ x)


def test_train_step_sums_ce_over_boosted_exits_and_calls_backward_once():
    torch.manual_seed(0)
    method, model = tiny_boostnet()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()

    metrics = method.train_step(model, (x, y), backward)
    assert len(calls) == 1
    with torch.no_grad():
        expected = sum(F.cross_entropy(o, y) for o in model(x))
    torch.testing.assert_close(calls[0], expected)
    assert set(metrics) >= {"loss", "loss_exit0", "acc_exit2"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_wrong_number_of_temperatures_is_a_config_error():
    with pytest.raises(ConfigError, match="boostnet.temperatures"):
        tiny_boostnet("boostnet.temperatures=[0.5]")


def test_exit_weights_scale_the_losses():
    torch.manual_seed(0)
    method, model = tiny_boostnet("boostnet.exit_weights=[0,0,2]")
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    seen = []
    method.train_step(model, (x, y), lambda loss: seen.append(loss.detach()))
    with torch.no_grad():
        torch.testing.assert_close(seen[0], 2 * F.cross_entropy(model(x)[2], y))


def test_gradient_ablation_drops_the_axis_a_backbone_does_not_implement(capsys):
    from pipelines import ablation_boostnet_gradients as ablation

    on_msdnet = ablation.trials(config.cli_config([]))
    assert len(on_msdnet) == 4 and len({t.train_key for t in on_msdnet}) == 4
    assert "dropped" not in capsys.readouterr().out

    on_ranet = ablation.trials(config.cli_config(["backbone=ranet"]))
    assert [t.id for t in on_ranet] == ["trainable_prev=False", "trainable_prev=True"]
    assert len({t.train_key for t in on_ranet}) == 2  # no identical model under two labels
    assert all(t.cfg().method_cfg.gradient_rescale is False for t in on_ranet)  # the config says what is trained
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and "boostnet.gradient_rescale dropped" in lines[0] and "ranet" in lines[0]
