import pytest
import torch
from torch import nn

from intrafusion.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("name,params", [("vgg11_bn", 9231114), ("resnet18", 11178762),
                                         ("vgg11", 9225610), ("resnet50", 23547402)])
def test_parameter_counts_match_the_cifar_architectures(name, params):
    """ResNets in the authors' layout: every conv has a bias (4,800 of them in ResNet18)."""
    assert sum(p.numel() for p in build_model(name).parameters()) == params


@pytest.mark.parametrize("name,params", [("resnet18", 11173962), ("resnet50", 23520842)])
def test_a_bias_free_state_builds_the_bias_free_resnet(name, params):
    authors = build_model(name)
    conv_biases = {f"{n}.bias" for n, m in authors.named_modules() if isinstance(m, nn.Conv2d)}
    state = {k: v for k, v in authors.state_dict().items() if k not in conv_biases}
    model = build_model(name, state=state)
    assert sum(p.numel() for p in model.parameters()) == params
    assert set(model.state_dict()) == set(state)


def test_parameter_names_match_the_authors_checkpoints():
    vgg = build_model("vgg11_bn").state_dict()
    assert {"features.0.weight", "features.0.bias", "features.1.running_var", "features.25.weight",
            "features.26.num_batches_tracked", "classifier.weight", "classifier.bias"} <= set(vgg)
    res = build_model("resnet18").state_dict()
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
            "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_mean", "layer4.1.conv2.weight",
            "linear.weight", "linear.bias"} <= set(res)
    assert "layer1.0.shortcut.0.weight" not in res
    assert {"conv1.bias", "layer1.0.conv2.bias", "layer2.0.shortcut.0.bias"} <= set(res)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_maps_cifar_images_to_classes(name):
    model = build_model(name, num_classes=100).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model name 'vgg12'"):
        build_model("vgg12")
