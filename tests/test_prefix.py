import pytest
import torch

from helpers import NARROW_VGG11, TinyVGG, randomize_batchnorms, read_rows
from intrafusion.importance import Scorer
from intrafusion.models import VGG, build_model
from intrafusion.experiments.prefix import GridEvaluator, first_changed_segment, model_segments, segment_of
from intrafusion.groups import Pruner


SLOW = pytest.mark.slow
NARROW = "narrow_vgg11_bn"  # VGG11-BN at 1/8 of the widths: the same segments and group numbers


def setup(name, n=48, seed=0):
    torch.manual_seed(seed)
    model = randomize_batchnorms(VGG(NARROW_VGG11) if name == NARROW else build_model(name))
    x = torch.randn(n, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    # labels that make accuracy informative: the unpruned prediction, half of them shifted
    y = logits.argmax(1)
    y[::2] = (y[::2] + 1) % 10
    return Pruner(model, x[:1]), x, y


@pytest.mark.parametrize("name,group,first", [
    (NARROW, 1, "features.22"), (NARROW, 3, "features.15"), ("resnet18", 1, "layer4.1"),
    pytest.param("vgg11_bn", 1, "features.22", marks=SLOW), pytest.param("resnet18", 2, "layer4.0", marks=SLOW),
    pytest.param("resnet18", 3, "layer3.0", marks=SLOW)])
def test_first_changed_segment_is_where_the_group_starts(name, group, first):
    base, x, _ = setup(name, n=4)
    variant = base.copy()
    variant.prune_group(group, 0.5, "intra_fusion", Scorer("l1"))
    segments = model_segments(base.model)
    index = first_changed_segment(base.model, variant.model, segments)
    assert segments[index][0][0] == first
    assert segment_of(segments, base.changed_modules(group)) == index


@pytest.mark.parametrize("name", [NARROW, pytest.param("vgg11_bn", marks=SLOW),
                                  pytest.param("resnet18", marks=SLOW)])
def test_fast_accuracy_equals_full_forward_to_the_last_image(name):
    base, x, y = setup(name)
    fast = GridEvaluator(base, x, y, fast=True, batch_size=16)
    full = GridEvaluator(base, x, y, fast=False, batch_size=16)
    assert fast.segments is not None
    for group in (0, 1, 2, 3):
        for method in ("default", "intra_fusion"):
            variant = base.copy()
            variant.prune_group(group, 0.6, method, Scorer("l1"))
            a, b = fast.accuracy(variant), full.accuracy(variant)
            assert a == b
    assert fast.stats["full"] == 0 and fast.stats["suffix"] == 8
    assert fast.stats["prefix_computed"] <= 4 and full.stats["suffix"] == 0


@pytest.mark.parametrize("name", [NARROW, pytest.param("vgg11_bn", marks=SLOW),
                                  pytest.param("resnet18", marks=SLOW)])
@pytest.mark.parametrize("planned", [True, False])
def test_planned_prefixes_run_every_unpruned_layer_once(name, planned):
    base, x, y = setup(name)
    ev = GridEvaluator(base, x, y, fast=True, batch_size=16)
    full = GridEvaluator(base, x, y, fast=False, batch_size=16)
    order = (1, 3, 2)                               # deepest prefix first, then the shallowest
    if planned:
        ev.plan(order)
    convs = [m for m in base.model.modules() if isinstance(m, torch.nn.Conv2d)]
    calls = {}                                      # batch forwards (not 1-image probes) per module
    hooks = [m.register_forward_hook(lambda m, i, o: calls.update({m: calls.get(m, 0) + (len(o) > 1)}))
             for m in convs]
    for group in order:
        variant = base.copy()
        variant.prune_group(group, 0.5, "intra_fusion", Scorer("l1"))
        assert ev.accuracy(variant) == full.accuracy(variant)
    for h in hooks:
        h.remove()
    batches = len(y) // 16
    # with a plan the one pass also keeps the shallower prefixes; without, the shallowest is
    # computed from the input again and the middle one from it
    assert max(calls.get(m, 0) for m in convs) == batches * (1 if planned else 2)
    assert ev.stats["prefix_computed"] == 3 and ev.stats["suffix"] == 3
    assert ev._cache_bytes() <= ev.budget


def test_budget_too_small_falls_back_to_full_forward():
    base, x, y = setup(NARROW, n=16)
    tight = GridEvaluator(base, x, y, fast=True, cache_mb=1e-4)
    variant = base.copy()
    variant.prune_group(2, 0.5, "default", Scorer("l1"))
    assert tight.accuracy(variant) == GridEvaluator(base, x, y, fast=False).accuracy(variant)
    assert tight.stats == {"full": 1, "suffix": 0, "prefix_computed": 0} and not tight.cache


def test_cache_is_evicted_to_stay_within_budget():
    base, x, y = setup(NARROW, n=16)
    width = base.model.features[22].in_channels
    one_entry = 16 * width * 2 * 2 * 4 / 2 ** 20    # activations entering features.22: (16, width, 2, 2)
    ev = GridEvaluator(base, x, y, fast=True, cache_mb=one_entry * 1.5)
    for group in (1, 0):
        variant = base.copy()
        variant.prune_group(group, 0.5, "default", Scorer("l1"))
        ev.accuracy(variant)
    assert len(ev.cache) == 1 and ev._cache_bytes() <= ev.budget


def test_models_that_cannot_be_split_use_the_full_forward():
    torch.manual_seed(0)
    base = Pruner(randomize_batchnorms(TinyVGG()), torch.randn(1, 3, 16, 16))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    ev = GridEvaluator(base, x, y)
    assert ev.segments is None
    variant = base.copy()
    variant.prune_group(1, 0.5, "intra_fusion", Scorer("l1"))
    ev.accuracy(variant)
    assert ev.stats["full"] == 1


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


def test_naive_and_fast_grids_write_the_same_accuracies(grid_env, tmp_path):
    from intrafusion.cli import main
    data, ckpt = grid_env
    accs = {}
    for flag in ([], ["--naive"]):
        out = tmp_path / f"r{len(flag)}.csv"
        assert main(["--model-name", "vgg11_bn", "--dataset", "cifar10", "--data-dir", str(data),
                     "--checkpoint", str(ckpt), "--group_idxs", "1", "3", "--sparsities", "0.5",
                     "--importance_criteria", "taylor", "--out", str(out), "--quiet"] + flag) == 0
        accs[bool(flag)] = [(r["group"], r["method"], r["accuracy"]) for r in read_rows(out)]
    assert len(accs[False]) == 5 and accs[False] == accs[True]
