"""Intra-Fusion inside Torch-Pruning's own pruner: fold BN once, fuse every group the interactive
step yields before it is pruned."""
import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

import intrafusion
from helpers import TinyVGG, randomize_batchnorms


class Duplicated(nn.Module):
    """conv-BN-ReLU (16) -> 1×1 conv (4) -> pool -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def tp_run(model, x, fuse, **settings):
    """Prune `model` in place with BasePruner(global, round_to=8, l1, classifier ignored),
    calling intrafusion.fuse_group on each group first when `fuse`."""
    pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  global_pruning=True, round_to=8, ignored_layers=[model.head],
                                  **settings)
    fused = []
    for group in pruner.step(interactive=True):
        if fuse:
            fused.append(intrafusion.fuse_group(group, rule="mean"))
        group.prune()
    return fused


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def duplicated_model():
    """Folded Duplicated whose channels 8..15 repeat channels 0..7 of conv1 exactly and feed
    conv2 through columns 0.3 times theirs; rows and columns have equal l1 norms, so l1 prunes
    exactly the duplicates."""
    torch.manual_seed(0)
    model = randomize_batchnorms(Duplicated())
    assert intrafusion.fold_batchnorms(model, torch.randn(1, 3, 8, 8)) == 1
    with torch.no_grad():
        rows = torch.randn(8, 3, 3, 3)
        model.conv1.weight.copy_(torch.cat([rows, rows]) / rows.abs().sum((1, 2, 3)).repeat(2).view(-1, 1, 1, 1))
        model.conv1.bias[8:] = model.conv1.bias[:8]
        cols = torch.randn(4, 8, 1, 1)
        cols = 0.1 * cols / cols.abs().sum(0, keepdim=True)
        model.conv2.weight.copy_(torch.cat([cols, 0.3 * cols], 1))
    return model


def test_fused_network_equals_unpruned_where_plain_pruning_does_not():
    model = duplicated_model()
    x = torch.randn(6, 3, 8, 8)
    reference = model(x)
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    assert tp_run(fused, x[:1], True, pruning_ratio=0.0,
                  pruning_ratio_dict={fused.conv1: 0.5}) == [True]
    tp_run(plain, x[:1], False, pruning_ratio=0.0, pruning_ratio_dict={plain.conv1: 0.5})
    assert fused.conv1.out_channels == plain.conv1.out_channels == 8
    assert torch.allclose(fused(x), reference, atol=1e-5)
    assert (plain(x) - reference).abs().max() > 1e-2


def test_widths_equal_plain_torch_pruning_and_outputs_differ_by_fusion():
    torch.manual_seed(1)
    model = randomize_batchnorms(TinyVGG(widths=(16, 24, 32)))
    model.head = model.classifier
    x = torch.randn(4, 3, 16, 16)
    intrafusion.fold_batchnorms(model, x[:1])
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    results = tp_run(fused, x[:1], True, pruning_ratio=0.5)
    tp_run(plain, x[:1], False, pruning_ratio=0.5)
    assert results and all(results)
    assert shapes(fused) == shapes(plain) != shapes(model)
    assert all(w % 8 == 0 for w in (m.out_channels for m in fused.modules() if isinstance(m, nn.Conv2d)))
    assert (fused(x) - plain(x)).abs().max() > 1e-3


def test_fuse_group_validates_options():
    model = duplicated_model()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [8, 9])
    with pytest.raises(intrafusion.IntraFusionError, match="fusion rule"):
        intrafusion.fuse_group(group, rule="nope")
    with pytest.raises(intrafusion.IntraFusionError, match="unknown fusion option"):
        intrafusion.fuse_group(group, rulez="mean")
    with pytest.raises(intrafusion.IntraFusionError, match="needs calibration"):
        intrafusion.fuse_group(group, importance="taylor")
