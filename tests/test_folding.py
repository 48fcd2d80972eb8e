import pytest
import torch
from torch import nn

from helpers import TinyResNet, TinyVGG, randomize_batchnorms
from intrafusion.folding import fold_batchnorm
from intrafusion.groups import Pruner


@pytest.mark.parametrize("layer,bn,shape", [
    (lambda: nn.Conv2d(3, 6, 3, padding=1), lambda: nn.BatchNorm2d(6), (4, 3, 8, 8)),
    (lambda: nn.Conv2d(3, 6, 3, bias=False), lambda: nn.BatchNorm2d(6), (4, 3, 8, 8)),
    (lambda: nn.Conv1d(3, 5, 3), lambda: nn.BatchNorm1d(5), (4, 3, 10)),
    (lambda: nn.Linear(7, 5, bias=False), lambda: nn.BatchNorm1d(5), (4, 7)),
    (lambda: nn.Linear(7, 5), lambda: nn.BatchNorm1d(5, affine=False), (4, 7)),
])
def test_fold_keeps_function_and_parameters(layer, bn, shape):
    torch.manual_seed(0)
    net = randomize_batchnorms(nn.Sequential(layer(), bn()))
    x = torch.randn(shape)
    expected = net(x)
    weight = net[0].weight
    fold_batchnorm(net[0], net[1])
    assert net[0].weight is weight                      # same Parameter object, modified in place
    assert net[0].bias is not None                      # bias created when missing
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net[1](expected), expected, atol=1e-6, rtol=1e-6)  # BN is identity


def test_fold_formula():
    conv, bn = nn.Conv2d(2, 2, 1), randomize_batchnorms(nn.BatchNorm2d(2))
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    expected_b = (b - bn.running_mean) * s + bn.bias.detach()
    fold_batchnorm(conv, bn)
    torch.testing.assert_close(conv.weight.detach(), w * s.view(-1, 1, 1, 1))
    torch.testing.assert_close(conv.bias.detach(), expected_b)


@pytest.mark.parametrize("make", [TinyVGG, TinyResNet])
def test_pruner_folds_every_bn_before_scoring(make):
    torch.manual_seed(0)
    model = randomize_batchnorms(make())
    x = torch.randn(3, 3, 16, 16)
    expected = model(x)
    pruner = Pruner(model, x[:1])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert pruner.folded == len(bns)
    for bn in bns:
        torch.testing.assert_close(bn.weight.detach(), torch.ones_like(bn.weight))
        torch.testing.assert_close(bn.running_mean, torch.zeros_like(bn.running_mean))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
