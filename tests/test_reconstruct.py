import pytest
import torch
import torch.nn.functional as F
from torch import nn

import intrafusion
from helpers import NARROW_VGG11, TinyResNet, TinyVGG, randomize_batchnorms
from intrafusion.errors import IntraFusionError
from intrafusion.groups import Pruner
from intrafusion.importance import Scorer
from intrafusion.models import VGG, MobileNetV2Small, pruner_options
from intrafusion.models.cifar import BasicBlock
from intrafusion.reconstruct import (NormalEquations, Unit, conv_patches, fit_units, layer_features,
                                     linear_rows, prior_weights, reconstruct, reconstruct_pruned,
                                     refit_linear, residual_units, ridge_solution, sample_positions,
                                     with_ones)
from intrafusion.repair import RepairInputs, execution_order, layers_to_repair


def batches(size=16, count=3, batch=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(count)]


def pruned(model, method="default", sparsity=0.5, size=16):
    base = Pruner(model, torch.randn(1, 3, size, size), **pruner_options(model))
    variant = base.copy()
    variant.prune(range(len(variant.groups)), sparsity, method, Scorer("l1"))
    return base, variant


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
                                  nn.Conv2d(4, 6, (1, 3), padding=(0, 1), padding_mode="reflect"),
                                  nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                  nn.Conv1d(4, 6, 3, padding=1, stride=2)])
def test_features_at_sampled_positions_reproduce_the_conv_output(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 4, 11)
    with torch.no_grad():
        out = conv(x)
    grid = (out.shape[0], *out.shape[2:])
    flat = sample_positions(out[:, 0].numel(), 10, seed=3)
    features = with_ones(layer_features(conv, x, flat, grid))          # (P, g, D)
    weights = prior_weights([conv])                                     # (g, D, C/g)
    predicted = torch.einsum("pgd,gdc->pgc", features, weights).reshape(len(flat), -1)
    expected = out.movedim(1, -1).reshape(-1, out.shape[1])[flat]
    torch.testing.assert_close(predicted, expected, rtol=1e-5, atol=1e-5)
    if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and conv.groups == 1:
        unfolded = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, D, L)
        n, rest = flat // out[0, 0].numel(), flat % out[0, 0].numel()
        torch.testing.assert_close(conv_patches(x, conv, flat, grid).flatten(1), unfolded[n, :, rest])


def test_sampled_positions_are_distinct_seeded_and_capped():
    a, b = sample_positions(1000, 50, seed=7), sample_positions(1000, 50, seed=7)
    assert torch.equal(a, b) and len(a.unique()) == 50 and a.max() < 1000
    assert not torch.equal(a, sample_positions(1000, 50, seed=8))
    assert torch.equal(sample_positions(30, 50, seed=7), torch.arange(30))


def test_ridge_solution_is_least_squares_for_small_ridge_and_the_prior_for_large():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 2, 6, generator=g, dtype=torch.float64)       # two groups
    w = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    prior = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    equations = NormalEquations()
    for part in x.split(128):                                          # batch by batch
        equations.add(part, torch.einsum("pgd,gdc->pgc", part, w))
    assert equations.rows == 500
    torch.testing.assert_close(ridge_solution(equations, prior, 1e-9), w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ridge_solution(equations, prior, 1e9), prior, rtol=1e-6, atol=1e-6)
    assert equations.relative_error(w) < 1e-8 and equations.relative_error(prior) > 0.5


def test_refit_linear_from_batches_equals_one_least_squares_fit():
    """The API for other callers: rows accumulated batch by batch (tokens of (B, L, D) inputs),
    then one refit; the same weights as lstsq on all rows at once."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(5, 3)
    xs = [torch.randn(4, 7, 5, generator=g) for _ in range(3)]
    true = nn.Linear(5, 3)
    equations = NormalEquations()
    for x in xs:
        with torch.no_grad():
            equations.add(linear_rows(layer, x), true(x).reshape(-1, 1, 3))
    error = refit_linear(layer, equations, alpha=1e-10)
    assert error < 1e-8
    torch.testing.assert_close(layer.weight, true.weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias, true.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [TinyVGG, TinyResNet])
def test_unpruned_network_is_a_fixed_point(make):
    torch.manual_seed(0)
    base, _ = pruned(randomize_batchnorms(make()))
    variant = base.copy()
    names = execution_order(variant.model, torch.randn(1, 3, 16, 16))
    errors = reconstruct(base.model, variant.model, variant.channel_map, names, batches())
    assert max(fit for _, fit in errors.values()) < 1e-6        # float32 rounding
    x = batches(count=1, seed=5)[0]
    with torch.no_grad():
        assert relative(variant.model(x), base.model(x)) < 1e-4
    for (key, a), b in zip(base.model.state_dict().items(), variant.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3, msg=key)


@pytest.mark.parametrize("make", [TinyVGG, TinyResNet])
@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_reconstruction_brings_the_pruned_logits_back(make, method):
    torch.manual_seed(0)
    base, variant = pruned(randomize_batchnorms(make()), method)
    calibration, test = batches(count=4), batches(count=1, batch=32, seed=5)[0]
    with torch.no_grad():
        before = relative(variant.model(test), base.model(test))
    layers = layers_to_repair(base.model, variant.model, test[:1])
    errors = reconstruct(base.model, variant.model, variant.channel_map, layers, calibration)
    with torch.no_grad():
        after = relative(variant.model(test), base.model(test))
    assert before > 0.2 and after < 0.25 * before, (before, after)
    assert set(errors) == set(layers)                              # no residual adds known here
    assert all(fit <= start + 1e-9 for start, fit in errors.values())


def two_blocks(width=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                          BasicBlock(width, width, conv_bias=False), BasicBlock(width, 2 * width, 2, conv_bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))
    return randomize_batchnorms(model).eval()


def test_residual_units_of_resnet_blocks_and_their_order():
    model = two_blocks()
    assert residual_units(model) == [Unit(("3.conv2",), ("3", 0)), Unit(("4.conv2", "4.shortcut.0"))]
    order = execution_order(model, torch.randn(1, 3, 8, 8))
    units = fit_units(order, order, residual_units(model))
    assert [u.layers for u in units] == [("0",), ("3.conv1",), ("3.conv2",), ("4.conv1",),
                                         ("4.conv2", "4.shortcut.0"), ("7",)]


def block_sum(model, x, block):
    """The pre-ReLU sum of residual block `block` (conv2 output + shortcut) on input x."""
    captured = {}
    handle = model[block].register_forward_hook(
        lambda m, args, out: captured.update(sum=m.bn2(m.conv2(F.relu(m.bn1(m.conv1(args[0]))))) + m.shortcut(args[0])))
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured["sum"]


@pytest.mark.parametrize("block, layers", [(3, ["3.conv2"]), (4, ["4.conv2", "4.shortcut.0"])])
def test_a_block_is_fitted_at_the_add(block, layers, monkeypatch):
    """Upstream error (the stem perturbed, not refit) reaches both the block's branch and its
    shortcut; fitting the block's last conv (and a projection shortcut, jointly) at the add
    brings the block's sum closer to the unpruned one than fitting each conv to its own
    unpruned output."""
    base = Pruner(two_blocks(), torch.randn(1, 3, 8, 8))
    calibration = batches(size=8, count=2, batch=16)
    x = torch.cat(calibration)
    fits = {}
    for at_add in (True, False):
        if not at_add:
            monkeypatch.setattr("intrafusion.reconstruct.residual_units", lambda model: [])
        variant = base.copy()
        with torch.no_grad():
            variant.model[0].weight.add_(0.3 * torch.randn(variant.model[0].weight.shape,
                                                           generator=torch.Generator().manual_seed(2)))
        reconstruct(base.model, variant.model, variant.channel_map, layers, calibration, alpha=1e-9,
                    positions=10 ** 6)
        fits[at_add] = relative(block_sum(variant.model, x, block), block_sum(base.model, x, block))
    assert fits[True] < 0.9 * fits[False], fits


def test_fit_at_the_add_equals_least_squares_on_every_position():
    base = Pruner(two_blocks(), torch.randn(1, 3, 8, 8))
    variant = base.copy()
    with torch.no_grad():
        variant.model[0].weight.add_(0.3 * torch.randn_like(variant.model[0].weight))
    calibration = batches(size=8, count=2, batch=16)
    x = torch.cat(calibration)
    with torch.no_grad():
        var_in = variant.model[:4](x)                                     # block 4's input
        block = variant.model[4]
        mid = F.relu(block.bn1(block.conv1(var_in)))
        target = block_sum(base.model, x, 4)                               # (N, C, H, W)
        features = torch.cat([F.unfold(mid, 3, padding=1), F.unfold(var_in, 1, stride=2)], 1)
        rows = torch.cat([features.transpose(1, 2).reshape(-1, features.shape[1]),
                          torch.ones(features.shape[0] * features.shape[2], 1)], 1).double()
        y = target.flatten(2).transpose(1, 2).reshape(-1, target.shape[1]).double()
        expected = torch.linalg.lstsq(rows, y, driver="gelsd").solution                     # (D, C)
    reconstruct(base.model, variant.model, variant.channel_map, ["4.conv2", "4.shortcut.0"], calibration,
                alpha=1e-10, positions=10 ** 6)
    fitted = block_sum(variant.model, x, 4).flatten(2).transpose(1, 2).reshape(-1, target.shape[1]).double()
    best = rows @ expected                             # unique even where the weights are not
    assert relative(fitted, best) < 1e-4 and relative(fitted, y) < 0.5
    assert torch.count_nonzero(block.shortcut[0].bias) == 0


def narrow_vgg():
    torch.manual_seed(0)
    return randomize_batchnorms(VGG(NARROW_VGG11))


def test_cached_segments_give_the_same_fit_as_a_fresh_start():
    """The grid's path (RepairInputs: unpruned activations entering the first changed segment,
    shared by every variant) and compress's (the calibration batches) refit the same weights."""
    base = Pruner(narrow_vgg(), torch.randn(1, 3, 32, 32))
    calibration = batches(size=32, count=2, batch=8)
    inputs = RepairInputs(base.model, calibration)
    for group in (0, 2):
        fresh, cached = base.copy(), base.copy()
        for v in (fresh, cached):
            v.prune_group(group, 0.5, "default", Scorer("l1"))
        names = reconstruct_pruned(base, fresh, calibration)
        assert names == reconstruct_pruned(base, cached, inputs) and names[-1] == "classifier"
        assert names[0] == {0: "features.25", 2: "features.18"}[group]
        for (key, a), b in zip(fresh.model.state_dict().items(), cached.model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    assert min(inputs.entering) > 0


def test_depthwise_blocks_are_refit_per_group():
    torch.manual_seed(0)
    model = randomize_batchnorms(MobileNetV2Small())
    base, variant = pruned(model, "default", 0.5, size=32)
    calibration, test = batches(size=32, count=3, batch=16), batches(size=32, count=1, batch=16, seed=4)[0]
    with torch.no_grad():
        before = relative(variant.model(test), base.model(test))
    names = reconstruct_pruned(base, variant, calibration)
    depthwise = [n for n in names if getattr(variant.model.get_submodule(n), "groups", 1) > 1]
    with torch.no_grad():
        after = relative(variant.model(test), base.model(test))
    assert depthwise and after < 0.5 * before, (before, after)
    assert any(u.through for u in residual_units(variant.model))


def test_mixer_token_mlps_whose_rows_are_pruned_channels_are_left_alone():
    """The token MLP runs along the embedding channels, which are pruned: its rows have no
    counterpart in the unpruned network, so it keeps its weights; the rest is refit."""
    from intrafusion.models import MLPMixerSmall
    torch.manual_seed(0)
    base, variant = pruned(MLPMixerSmall().eval(), "default", 0.5, size=32)
    token = variant.model.blocks[0].token_mlp.fc1.weight.detach().clone()
    calibration, test = batches(size=32, count=3, batch=16), batches(size=32, count=1, batch=32, seed=4)[0]
    with torch.no_grad():
        before = relative(variant.model(test), base.model(test))
    names = reconstruct_pruned(base, variant, calibration)
    with torch.no_grad():
        after = relative(variant.model(test), base.model(test))
    assert names == ["embed", "blocks.0.channel_mlp.0", "blocks.0.channel_mlp.2", "blocks.1.channel_mlp.0",
                     "blocks.1.channel_mlp.2", "classifier"]
    assert torch.equal(variant.model.blocks[0].token_mlp.fc1.weight, token)
    assert after < 0.75 * before, (before, after)


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_transformer_mlps_are_refit(name):
    """The MLPs' inner width and the attention heads pruned; every Linear from the first changed
    one on refit, the residual writers (attention output, MLP down-projection) at their adds."""
    pytest.importorskip("transformers")
    from intrafusion.models import bert_classifier, vit_tiny
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        model, make = vit_tiny().eval(), lambda n: torch.randn(n, 3, 32, 32, generator=g)
        layer, down, add = "net.vit.layers.0", "mlp.fc2", "layernorm_after"
    else:
        model, make = bert_classifier().eval(), lambda n: torch.randint(0, 100, (n, 16), generator=g)
        layer, down, add = "net.bert.encoder.layer.0", "output.dense", "output"
    base = Pruner(model, make(1), **pruner_options(model))
    variant = base.copy()
    variant.prune(range(len(variant.groups)), 0.5, "default", Scorer("l1"))
    assert Unit((f"{layer}.{down}",), (f"{layer}.{add}", 0 if name == "vit" else 1)) in residual_units(variant.model)
    width = lambda pruner: pruner.model.get_submodule(f"{layer}.{down}").in_features  # noqa: E731
    assert width(variant) < width(base)
    calibration, test = [make(16) for _ in range(3)], make(32)
    with torch.no_grad():
        before = relative(variant.model(test), base.model(test))
    names = reconstruct_pruned(base, variant, calibration)
    with torch.no_grad():
        after = relative(variant.model(test), base.model(test))
    assert f"{layer}.{down}" in names and after < 0.5 * before, (before, after)


@pytest.mark.parametrize("method", ["default_reconstruct", "intra_fusion_reconstruct"])
def test_compress_with_reconstruction(method):
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyResNet()).eval()
    calibration = batches(count=4)
    x = batches(count=1, batch=32, seed=5)[0]
    small = intrafusion.compress(model, x[:1], sparsity=0.5, method=method, calibration=calibration)
    plain = intrafusion.compress(model, x[:1], sparsity=0.5, method=method.replace("_reconstruct", ""))
    with torch.no_grad():
        assert relative(small(x), model(x)) < 0.5 * relative(plain(x), model(x))
    assert not small.training
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in plain.parameters())
    with pytest.raises(IntraFusionError, match="needs calibration data"):
        intrafusion.compress(model, x[:1], sparsity=0.5, method=method)


def test_a_unit_whose_layers_do_not_all_run_is_an_error(monkeypatch):
    model = two_blocks()
    model[3].unused = nn.Identity()                 # a module the block's forward never calls
    base = Pruner(model, torch.randn(1, 3, 8, 8))
    monkeypatch.setattr("intrafusion.reconstruct.residual_units", lambda m: [Unit(("3.conv2",), ("3.unused", 0))])
    with pytest.raises(IntraFusionError, match="did not all run"):
        reconstruct(base.model, base.copy().model, base.channel_map, ["3.conv2"], batches(size=8, count=1))


def test_the_grid_reconstructs_its_cells_on_the_repair_batches(grid_env, tmp_path):
    """main.py --methods takes the reconstruct methods; a grid cell's variant is the one that
    reconstruct_pruned makes from the grid's repair batches (through the RepairInputs cache)."""
    from intrafusion.cli import main
    from intrafusion.experiments.grid import GridConfig, GridRun, calibration_batches
    from intrafusion.experiments.results import read_table
    from intrafusion.methods import get_method
    data, ckpt = grid_env
    out = tmp_path / "r.csv"
    assert main(["--dataset", "cifar10", "--data-dir", str(data), "--checkpoint", str(ckpt), "--group_idxs", "2",
                 "--sparsities", "0.5", "--repair-batches", "2", "--quiet", "--out", str(out),
                 "--methods", "default", "default_reconstruct", "intra_fusion_reconstruct"]) == 0
    rows = {r["method"]: r for r in read_table(out)[1]}
    assert set(rows) == {"none", "default", "default_reconstruct", "intra_fusion_reconstruct"}
    assert rows["default_reconstruct"]["macs"] == rows["default"]["macs"]
    run = GridRun(GridConfig(model_name="vgg11_bn", dataset="cifar10", data_dir=str(data), checkpoint=ckpt,
                             repair_batches=2, batch_size=8), output=False)
    method, scorer = get_method("default_reconstruct"), run.scorer("l1")
    in_grid, by_hand = run.base.copy(), run.base.copy()
    run.apply(in_grid, scorer, method, {2: 0.5})
    by_hand.prune_group(2, 0.5, "default", scorer)
    reconstruct_pruned(run.base, by_hand, calibration_batches(run.dataset, 2, 8, seed=1))
    for (key, a), b in zip(in_grid.model.state_dict().items(), by_hand.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_budgets_and_the_sensitivity_profile_take_the_reconstruct_methods():
    """compress meets a MACs budget with the sensitivity allocation of a reconstruct method, and
    the profile's variants (api.variant_pruner, RepairInputs cache) are the reconstructed ones."""
    from intrafusion.api import variant_pruner
    from intrafusion.groups import FusionSettings, count_macs_params
    from intrafusion.methods import get_method
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyResNet()).eval()
    calibration = batches(count=2)
    g = torch.Generator().manual_seed(9)
    held_out = (torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 10, (24,), generator=g))
    x = held_out[0][:1]
    small = intrafusion.compress(model, x, macs=0.5, method="default_reconstruct", calibration=calibration,
                                 allocation="sensitivity", held_out=held_out)
    assert count_macs_params(small, x)[0] <= 0.5 * count_macs_params(model, x)[0]
    base = Pruner(model, x)
    prune = variant_pruner(base, get_method("default_reconstruct"), Scorer("l1"), FusionSettings(), calibration)
    in_profile, by_hand = base.copy(), base.copy()
    prune(in_profile, {1: 0.5})
    by_hand.prune_group(1, 0.5, "default", Scorer("l1"))
    reconstruct_pruned(base, by_hand, calibration)
    for (key, a), b in zip(in_profile.model.state_dict().items(), by_hand.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
