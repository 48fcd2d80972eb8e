import pytest
import torch

from helpers import write_cifar
from intrafusion.experiments import training
from intrafusion.experiments.data import load_dataset
from intrafusion.errors import IntraFusionError
from intrafusion.experiments.training import TrainSettings, new_model, train


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


def test_interrupted_training_resumes_to_the_same_weights(tiny, monkeypatch):
    tmp, ds, settings = tiny
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
