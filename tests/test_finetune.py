import pytest
import torch

from helpers import write_cifar
from intrafusion.models.extra import MobileNetV2Small
from intrafusion.experiments.data import load_dataset
from intrafusion.experiments.training import finetune
from intrafusion.importance import Scorer
from intrafusion.groups import Pruner


@pytest.fixture()
def brightness_dataset(tmp_path):
    """Generated CIFAR files, with classes 0/1 made learnable: class-1 images are bright."""
    write_cifar(tmp_path / "data", n_train=64, n_test=16, classes=2)
    ds = load_dataset("cifar10", tmp_path / "data", download=False)
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        images.copy_(images // 2 + (labels * 127).to(torch.uint8).view(-1, 1, 1, 1))
    return ds


def pruned_model():
    torch.manual_seed(0)
    pruner = Pruner(MobileNetV2Small(num_classes=10), torch.randn(1, 3, 32, 32))
    pruner.prune([0, 1], 0.5, "intra_fusion", Scorer("l1"))
    return pruner.model


def test_finetune_learns_keeps_batchnorm_statistics_and_reports_each_epoch(brightness_dataset):
    model = pruned_model()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    modes, calls = [], []
    model.features[0].register_forward_pre_hook(
        lambda m, _: modes.append((model.training, model.features[1].training)))
    history = finetune(model, brightness_dataset, epochs=4, lr=0.05, batch_size=16,
                       on_epoch=lambda epoch, m: calls.append((epoch, m is model, m.training)))
    assert calls == [(e, True, False) for e in (1, 2, 3, 4)]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert set(modes) == {(True, False)}                  # training, with the BN in eval mode
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert not torch.equal(model.features[0].weight, weights["features.0.weight"])
    assert not model.training


def test_max_batches_limits_the_steps_and_is_reproducible(brightness_dataset):
    results = []
    for _ in range(2):
        model = pruned_model()
        steps = []
        model.register_forward_pre_hook(lambda m, inputs: steps.append(len(inputs[0])))
        finetune(model, brightness_dataset, epochs=2, lr=0.01, batch_size=8, max_batches=3, seed=3)
        assert steps == [8] * 6
        results.append(model.classifier.weight.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def amplified_model(factor: float):
    """pruned_model() with every conv/linear weight and bias scaled by `factor`: with the
    BatchNorms folded, activations grow by factor per layer, as after Intra-Fusion's fork rule."""
    model = pruned_model()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(factor)
                if m.bias is not None:
                    m.bias.mul_(factor)
    return model


@pytest.mark.parametrize("max_grad_norm", [None, 5.0])
def test_clipping_keeps_an_amplified_network_from_diverging(brightness_dataset, max_grad_norm):
    model = amplified_model(2.0)
    history = finetune(model, brightness_dataset, epochs=3, lr=0.05, batch_size=16,
                       max_grad_norm=max_grad_norm)
    losses = torch.tensor([h["loss"] for h in history])
    if max_grad_norm is None:   # the unclipped run blows up: the test shows what clipping prevents
        assert not torch.isfinite(losses).all() or losses[-1] > losses[0]
    else:
        assert torch.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
        assert all(torch.isfinite(p).all() for p in model.parameters())
