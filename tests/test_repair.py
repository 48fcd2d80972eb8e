import pytest
import torch

from helpers import TinyResNet, TinyVGG, randomize_batchnorms
from intrafusion.models.extra import MLPMixerSmall, MobileNetV2Small, pruner_options
from intrafusion.importance import Scorer
from intrafusion.groups import Pruner
from intrafusion.repair import (affine_correction, channel_moments, constant_channels, correct_layer,
                                execution_order, layer_statistics, layers_to_repair, merge_moments,
                                reference_statistics, repair, repair_pruned)


def base_pruner(make, size=16, calibrate=False):
    torch.manual_seed(0)
    model = randomize_batchnorms(make())
    if calibrate:
        set_running_statistics(model, torch.randn(64, 3, size, size))
    return Pruner(model, torch.randn(1, 3, size, size), **pruner_options(model))


@torch.no_grad()
def set_running_statistics(model, x):
    """Running statistics of every BN measured on `x`, as in a trained network (random ones
    on a deep ReLU6 network leave many channels constant)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()(x)
    model.eval()


def calibration(size=16, count=3, batch=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.zeros(batch, dtype=torch.long))
            for _ in range(count)]


def mismatch(stats, reference, channel_map):
    """Largest error of mean and std of every layer in `stats` against the reference at the
    mapped channels, relative to the reference std (every channel counts)."""
    worst = {}
    for name, (mean, var) in stats.items():
        ref_mean, ref_var = (t[channel_map[name]] for t in reference[name])
        scale = ref_var.sqrt().clamp_min(1e-12)
        err = torch.maximum((mean - ref_mean).abs() / scale, (var.sqrt() - ref_var.sqrt()).abs() / scale)
        worst[name] = err.max().item()
    return worst


def constant_count(measured) -> int:
    """Channels that were constant when repair measured them: they cannot be scaled."""
    return sum(constant_channels(*m).sum().item() for m in measured.values())


def pruned_and_reference(make, method, size=16, calibrate=False):
    base = base_pruner(make, size, calibrate)
    batches = calibration(size)
    reference = reference_statistics(base.model, batches)
    variant = base.copy()
    variant.prune(range(len(variant.groups)), 0.5, method, Scorer("l1"))
    layers = layers_to_repair(base.model, variant.model, batches[0][0][:1],
                              exclude=[n for n, m in base.model.named_modules() if m is base.classifier])
    return variant, reference, layers, batches


@pytest.mark.parametrize("make", [TinyVGG, TinyResNet])
@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_repair_restores_the_unpruned_statistics_on_the_calibration_batches(make, method):
    variant, reference, layers, batches = pruned_and_reference(make, method)
    before = mismatch(layer_statistics(variant.model, layers, batches), reference, variant.channel_map)
    assert max(before.values()) > 0.1
    measured = repair(variant.model, reference, variant.channel_map, layers, batches)
    assert constant_count(measured) == 0
    after = mismatch(layer_statistics(variant.model, layers, batches), reference, variant.channel_map)
    assert max(after.values()) < 1e-4, after


@pytest.mark.filterwarnings("ignore:intra_fusion")
@pytest.mark.parametrize("make", [MobileNetV2Small, MLPMixerSmall])
def test_repair_on_depthwise_and_token_mixing_layers(make):
    variant, reference, layers, batches = pruned_and_reference(make, "intra_fusion", size=32, calibrate=True)
    measured = repair(variant.model, reference, variant.channel_map, layers, batches)
    assert constant_count(measured) == 0       # calibrated BNs: every channel of every layer varies
    after = mismatch(layer_statistics(variant.model, layers, batches), reference, variant.channel_map)
    assert len(after) == len(layers) and max(after.values()) < 1e-4, after


def test_measuring_every_layer_before_correcting_does_not_restore_them():
    """The wrong way: all statistics measured on the unrepaired network, then every layer
    corrected with them. Later layers were measured on inputs that the corrections change."""
    variant, reference, layers, batches = pruned_and_reference(TinyResNet, "intra_fusion")
    stats = layer_statistics(variant.model, layers, batches)
    for name in layers:
        ref_mean, ref_var = (t[variant.channel_map[name]] for t in reference[name])
        correct_layer(variant.model.get_submodule(name), *affine_correction(*stats[name], ref_mean, ref_var))
    after = mismatch(layer_statistics(variant.model, layers, batches), reference, variant.channel_map)
    assert after[layers[0]] < 1e-4                      # the first layer sees unchanged inputs
    assert min(after[n] for n in layers[1:]) > 0.1      # measured: 0.5 to 3 std off


def test_layers_to_repair_start_at_the_first_changed_layer_in_execution_order():
    base = base_pruner(TinyResNet)
    x = torch.randn(1, 3, 16, 16)
    assert execution_order(base.model, x) == ["conv1", "a1", "a2", "short.0", "b1", "b2", "linear"]
    expected = {0: ["short.0", "b1", "b2", "linear"],        # group 0: b2 and short.0, short runs first
                1: ["b1", "b2", "linear"],
                2: ["conv1", "a1", "a2", "short.0", "b1", "b2", "linear"],
                3: ["a1", "a2", "short.0", "b1", "b2", "linear"]}
    for group, names in expected.items():
        variant = base.copy()
        variant.prune_group(group, 0.5, "intra_fusion", Scorer("l1"))
        assert layers_to_repair(base.model, variant.model, x) == names
        assert layers_to_repair(base.model, variant.model, x, exclude=["linear"]) == names[:-1]


def test_channel_map_follows_the_kept_channels_through_repeated_pruning():
    class KeepEven:
        def __call__(self, model, graph, group, n, pristine=True):
            return (torch.arange(n) % 2 == 0).float() + torch.arange(n) * 1e-3

    base = base_pruner(TinyVGG)
    variant = base.copy()
    variant.prune_group(1, 0.5, "default", KeepEven())
    assert variant.channel_map["features.4"].tolist() == [0, 2, 4, 6, 8, 10]
    variant.prune_group(1, 0.5, "intra_fusion", KeepEven())
    assert variant.channel_map["features.4"].tolist() == [0, 4, 8]
    assert variant.channel_map["features.0"].tolist() == list(range(8))
    assert variant.channel_map["features.8"].tolist() == list(range(16))
    assert base.channel_map["features.4"].tolist() == list(range(12))


def test_repair_pruned_computes_the_reference_and_skips_the_classifier():
    base = base_pruner(TinyVGG)
    batches = calibration()
    variant = base.copy()
    variant.prune_group(1, 0.5, "intra_fusion", Scorer("l1"))
    classifier = base.model.classifier.weight.detach().clone()
    first = base.model.features[0].weight.detach().clone()
    assert repair_pruned(base, variant, batches) == ["features.4", "features.8"]
    torch.testing.assert_close(variant.model.classifier.weight.detach(), classifier, rtol=0, atol=0)
    torch.testing.assert_close(variant.model.features[0].weight.detach(), first, rtol=0, atol=0)
    reference = layer_statistics(base.model, ["features.4", "features.8"], batches)
    after = mismatch(layer_statistics(variant.model, ["features.4", "features.8"], batches),
                     reference, variant.channel_map)
    assert max(after.values()) < 1e-4


def test_affine_correction_leaves_constant_channels_unscaled():
    scale, shift = affine_correction(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.0]),
                                     torch.tensor([0.0, 5.0]), torch.tensor([1.0, 9.0]))
    torch.testing.assert_close(scale, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(shift, torch.tensor([-0.5, 3.0]))


def test_moments_per_channel_and_merged_over_batches():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g) * 3 + 7, torch.randn(2, 3, 5, 5, generator=g)
    both = torch.cat([a, b])
    count, mean, m2 = merge_moments(channel_moments(a, 1), channel_moments(b, 1))
    flat = both.transpose(0, 1).flatten(1).double()
    assert count == 150
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(m2 / count, flat.var(1, unbiased=False))
    tokens = torch.randn(2, 6, 4, generator=g)                      # Linear output: channels last
    _, mean, m2 = channel_moments(tokens, -1)
    torch.testing.assert_close(mean, tokens.flatten(0, 1).double().mean(0))


@pytest.mark.parametrize("name", ["narrow", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_repair_from_cached_prefix_equals_whole_pass_and_skips_unchanged_segments(name):
    """RepairInputs starts a variant's repair at its first changed segment on the unpruned
    activations it keeps: the repaired weights are bit-identical to a whole forward pass's, and
    the segments before the start run once for all variants of the network, not per variant."""
    from helpers import NARROW_VGG11
    from intrafusion.models import VGG, build_model
    from intrafusion.repair import RepairInputs
    torch.manual_seed(0)
    model = randomize_batchnorms(VGG(NARROW_VGG11) if name == "narrow" else build_model(name))
    base = Pruner(model, torch.randn(1, 3, 32, 32))
    batches = calibration(size=32, count=2, batch=8)
    reference = reference_statistics(base.model, batches)
    inputs = RepairInputs(base.model, batches)
    first = next(m for m in base.model.modules() if isinstance(m, torch.nn.Conv2d))
    counting, calls = [False], []
    hook = first.register_forward_hook(lambda m, *_: calls.append(1) if m is first and counting[0] else None)
    for group in (0, 1, 2):
        for sparsity in (0.3, 0.6):
            whole, cached = base.copy(), base.copy()
            for v in (whole, cached):
                v.prune_group(group, sparsity, "intra_fusion", Scorer("l1"))
            repair_pruned(base, whole, batches, reference)
            counting[0] = True
            repair_pruned(base, cached, inputs, reference)
            counting[0] = False
            for (key, a), b in zip(whole.model.state_dict().items(), cached.model.state_dict().values()):
                assert torch.equal(a, b), key
    hook.remove()
    assert inputs.entering and min(inputs.entering) > 0   # deep inputs kept, not the images
    assert len(calls) == 1   # the unpruned first layer ran once for the six repairs
