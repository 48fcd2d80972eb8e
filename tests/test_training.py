import dataclasses
import math
import re

import pytest
import torch
from torch import nn

from helpers import write_cifar
from intrafusion.experiments import training
from intrafusion.experiments.data import load_dataset
from intrafusion.errors import IntraFusionError
from intrafusion.experiments.training import (TrainSettings, make_optimizer, new_model, split_held_out,
                                              train, warmup_cosine)


@pytest.fixture()
def tiny(tmp_path, narrow_vgg):
    write_cifar(tmp_path / "data", n_train=40, n_test=10)
    ds = load_dataset("cifar10", tmp_path / "data", download=False)
    return tmp_path, ds, TrainSettings("vgg11", "cifar10", epochs=2, batch_size=16, lr=0.01)


def fresh():
    torch.manual_seed(123)  # new_model must not depend on the global RNG state
    return new_model(TrainSettings("vgg11", "cifar10"), 10)


def test_seed_sets_the_initial_weights(narrow_vgg):
    a, b = fresh().state_dict(), fresh().state_dict()
    c = new_model(TrainSettings("vgg11", "cifar10", seed=1), 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_checkpoint_format_and_reproducibility(tiny):
    tmp, ds, settings = tiny
    a = train(fresh(), ds, settings, tmp / "a.checkpoint", quiet=True)
    b = train(fresh(), ds, settings, tmp / "b.checkpoint", quiet=True)
    saved = torch.load(tmp / "a.checkpoint", weights_only=True)
    assert {"model_state_dict", "test_accuracy", "epoch", "settings"} <= set(saved)
    assert saved["epoch"] == 2 and 0 <= saved["test_accuracy"] <= 100
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k]), k


@pytest.mark.parametrize("optimizer,warmup", [("sgd", 0.0), ("adamw", 0.5)])
def test_interrupted_training_resumes_to_the_same_weights(tiny, monkeypatch, optimizer, warmup):
    tmp, ds, settings = tiny
    settings = dataclasses.replace(settings, optimizer=optimizer, warmup_epochs=warmup,
                                   lr=settings.lr if optimizer == "sgd" else 1e-3)
    reference = train(fresh(), ds, settings, tmp / "ref.checkpoint", quiet=True)
    calls = {"n": 0}
    real = training.accuracy

    def crash_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "accuracy", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), ds, settings, tmp / "run.checkpoint", save_every=1, quiet=True)
    assert (tmp / "run.checkpoint.state").exists() and not (tmp / "run.checkpoint").exists()
    monkeypatch.setattr(training, "accuracy", real)
    resumed = train(fresh(), ds, settings, tmp / "run.checkpoint", quiet=True)
    for k, v in reference["model_state_dict"].items():
        torch.testing.assert_close(v, resumed["model_state_dict"][k], rtol=0, atol=0)


def test_resume_with_other_settings_is_refused(tiny):
    tmp, ds, settings = tiny
    train(fresh(), ds, settings, tmp / "x.checkpoint", quiet=True)
    other = TrainSettings("vgg11", "cifar10", epochs=3, batch_size=16, lr=0.01)
    with pytest.raises(IntraFusionError, match="other training settings"):
        train(fresh(), ds, other, tmp / "x.checkpoint", quiet=True)


def test_adamw_lowers_the_training_loss(tiny):
    tmp, ds, settings = tiny
    settings = dataclasses.replace(settings, optimizer="adamw", lr=1e-2, weight_decay=0.05,
                                   warmup_epochs=1, epochs=5, batch_size=8, augment=False)
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # can fit 40 random images
    history = train(linear, ds, settings, tmp / "adamw.checkpoint", quiet=True)["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"], [h["loss"] for h in history]


def test_warmup_then_cosine_values():
    assert [warmup_cosine(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 12) == 1.0                       # the peak, then the decay
    assert warmup_cosine(8, 4, 12) == pytest.approx(0.5)        # halfway through the decay
    assert warmup_cosine(11, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert warmup_cosine(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(0, 0, 10) == 1.0                       # no warm-up: cosine from the peak


def test_adamw_schedule_and_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    settings = TrainSettings("vgg11", "cifar10", epochs=3, lr=0.01, weight_decay=0.1,
                             optimizer="adamw", warmup_epochs=0.5)
    optimizer, scheduler = make_optimizer(model, settings, steps_per_epoch=10)
    decayed, free = optimizer.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert decayed["weight_decay"] == 0.1 and free["weight_decay"] == 0.0 and len(free["params"]) == 4
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.01 * warmup_cosine(s, 5, 30) for s in range(30)]   # warm-up: 0.5 epoch = 5 steps
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert max(lrs) == pytest.approx(0.01) and lrs.index(max(lrs)) == 4


def test_held_out_images_are_left_out_of_training(tiny):
    tmp, ds, settings = tiny
    rest, x, y = split_held_out(ds, 8)
    assert len(rest.train_labels) == 32 and x.shape == (8, 3, 32, 32) and y.shape == (8,)
    rows = lambda images: {im.numpy().tobytes() for im in images}
    kept, held = rows(ds.normalize(rest.train_images)), rows(x)
    assert len(held) == 8 and not kept & held and kept | held == rows(ds.normalize(ds.train_images))
    result = train(fresh(), ds, dataclasses.replace(settings, held_out=8), tmp / "h.checkpoint", quiet=True)
    assert "test_accuracy" not in result
    correct = result["held_out_accuracy"] * 8 / 100       # measured on the 8 held-out images
    assert correct == pytest.approx(round(correct)) and 0 <= correct <= 8


@pytest.mark.parametrize("kwargs,message", [
    (dict(optimizer="adam"), "unknown --optimizer 'adam'"),
    (dict(warmup_epochs=1.0), "--warmup-epochs is for --optimizer adamw"),
    (dict(optimizer="adamw", warmup_epochs=2.0), "--warmup-epochs must lie in [0, --epochs), got 2.0"),
    (dict(optimizer="adamw", warmup_epochs=float("nan")), "--warmup-epochs must lie in"),
    (dict(held_out=-1), "--held-out must be >= 0, got -1"),
])
def test_bad_optimizer_settings_are_refused(kwargs, message):
    with pytest.raises(IntraFusionError, match=re.escape(message)):
        TrainSettings("vgg11", "cifar10", epochs=2, **kwargs)


def test_holding_out_every_training_image_is_refused(tiny):
    tmp, ds, _ = tiny
    with pytest.raises(IntraFusionError, match="--held-out must be below the 40 training images"):
        split_held_out(ds, 40)
