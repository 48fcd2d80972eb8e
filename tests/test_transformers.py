"""Hugging Face transformers models (built from tiny configs, nothing downloaded): groups, whole-head
pruning of attention, Intra-Fusion of MLP neurons, LayerNorm, config consistency, the registry."""
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from intrafusion.attention import find_attention, head_dims, unit_channels, unit_scores  # noqa: E402
from intrafusion.errors import IntraFusionError  # noqa: E402
from intrafusion.groups import FusionSettings, Pruner  # noqa: E402
from intrafusion.importance import Scorer  # noqa: E402
from intrafusion.models import build_model, pruner_options  # noqa: E402
from intrafusion.models.hf import bert_classifier, vit_tiny  # noqa: E402

TINY = dict(hidden=32, layers=2, heads=4, intermediate=64)


def tiny_vit():
    torch.manual_seed(0)
    return vit_tiny(10, **TINY).eval()


def tiny_bert():
    torch.manual_seed(0)
    return bert_classifier(2, **TINY).eval()


MODELS = {"vit": (tiny_vit, lambda: torch.randn(4, 3, 32, 32)),
          "bert": (tiny_bert, lambda: torch.randint(0, 100, (4, 16)))}


def make_pruner(kind, residual=False):
    """A Pruner of the tiny model `kind` and an input batch; `residual` also numbers the
    residual-stream group (left out by the registry's pruner_options)."""
    make, inputs = MODELS[kind]
    model, x = make(), inputs()
    options = {} if residual else pruner_options(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning: unwrapped cls/position parameters
        return Pruner(model, x, **options), x


def attention_group(pruner, layer=0):
    return next(g.index for g in pruner.groups if any(f".{layer}.attention" in n and n in pruner.head_dims
                                                      for n in g.layers))


def mlp_group(pruner, layer=0):
    return next(g.index for g in pruner.groups
                if any(n.endswith((f"{layer}.mlp.fc1", f"{layer}.intermediate.dense")) for n in g.layers))


class PickFirstHalf:
    """Importance keeping the lowest channel indices (higher score for lower index)."""

    def __call__(self, model, graph, group, n, pristine=True):
        return torch.arange(n, 0, -1).float()


def test_unit_scores_and_channels():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0, 5.0])
    torch.testing.assert_close(unit_scores(scores, 2), torch.tensor([2.0, 0.0, 5.0]))
    assert unit_channels(torch.tensor([2, 0]), 2).tolist() == [0, 1, 4, 5]
    assert unit_channels(torch.tensor([3, 1]), 1).tolist() == [1, 3]


@pytest.mark.parametrize("kind", MODELS)
def test_groups_attention_heads_and_residual_stream(kind):
    pruner, _ = make_pruner(kind)
    assert [a.head_dim for a in find_attention(pruner.model)] == [8, 8]
    assert len(head_dims(pruner.model)) == 6   # q, k, v of both layers
    units = [pruner.unit(g.index) for g in pruner.groups]
    layers = [g.layers for g in pruner.groups]
    assert units.count(8) == 2 and all(len(ls) == 3 for ls, u in zip(layers, units) if u == 8)
    mlp = [ls for ls in layers if ls[0].endswith(("fc1", "intermediate.dense"))]
    assert len(mlp) == 2
    assert not any("o_proj" in n or "output.dense" in n for ls in layers for n in ls)
    assert len(make_pruner(kind, residual=True)[0].groups) == len(layers) + 1


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("method", ["default", "intra_fusion"])
def test_every_group_prunes_and_the_config_follows(kind, residual, method):
    pruner, x = make_pruner(kind, residual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = pruner.prune(range(len(pruner.groups)), 0.5, method, Scorer("l1"))
    out = pruner.model(x)
    assert out.shape == (4, 10 if kind == "vit" else 2) and torch.isfinite(out).all()
    assert all(r.kept == r.channels // 2 for r in records)
    for a in find_attention(pruner.model):
        module = pruner.model.get_submodule(a.name)
        widths = {pruner.model.get_submodule(n).out_features for n in a.qkv}
        assert widths == {16} and module.num_attention_heads == 2
        assert getattr(module, "all_head_size", 16) == 16
    config = pruner.model.net.config
    assert (config.num_attention_heads, config.intermediate_size) == (2, 32)
    assert config.hidden_size == (16 if residual else 32)


@pytest.mark.parametrize("kind", MODELS)
def test_pruning_heads_removes_exactly_their_contribution(kind):
    """Heads 1 and 3 made small get the lowest l1 scores; the pruned network computes what the
    unpruned one computes with those heads' output-projection columns set to zero."""
    pruner, x = make_pruner(kind)
    index = attention_group(pruner)
    a = find_attention(pruner.model)[0]
    q, k, v = (pruner.model.get_submodule(n) for n in a.qkv)
    out_proj = pruner.model.get_submodule(a.name + ".o_proj" if kind == "vit"
                                          else a.name.rsplit(".", 1)[0] + ".output.dense")
    dropped = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    with torch.no_grad():
        for layer in (q, k, v):
            layer.weight[dropped] *= 0.01
        masked = pruner.copy()
        masked.model.get_submodule(pruner.graph._module2name[out_proj]).weight[:, dropped] = 0
        expected = masked.model(x)
    record = pruner.prune_group(index, 0.5, "default", Scorer("l1"))
    assert (record.channels, record.kept) == (32, 16)
    assert pruner.channel_map[a.qkv[0]].tolist() == [*range(8), *range(16, 24)]
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-5, rtol=1e-4)


def test_sparsity_counts_whole_heads():
    pruner, _ = make_pruner("vit")
    index = attention_group(pruner)
    assert pruner.check_prunable(index, 0.3) == (32, 16)    # int(4 · 0.7) = 2 heads of 8
    assert pruner.check_prunable(index, 0.2) == (32, 24)
    with pytest.raises(IntraFusionError, match=r"group \d \(4 heads\) with no head"):
        pruner.check_prunable(index, 0.8)


@pytest.mark.parametrize("kind", MODELS)
def test_intra_fusion_prunes_heads_the_default_way_and_says_so_once(kind):
    pruner, x = make_pruner(kind)
    fused, default = pruner.copy(), pruner.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for variant in (fused, fused.copy()):
            records = [variant.prune_group(attention_group(variant, layer), 0.5, "intra_fusion",
                                           Scorer("l1")) for layer in (0, 1)]
    default.prune(sorted(attention_group(default, layer) for layer in (0, 1)), 0.5, "default",
                  Scorer("l1"))
    assert not any(r.fused for r in records)
    assert sum("attention heads" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(fused.model(x), default.model(x))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("rule", ["fork", "mean"])
def test_sparsity_zero_is_the_identity_layernorms_included(kind, rule):
    pruner, x = make_pruner(kind, residual=True)  # the residual group holds every LayerNorm
    expected = pruner.model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune(range(len(pruner.groups)), 0.0, "intra_fusion", Scorer("l1"),
                     FusionSettings(rule=rule))
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("layer", [0, 1])
def test_duplicated_mlp_neurons_fuse_without_change_before_layernorm(kind, layer):
    """Neurons 32..63 of an MLP copy 0..31 (rows and output columns); the `mean` rule fuses
    each copy into its original, so the sum reaching the residual stream and the LayerNorm
    after it is unchanged; default pruning loses the copies' half."""
    pruner, x = make_pruner(kind)
    index = mlp_group(pruner, layer)
    fc1, fc2 = (pruner.model.get_submodule(n) for n in
                ((f"net.vit.layers.{layer}.mlp.fc1", f"net.vit.layers.{layer}.mlp.fc2") if kind == "vit"
                 else (f"net.bert.encoder.layer.{layer}.intermediate.dense",
                       f"net.bert.encoder.layer.{layer}.output.dense")))
    with torch.no_grad():
        fc1.weight[32:] = fc1.weight[:32]
        fc1.bias[32:] = fc1.bias[:32]
        fc2.weight[:, 32:] = fc2.weight[:, :32]
    expected = pruner.model(x)
    default = pruner.copy()
    default.prune_group(index, 0.5, "default", PickFirstHalf())
    pruner.prune_group(index, 0.5, "intra_fusion", PickFirstHalf(), FusionSettings(rule="mean"))
    assert fc1.out_features == 32 and fc2.in_features == 32
    torch.testing.assert_close(pruner.model(x), expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(default.model(x), expected, atol=1e-5, rtol=1e-4)


def test_uniformly_pruned_vit_rebuilds_from_its_config():
    """With every layer pruned alike, the synced config builds a ViT with exactly the pruned
    shapes: the weights load strictly and compute the same logits."""
    from transformers import ViTForImageClassification

    pruner, x = make_pruner("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.prune(range(len(pruner.groups)), 0.5, "intra_fusion", Scorer("l1"))
    net = pruner.model.net
    rebuilt = ViTForImageClassification(net.config).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(rebuilt(x).logits, pruner.model(x))


def test_loading_a_state_dict_syncs_the_head_counts():
    pruner, x = make_pruner("vit")
    pruner.prune_group(attention_group(pruner), 0.5, "default", Scorer("l1"))
    fresh = tiny_vit()
    for name, tensor in pruner.model.state_dict().items():   # give the fresh model the shapes
        owner, _, attr = name.rpartition(".")
        setattr(fresh.get_submodule(owner), attr, nn.Parameter(torch.empty_like(tensor)))
    fresh.load_state_dict(pruner.model.state_dict())
    heads = [fresh.get_submodule(a.name).num_attention_heads for a in find_attention(fresh)]
    assert heads == [m.num_attention_heads for m in
                     (pruner.model.get_submodule(a.name) for a in find_attention(pruner.model))]
    assert sorted(heads) == [2, 4]
    torch.testing.assert_close(fresh(x), pruner.model(x))


@pytest.mark.parametrize("name", ["vit_tiny", "mixer", pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_registry_models_train_in_channels_last_and_prune(name):
    from intrafusion.experiments.training import sgd_step

    torch.manual_seed(0)
    model = build_model(name, 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = [sgd_step(model, nn.CrossEntropyLoss(), optimizer, scheduler, x, y, torch.device("cpu"))
              for _ in range(2)]
    assert losses[1] < losses[0] < 10    # a step on the batch lowered its loss
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x[:1], 10, **pruner_options(model))
        pruner.prune(range(len(pruner.groups)), 0.5, "intra_fusion", Scorer("l1"))
    assert pruner.model(x).shape == (8, 10)


def test_pruned_vit_tiny_saves_and_loads_by_itself(tmp_path):
    from intrafusion import serialize

    torch.manual_seed(0)
    model = build_model("vit_tiny", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, x, 10, **pruner_options(model))
        pruner.prune([0, 1], 0.5, "intra_fusion", Scorer("l1"))   # last layer: MLP and heads
    serialize.save(pruner.model, tmp_path / "vit.pt")
    loaded = serialize.load(tmp_path / "vit.pt")
    torch.testing.assert_close(loaded(x), pruner.model(x))
    assert [loaded.get_submodule(a.name).num_attention_heads for a in find_attention(loaded)] == [4, 4, 2]


@pytest.mark.slow
def test_main_grid_runs_vit_tiny_on_its_mlp_groups(tmp_path):
    """main.py with --model-name vit_tiny: the registry's pruner options (residual stream left
    out), repair on 3-D token activations, one row per cell."""
    from helpers import write_cifar
    from intrafusion.cli import main
    from intrafusion.experiments.results import read_table

    data, ckpt = tmp_path / "data", tmp_path / "vit.checkpoint"
    write_cifar(data, n_train=40, n_test=30)
    torch.manual_seed(0)
    torch.save({"model_state_dict": build_model("vit_tiny", 10).state_dict(), "test_accuracy": 10.0,
                "epoch": 1}, ckpt)
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--checkpoint", str(ckpt),
            "--model-name", "vit_tiny", "--group_idxs", "0", "1", "--sparsities", "0.5",
            "--repair-batches", "1", "--quiet", "--out", str(tmp_path / "r.csv"),
            "--methods", "default", "intra_fusion", "intra_fusion_repair"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    _, rows = read_table(tmp_path / "r.csv")
    assert {(r["group"], r["method"]) for r in rows} == {(-1, "none")} | {
        (g, m) for g in (0, 1) for m in ("default", "intra_fusion", "intra_fusion_repair")}
    base = next(r for r in rows if r["method"] == "none")
    assert all(r["macs"] < base["macs"] for r in rows if r["method"] != "none")
