import ot
import pytest
import torch

from intrafusion.transport import channel_distances, cluster_centroids, normalize_rows, transport_map


def features(n=12, d=5, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", ["most_important", "cluster_centroid"])
@pytest.mark.parametrize("source_prob,target_prob", [("uniform", "uniform"), ("importance", "uniform"),
                                                     ("uniform", "importance"), ("importance", "importance")])
def test_map_shape_and_column_sums(target, source_prob, target_prob):
    x = features()
    scores = torch.rand(12, generator=torch.Generator().manual_seed(1)) + 0.1
    keep = torch.tensor([0, 3, 5, 8, 11])
    T = transport_map(x, keep, scores, target, source_prob, target_prob)
    assert T.shape == (5, 12)
    assert (T >= 0).all()
    torch.testing.assert_close(T.sum(0), torch.ones(12))


def test_map_is_column_normalized_exact_emd_plan():
    x, keep = features(), torch.tensor([1, 2, 7])
    xn = normalize_rows(x.double())
    cost = torch.cdist(xn, xn[keep], p=2).numpy()
    plan = torch.as_tensor(ot.emd(torch.full((12,), 1 / 12).double().numpy(),
                                  torch.full((3,), 1 / 3).double().numpy(), cost))
    expected = (plan / plan.sum(1, keepdim=True)).T
    torch.testing.assert_close(transport_map(x, keep, p=2).double(), expected, atol=1e-6, rtol=1e-6)


def test_keeping_everything_gives_identity():
    x = features()
    torch.testing.assert_close(transport_map(x, torch.arange(12)), torch.eye(12))


def test_kept_channels_map_to_themselves_and_pruned_go_to_nearest():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    T = transport_map(x, torch.tensor([0, 1]))
    torch.testing.assert_close(T, torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]))


def test_importance_marginal_changes_the_plan():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    keep = torch.tensor([0, 1])
    scores = torch.tensor([1.0, 3.0, 1.0])
    T = transport_map(x, keep, scores, source_prob="importance", target_prob="importance")
    # sources [.2, .6, .2], targets [.25, .75]: channel 2 sends .05 to target 0 and .15 to 1
    torch.testing.assert_close(T[:, 2], torch.tensor([0.25, 0.75]))
    uniform = transport_map(x, keep)
    torch.testing.assert_close(uniform[:, 2], torch.tensor([0.5, 0.5]))


def test_cluster_centroids_are_reproducible_and_handle_few_distinct_points():
    x = normalize_rows(features(20, 4))
    m1, w1 = cluster_centroids(x, 3, seed=0)
    m2, _ = cluster_centroids(x, 3, seed=0)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(w1.sum(), torch.tensor(1.0))
    dup = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)
    means, weights = cluster_centroids(dup, 3)
    assert means.shape == (3, 2) and torch.isfinite(means).all()
    T = transport_map(dup, torch.tensor([0, 1, 4]), target="cluster_centroid")
    assert torch.isfinite(T).all()


def test_centroid_rows_follow_the_kept_channels():
    """Three tight clusters listed in an order unrelated to the mixture's component order: row j
    of the map must be the centroid of the cluster that contains kept channel keep[j]."""
    centers = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cluster = torch.tensor([2, 0, 1, 2, 0, 1, 1, 2, 0])
    noise = 0.01 * torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    x = centers[cluster] + noise
    for keep in (torch.tensor([0, 1, 2]), torch.tensor([4, 6, 7]), torch.tensor([1, 3, 6])):
        T = transport_map(x, keep, target="cluster_centroid")
        members = cluster[:, None] == cluster[keep][None, :]      # (9, 3)
        torch.testing.assert_close(T.T, members.double().to(T.dtype), atol=1e-6, rtol=0)


def test_zero_features_and_ties_do_not_produce_nan():
    x = torch.zeros(6, 3)
    x[0, 0] = 1.0
    T = transport_map(x, torch.tensor([0, 1, 2]), torch.zeros(6), source_prob="importance",
                      target_prob="importance")
    assert torch.isfinite(T).all()
    torch.testing.assert_close(T.sum(0), torch.ones(6))


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
def test_kept_distances_give_the_map_of_measuring_again_to_the_bit(p):
    """The (n, n) distances kept for a group give each sparsity's columns, and its map, exactly."""
    x = features(300, 700)
    full = channel_distances(x, p)
    assert full.shape == (300, 300) and full.dtype == torch.float32
    for k in (210, 150, 90):
        keep = torch.randperm(300, generator=torch.Generator().manual_seed(k))[:k].sort().values
        assert torch.equal(full[:, keep], channel_distances(x, p, keep))
        assert torch.equal(transport_map(x, keep, p=p, distances=full), transport_map(x, keep, p=p))
