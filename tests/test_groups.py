import torch

from helpers import TinyResNet
from intrafusion.models import build_model
from intrafusion.groups import Pruner


def layers_of(pruner):
    return [set(g.layers) for g in pruner.groups]


def test_vgg11_bn_groups_are_convs_from_last_to_first():
    pruner = Pruner(build_model("vgg11_bn"), torch.randn(1, 3, 32, 32))
    convs = [f"features.{i}" for i in (0, 4, 8, 11, 15, 18, 22, 25)]
    assert layers_of(pruner) == [{c} for c in reversed(convs)]


def test_resnet18_groups_follow_the_paper_table():
    pruner = Pruner(build_model("resnet18"), torch.randn(1, 3, 32, 32))
    stream = lambda s: {f"layer{s}.0.conv2", f"layer{s}.0.shortcut.0", f"layer{s}.1.conv2"}
    expected = []
    for s in (4, 3, 2):
        expected += [stream(s), {f"layer{s}.1.conv1"}, {f"layer{s}.0.conv1"}]
    expected += [{"conv1", "layer1.0.conv2", "layer1.1.conv2"}, {"layer1.1.conv1"}, {"layer1.0.conv1"}]
    assert layers_of(pruner) == expected


def test_classifier_is_never_a_group_and_numbering_is_stable():
    pruner = Pruner(TinyResNet(), torch.randn(1, 3, 16, 16))
    assert all("linear" not in g.layers for g in pruner.groups)
    assert [g.index for g in pruner.groups] == list(range(len(pruner.groups)))
    assert layers_of(pruner) == [{"b2", "short.0"}, {"b1"}, {"conv1", "a2"}, {"a1"}]


def test_copies_keeping_distances_fuse_as_fresh_pruners_do():
    """Within keeping_distances, a group fused at several sparsities measures its channel
    distances once (kept on the shared dict) and every copy equals one pruned by itself."""
    from intrafusion.importance import Scorer
    torch.manual_seed(0)
    model = build_model("vgg11_bn", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    base = Pruner(model, x)
    with base.keeping_distances():
        variants = {s: base.copy() for s in (0.3, 0.6)}
        for s, v in variants.items():
            v.prune_group(2, s, "intra_fusion", Scorer("l1"))
        assert list(base.distances) == [2] and base.distances[2][1.0].shape == (512, 512)
    assert base.distances is None
    for s, v in variants.items():
        alone = base.copy()
        alone.prune_group(2, s, "intra_fusion", Scorer("l1"))
        for (name, a), b in zip(v.model.state_dict().items(), alone.model.state_dict().values()):
            assert torch.equal(a, b), name
