"""The training-recipe keys (dynlab.recipe; DeiT's recipe for transformers), each checked against a
value worked out here by hand: hashes of the defaults, warm-up + cosine to a floor, AdamW's
no-decay groups, MixUp / CutMix / label-smoothed targets, the EMA, clipping, and one short run of
ADN's ViT with the recipe on. No Ray node: training runs in this process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import methods  # noqa: F401  (registers the methods)
from dynlab import config, recipe, training
from dynlab.data import build_datasets
from methods.exits import exit_loss

TINY_MSDNET = ["method=joint", "msdnet.n_blocks=2", "msdnet.n_channels=4", "msdnet.growth_rate=2", "workers=0"]


def test_defaults_keep_every_train_hash():
    # Recorded on main before these keys existed: every earlier run keeps its hash (and its cache).
    recorded = {
        (): ("f354553b57e6", "bf3bd3270e67"),
        ("method=dmnn", "preset=dmnn-resnet-small"): ("2677f7c26640", "0d4303879935"),  # (ADN's hashes changed with its losses, issue 19)
        ("method=joint", "optim.schedule=cosine", "optim.warmup_epochs=2", "run.grad_clip=1.0"): ("328a1ec21102", "053a051e1375"),
    }
    for args, (train_hash, full_hash) in recorded.items():
        cfg = config.cli_config(list(args))
        assert (cfg.train_hash(), cfg.hash()) == (train_hash, full_hash), args
    # Giving a default explicitly changes nothing; turning a key on changes the training.
    assert config.cli_config(["optim.name=sgd", "run.ema_decay=0", "data.mixup=0"]).train_hash() == "f354553b57e6"
    on = [config.cli_config([k]).train_hash() for k in ("optim.name=adamw", "data.mixup=0.8", "data.cutmix=1", "optim.label_smoothing=0.1", "run.ema_decay=0.9", "data.auto_augment=randaugment", "data.random_erasing=0.25")]
    assert len(set(on)) == len(on) and "f354553b57e6" not in on


def test_warmup_then_cosine_to_a_floor():
    cfg = config.cli_config(["epochs=6", "optim.lr=0.1", "optim.schedule=cosine", "optim.warmup_epochs=2", "optim.min_lr=0.01"])
    model = nn.Linear(2, 2)
    opt = training.build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: training.lr_factor(e, cfg))
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Warm-up epochs 0, 1 at 1/3 and 2/3 of 0.1; then 0.01 + 0.09 * (1 + cos(pi t / 4)) / 2, t = 0..3.
    c = math.sqrt(0.5)
    assert lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.01 + 0.045 * (1 + c), 0.01 + 0.045, 0.01 + 0.045 * (1 - c)])


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 3, 4))
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.ln = nn.LayerNorm(4)


def _decay_of(opt) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


def test_adamw_decays_weights_only_and_sgd_everything():
    model = Tokens()
    adamw = training.build_optimizer(model, config.cli_config(["optim.name=adamw", "optim.weight_decay=0.05", "optim.lr=0.001"]))
    assert isinstance(adamw, torch.optim.AdamW)
    decayed = {n for n, p in model.named_parameters() if _decay_of(adamw)[id(p)] == 0.05}
    assert decayed == {"conv.weight", "fc.weight"}
    assert all(_decay_of(adamw)[id(p)] == 0 for n, p in model.named_parameters() if n not in decayed)
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))
    sgd = training.build_optimizer(model, config.cli_config([]))  # unchanged: one group, all decayed
    assert isinstance(sgd, torch.optim.SGD) and set(_decay_of(sgd).values()) == {1e-4}
    # the ADN authors' SGD recipe: weights only (conv and linear weights), momentum kept
    sgd = training.build_optimizer(model, config.cli_config(["optim.decay_norms=false"]))
    assert isinstance(sgd, torch.optim.SGD) and {n for n, p in model.named_parameters() if _decay_of(sgd)[id(p)] == 1e-4} == {"conv.weight", "fc.weight"}
    assert all(g["momentum"] == 0.9 for g in sgd.param_groups)


def test_adamw_groups_of_adn_vit():
    cfg = config.cli_config(["method=adn", "preset=adn-vit-cifar", "optim.name=adamw", "optim.weight_decay=0.05"])
    from dynlab.data import dataset_info
    from dynlab.registry import get_method

    model = get_method("adn").cls(cfg).build_model(dataset_info(cfg.data))
    decay = _decay_of(training.build_optimizer(model, cfg))
    for name, p in model.named_parameters():
        flat = p.ndim <= 1 or name in ("class_token", "encoder.pos_embedding")  # norms (skip-aware ones too), biases, tokens
        assert decay[id(p)] == (0.0 if flat else 0.05), name


def test_mixup_cutmix_and_smoothing_targets():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mix = recipe.batch_targets(config.cli_config(["method=joint", "data.mixup=0.8"]), 5)
    images, t = mix(x, y)
    assert t.shape == (8, 5) and torch.allclose(t.sum(1), torch.ones(8))
    # Each row mixes the sample's class with its neighbour's (torchvision rolls the batch by one),
    # and the images are mixed by the same lambda.
    lam = float(t[0, 0])
    prev = y.roll(1)
    expected = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(prev, 5).float()
    assert torch.allclose(t, expected, atol=1e-6) and torch.allclose(images, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)
    both = recipe.batch_targets(config.cli_config(["method=joint", "data.mixup=0.8", "data.cutmix=1.0", "optim.label_smoothing=0.1"]), 5)
    for _ in range(4):
        _, t = both(x, y)
        assert torch.allclose(t.sum(1), torch.ones(8)) and float(t.min()) >= 0.1 / 5 - 1e-6
    assert recipe.batch_targets(config.cli_config([]), 5) is None


def test_label_smoothing_ce_is_the_hand_formula():
    torch.manual_seed(1)
    z, y = torch.randn(4, 5), torch.tensor([0, 3, 4, 1])
    _, t = recipe.batch_targets(config.cli_config(["method=joint", "optim.label_smoothing=0.1"]), 5)(torch.zeros(4, 1), y)
    # -sum_k q_k log p_k with q = 0.9 on the label + 0.02 everywhere, averaged over the batch
    p = torch.exp(z) / torch.exp(z).sum(1, keepdim=True)
    q = torch.full((4, 5), 0.02)
    q[torch.arange(4), y] += 0.9
    hand = float(-(q * torch.log(p)).sum(1).mean())
    loss, metrics = exit_loss([z], t, torch.ones(1))  # the joint / BoostNet / IMTA loss, as the loop calls it
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    assert float(metrics["acc_exit0"]) == pytest.approx(float((z.argmax(1) == y).float().mean() * 100))


def test_ema_is_the_hand_computed_average():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = recipe.make_ema(model, 0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    weights, means = [], []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(6, 3)).pow(2).sum().backward()
        opt.step()
        ema.update_parameters(model)
        weights.append(model[0].weight.detach().clone())
        means.append(model[1].running_mean.clone())
    # The first update copies the weights; each later one keeps 0.75 of the average. BatchNorm's
    # running statistics (buffers) are averaged alike.
    for ours, seen in ((ema.module[0].weight, weights), (ema.module[1].running_mean, means)):
        hand = 0.75 * (0.75 * seen[0] + 0.25 * seen[1]) + 0.25 * seen[2]
        assert torch.allclose(ours, hand, atol=1e-6) and not torch.allclose(ours, seen[2])


def _grad_norm(model) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_clipping_bounds_the_grad_norm_with_soft_targets(clip):
    # Joint on a tiny MSDNet with MixUp, CutMix and label smoothing: the soft targets go through
    # the loop into the method's loss; the last step's gradients stay clipped after the step.
    cfg = config.cli_config([*TINY_MSDNET, "data.train_subset=32", "data.batch_size=16", "data.heldout=50", "eval.num_budgets=0", "data.mixup=0.8", "data.cutmix=1.0", "optim.label_smoothing=0.1", f"run.grad_clip={clip}"])
    loop = training.build_loop(cfg)
    sampler, loader, _ = training.make_loaders(loop)
    mix, soft = loop.mix, []

    def seen(images, labels):  # the loop's batches, recorded on the way to the method
        out = mix(images, labels)
        soft.append(out[1])
        return out

    loop.mix = seen
    metrics = training.train_one_epoch(loop, loader, sampler, 0, 0.0)
    assert len(soft) == 2 and all(t.shape == (16, 10) for t in soft)
    assert math.isfinite(metrics["train/loss"]) and 0 <= metrics["train/acc_exit0"] <= 100
    norm = _grad_norm(loop.model)
    assert norm <= clip * (1 + 1e-4) if clip else norm > 1e-2


def test_augmentations_are_torchvision_transforms_on_training_images_only():
    bundle = build_datasets(config.cli_config(["data.auto_augment=trivialaugment", "data.random_erasing=1.0"]).data, 0)
    x, _ = bundle.train[0]
    clean, _ = bundle.heldout[0]
    assert type(bundle.train.dataset.auto).__name__ == "TrivialAugmentWide" and x.shape == clean.shape == (3, 32, 32)
    assert not torch.equal(bundle.train[0][0], bundle.train[0][0])  # random each time
    from dynlab.data import _small_transforms

    tr, _ = _small_transforms(32, ((0.5,) * 3, (0.5,) * 3), True, False, config.cli_config(["data.auto_augment=randaugment", "data.random_erasing=0.25"]).data)
    assert [type(t).__name__ for t in tr.transforms] == ["RandomCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize", "RandomErasing"]


def test_adn_vit_trains_with_the_recipe_and_saves_its_ema(in_tmp):
    # every recipe key on (DeiT's pieces: AdamW, warm-up + cosine, MixUp / CutMix, smoothing, ...)
    args = ["method=adn", "backbone=adn_vit", "preset=adn-vit-cifar", "optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "optim.schedule=cosine",
            "data.mixup=0.8", "data.cutmix=1.0", "optim.label_smoothing=0.1",
            "optim.warmup_epochs=1", "optim.min_lr=1e-5", "run.grad_clip=1.0", "run.ema_decay=0.9", "run.ema_eval=true", "data.auto_augment=randaugment",
            "data.random_erasing=0.25", "epochs=1", "workers=0", "data.train_subset=64", "data.batch_size=32", "data.heldout=64", "run.select=last"]
    cfg = config.cli_config(args)
    result = training.fit(cfg, "recipe")
    state = torch.load(f"{result.checkpoint_dir}/state.pt", weights_only=True)
    best = torch.load(f"{result.checkpoint_dir}/best.pt", weights_only=True)
    assert int(state["ema"]["n_averaged"]) == 2  # 2 steps of 32 images
    assert state["history"][0]["lr"] == pytest.approx(0.0005)  # warm-up: half the rate in epoch 0
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    assert state["best_epoch"] == 0  # run.select=last: best.pt holds the last epoch's EMA weights, not the raw ones
    assert best.keys() == state["model"].keys() and all(torch.equal(best[k], ema[k]) for k in best)
    assert not all(torch.equal(best[k], state["model"][k]) for k in best)
    again = training.build_loop(cfg)  # a resumed run carries the average on, not a fresh one
    training.resume(again, state, best)
    assert int(again.ema.n_averaged) == 2 and all(torch.equal(v, ema[k]) for k, v in again.ema.module.state_dict().items())
