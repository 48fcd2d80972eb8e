"""Data-major evaluation (evaluator.py): accuracies equal to the full forward pass,
the unpruned network run once per batch, reused first layers, bounded memory, and the grid's
chunks."""
import copy
import math

import pytest
import torch
from torch import nn

from helpers import NARROW_VGG11, TinyVGG, randomize_batchnorms, read_rows
from intrafusion.importance import Scorer
from intrafusion.models import VGG, build_model
from intrafusion.evaluator import (GridEvaluator, first_changed_segment, model_segments, own_storage,
                                            share_unchanged)
from intrafusion.groups import Pruner
from intrafusion.repair import repair_pruned


SLOW = pytest.mark.slow
NARROW = "narrow_vgg11_bn"  # VGG11-BN at 1/8 of the widths: the same segments and group numbers
NARROW_NO_BN = "narrow_vgg11"  # the same without BN: each conv is followed by an in-place ReLU
METHODS = ("default", "intra_fusion", "default_repair", "intra_fusion_repair")


def setup(name, n=48, seed=0):
    torch.manual_seed(seed)
    narrow = {NARROW: lambda: VGG(NARROW_VGG11), NARROW_NO_BN: lambda: VGG(NARROW_VGG11, batch_norm=False)}
    model = randomize_batchnorms(narrow[name]() if name in narrow else build_model(name))
    x = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    # labels that make accuracy informative: the unpruned prediction, half of them shifted
    y = logits.argmax(1)
    y[::2] = (y[::2] + 1) % 10
    return Pruner(model, x[:1]), x, y


def pruned(base, groups, method, sparsity=0.6, x=None):
    """A copy of base with `groups` pruned by `method` (a *_repair method repairs on x)."""
    variant = base.copy()
    for g in groups:
        variant.prune_group(g, sparsity, method.removesuffix("_repair"), Scorer("l1"))
    if method.endswith("_repair"):
        repair_pruned(base, variant, [x[:16], x[16:32]])
    return variant


def predictions(model, x):
    with torch.inference_mode():
        return model.eval()(x).argmax(1)


@pytest.mark.parametrize("name,group,first,layer", [
    (NARROW, 1, "features.22", "features.22"), (NARROW, 3, "features.15", "features.15"),
    ("resnet18", 1, "layer4.1", "layer4.1.conv1"),
    pytest.param("vgg11_bn", 1, "features.22", "features.22", marks=SLOW),
    pytest.param("resnet18", 0, "layer4.0", "layer4.0.conv2", marks=SLOW),
    pytest.param("resnet18", 3, "layer3.0", "layer3.0.conv2", marks=SLOW)])
def test_evaluation_starts_at_the_groups_first_layer(name, group, first, layer):
    base, x, y = setup(name, n=4)
    segments = model_segments(base.model)
    ev = GridEvaluator(base, x, y)
    for method in ("default", "intra_fusion"):
        variant = pruned(base, [group], method, 0.5)
        route = ev.route(variant)
        assert segments[first_changed_segment(base.model, variant.model, segments)][0][0] == first
        assert segments[route.start][0][0] == first and route.reuse.name == layer
        assert (route.reuse.rows is not None) == (method == "default")


@pytest.mark.parametrize("name", [NARROW, NARROW_NO_BN, pytest.param("vgg11_bn", marks=SLOW),
                                  pytest.param("resnet18", marks=SLOW)])
def test_data_major_predictions_equal_the_full_forward_to_the_image(name):
    """All variants in one pass: default pruning gives every image's prediction exactly; a fused
    or repaired variant's reused layer differs by float rounding, at most one image here (and
    the cross-entropy, which sees every logit, to float rounding)."""
    base, x, y = setup(name)
    variants = {(g, m): pruned(base, [g], m, x=x) for g in (0, 1, 2, 3) for m in METHODS}
    ev = GridEvaluator(base, x, y, batch_size=16)
    naive = GridEvaluator(base, x, y, fast=False, batch_size=16)
    fast = ev.evaluate(list(variants.values()), "predictions")
    full = naive.evaluate(list(variants.values()), "predictions")
    assert ev.stats["full"] == 0 and ev.stats["suffix"] == len(variants) and ev.stats["reused"] >= 12
    for ((g, method), variant), a, b in zip(variants.items(), fast, full):
        assert a.shape == y.shape and torch.equal(b, predictions(variant.model, x))
        assert int((a != b).sum()) <= (0 if method == "default" else 1), (g, method)
        if method == "default":
            assert ev.accuracy(variant) == naive.accuracy(variant)
    losses = ev.evaluate(list(variants.values()), "cross_entropy")
    assert losses == pytest.approx(naive.evaluate(list(variants.values()), "cross_entropy"), rel=1e-5)


@pytest.mark.parametrize("name", [NARROW, "resnet18"])
@pytest.mark.parametrize("method", METHODS)
def test_reused_layer_output_equals_the_real_layer(name, method):
    base, x, _ = setup(name, n=32)
    ev = GridEvaluator(base, x, torch.zeros(len(x), dtype=torch.long))
    for group in (1, 3):
        variant = pruned(base, [group], method, 0.5, x=x)
        reuse = ev.route(variant).reuse
        seen = {}
        hook = base.model.get_submodule(reuse.name).register_forward_hook(
            lambda m, i, o: seen.update(input=i[0], output=o))
        predictions(base.model, x)
        hook.remove()
        with torch.inference_mode():
            real = variant.model.get_submodule(reuse.name)(seen["input"])
            reused = reuse(seen["output"])
        # default pruning keeps rows, fusion mixes them; repair may rescale the kept rows
        assert reuse.rows is not None if method == "default" else method.endswith("repair") or reuse.rows is None
        if reuse.rows is not None:
            assert torch.equal(reused, real)
        else:
            assert torch.allclose(reused, real, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [NARROW, pytest.param("resnet18", marks=SLOW)])
def test_unpruned_network_runs_once_per_batch_and_gives_its_accuracy(name):
    base, x, y = setup(name)
    ev = GridEvaluator(base, x, y, batch_size=16)
    layers = [m for m in base.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    calls = {}                                      # batch forwards (not 1-image probes) per layer
    hooks = [m.register_forward_hook(lambda m, i, o: calls.update({m: calls.get(m, 0) + (len(o) > 1)}))
             for m in layers]
    variants = [pruned(base, [g], m) for g in (1, 3, 2) for m in ("default", "intra_fusion")]
    accuracies = ev.evaluate(variants)
    for h in hooks:
        h.remove()
    assert ev.base_accuracy == GridEvaluator(base, x, y, fast=False).base_accuracy
    batches = len(y) // 16
    assert set(calls.values()) == {batches}         # the classifier too: the unpruned accuracy
    assert ev.stats == {"passes": 1, "batches": batches, "base_segments": batches * len(ev.segments),
                        "full": 0, "suffix": 6, "reused": 6}
    assert ev.evaluate(variants) == accuracies      # unpruned accuracy known: no run to the end
    assert ev.stats["base_segments"] < 2 * batches * len(ev.segments)


def test_memory_does_not_grow_with_the_test_set():
    """The evaluator keeps no activations between passes, and within one the unpruned activations
    it holds per batch are the same for a test set four times as large."""
    held = {}
    for n in (32, 128):
        base, x, y = setup(NARROW, n=n)
        ev = GridEvaluator(base, x, y, batch_size=16)
        run = ev._base_batch

        def measured(*args):
            inputs, logits = run(*args)
            held[n] = max(held.get(n, 0), sum(t.numel() for t in inputs.values()))
            return inputs, logits
        ev._base_batch = measured
        ev.evaluate([pruned(base, [g], "intra_fusion") for g in (1, 3, 5)])
        assert [k for k, v in vars(ev).items() if torch.is_tensor(v)] == ["images", "labels"]
    assert held[32] == held[128] > 0


def test_budget_cells_with_every_group_pruned_evaluate_exactly():
    base, x, y = setup(NARROW)
    every = range(len(base.groups))
    variants = [pruned(base, every, m, 0.5) for m in ("default", "intra_fusion")]
    ev = GridEvaluator(base, x, y, batch_size=16)
    assert [ev.route(v).start for v in variants] == [0, 0]
    assert ev.evaluate(variants) == GridEvaluator(base, x, y, fast=False, batch_size=16).evaluate(variants)


@pytest.mark.parametrize("make", ["mixer", pytest.param("vit", marks=SLOW)])
def test_models_that_cannot_be_split_evaluate_every_variant_whole(make):
    from intrafusion.models import pruner_options
    torch.manual_seed(0)
    if make == "vit":
        from intrafusion.models.hf import vit_tiny
        model = vit_tiny(10, hidden=32, layers=2, heads=4, intermediate=64)
    else:
        model = randomize_batchnorms(build_model("mixer"))
    x = torch.randn(24, 3, 32, 32)
    y = predictions(model, x).clone()
    y[::3] = (y[::3] + 1) % 10
    base = Pruner(model.eval(), x[:1], **pruner_options(model))
    variants = [pruned(base, [g], m, 0.5) for g in (0, 1) for m in ("default", "intra_fusion")]
    ev = GridEvaluator(base, x, y, batch_size=8)
    assert ev.segments is None
    assert ev.evaluate(variants) == GridEvaluator(base, x, y, fast=False, batch_size=8).evaluate(variants)
    assert ev.stats["full"] == 4 and ev.base_accuracy == 16 / 24


def test_models_without_segments_use_the_full_forward():
    torch.manual_seed(0)
    base = Pruner(randomize_batchnorms(TinyVGG()), torch.randn(1, 3, 16, 16))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ev = GridEvaluator(base, x, y)
    assert ev.segments is None
    ev.accuracy(pruned(base, [1], "intra_fusion", 0.5))
    assert ev.stats["full"] == 1


def test_variants_share_unchanged_tensors_until_they_own_them():
    base, x, y = setup(NARROW, n=16)
    variant = pruned(base, [1], "intra_fusion", 0.5)
    before = GridEvaluator(base, x, y).accuracy(variant)
    share_unchanged(base.model, variant.model)
    storage = {t.data_ptr() for t in base.model.state_dict().values()}
    state = variant.model.state_dict()
    shared = [k for k, t in state.items() if t.data_ptr() in storage]
    assert "features.0.weight" in shared and "features.22.weight" not in shared
    assert GridEvaluator(base, x, y).accuracy(variant) == before
    own_storage(base.model, variant.model)
    original = base.model.features[0].weight.clone()
    with torch.no_grad():
        variant.model.features[0].weight.add_(1.0)   # training the variant leaves the base alone
    assert torch.equal(base.model.features[0].weight, original)


def test_taylor_gradients_are_measured_once_per_model_unless_disabled(monkeypatch):
    from intrafusion import importance
    calls = []
    real = importance.taylor_gradients
    monkeypatch.setattr(importance, "taylor_gradients", lambda m, b: calls.append(1) or real(m, b))
    base, x, y = setup(NARROW, n=8)
    batches = [(x, y)]
    for cache, expected in ((True, 1), (False, 4)):
        calls.clear()
        scorer = Scorer("taylor", batches, cache=cache)
        for group in (1, 2):
            for s in (0.3, 0.5):
                base.copy().prune_group(group, s, "default", scorer)
        assert len(calls) == expected


@pytest.mark.parametrize("extra,rows", [([], 5), (["--finetune-epochs", "1"], 9)])
def test_naive_and_fast_grids_write_the_same_accuracies(grid_env, tmp_path, extra, rows):
    """With fine-tuning too: a variant owns its tensors before it is trained, so the base (and the
    cells after it) stay as they were."""
    from intrafusion.cli import main
    data, ckpt = grid_env
    accs = {}
    for flag in ([], ["--naive"]):
        out = tmp_path / f"r{len(flag)}.csv"
        assert main(["--model-name", "vgg11_bn", "--dataset", "cifar10", "--data-dir", str(data),
                     "--checkpoint", str(ckpt), "--group_idxs", "1", "3", "--sparsities", "0.5",
                     "--importance_criteria", "taylor", "--out", str(out), "--quiet"] + extra + flag) == 0
        accs[bool(flag)] = [(r["group"], r["method"], r["accuracy"]) for r in read_rows(out)]
    assert len(accs[False]) == rows and accs[False] == accs[True]


def test_grid_chunks_share_one_pass_that_gives_the_unpruned_accuracy(grid_env, tmp_path):
    """The pending cells fit the default --cache-mb: one chunk, one pass, which also gives the
    'none' row; --cache-mb 0 hands one log line (both methods) per chunk."""
    import dataclasses
    from intrafusion.experiments.grid import GridConfig, GridRun
    data, ckpt = grid_env
    config = GridConfig(dataset="cifar10", data_dir=str(data), checkpoint=ckpt, group_idxs=(1, 3),
                        sparsities=(0.3, 0.5), out=tmp_path / "r.csv")
    run = GridRun(config, log=lambda _: None)
    cells = run.cells()
    assert run.chunks(cells) == [cells]
    rows = run.run()[str(config.out)]
    ev = run.evaluator
    assert ev.stats["passes"] == 1 and ev.stats["base_segments"] == len(ev.segments)  # 30 images: one batch
    naive = GridEvaluator(run.base, ev.images, ev.labels, fast=False)
    assert rows[0]["method"] == "none" and rows[0]["accuracy"] == naive.base_accuracy
    tight = GridRun(dataclasses.replace(config, cache_mb=0, out=tmp_path / "t.csv"), log=lambda _: None)
    assert tight.chunks(cells) == [cells[i:i + 2] for i in range(0, len(cells), 2)]


def test_language_model_perplexity_is_exp_of_the_mean_next_token_nll():
    """A transformers causal LM (its output a ModelOutput) on token windows (N, L): the unpruned
    and a variant's perplexity equal exp of the mean cross-entropy of each position's logits
    against the next token, computed by hand over all windows."""
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(config).eval()
    variant = copy.deepcopy(base)
    with torch.no_grad():
        variant.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    tokens = torch.randint(0, 50, (7, 12))
    evaluator = GridEvaluator(SimpleNamespace(model=base), tokens, tokens, batch_size=3)

    def by_hand(model):
        with torch.no_grad():
            out = model(tokens).logits
        nll = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))
        return math.exp(float(nll))

    got = evaluator.evaluate([SimpleNamespace(model=variant)], "perplexity")[0]
    assert got == pytest.approx(by_hand(variant), rel=1e-5)
    assert evaluator.unpruned("perplexity") == pytest.approx(by_hand(base), rel=1e-5)
    assert got != pytest.approx(evaluator.unpruned("perplexity"), rel=1e-6)
