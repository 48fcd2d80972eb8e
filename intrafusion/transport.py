"""The optimal-transport map between all channels of a group and the channels that remain.

Pure functions over tensors. Shapes: n channels in the group, k remaining, d feature size.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import IntraFusionError

TARGETS = ("most_important", "cluster_centroid")
MARGINALS = ("uniform", "importance")


def normalize_rows(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalize each row of (n, d); all-zero rows stay zero instead of becoming NaN."""
    return features / features.norm(dim=1, keepdim=True).clamp_min(eps)


def cluster_centroids(features: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Means (k, d) and weights (k,) of a k-component spherical Gaussian mixture over (n, d).

    With fewer distinct points than k, the distinct points are the first centroids and the
    remaining ones repeat the most frequent point, so the mixture never sees a degenerate fit."""
    from sklearn.mixture import GaussianMixture

    x = features.detach().double().cpu().numpy()
    distinct, counts = np.unique(x, axis=0, return_counts=True)
    if len(distinct) <= k:
        order = np.argsort(-counts, kind="stable")
        means = np.concatenate([distinct[order], np.repeat(distinct[order[:1]], k - len(distinct), 0)])
        weights = np.concatenate([counts[order], np.zeros(k - len(distinct))]).astype(float)
        weights = weights / weights.sum()
    else:
        gmm = GaussianMixture(n_components=k, covariance_type="spherical", random_state=seed,
                              reg_covar=1e-6).fit(x)
        means, weights = gmm.means_, gmm.weights_
    return (torch.as_tensor(means, dtype=features.dtype, device=features.device),
            torch.as_tensor(weights, dtype=features.dtype, device=features.device))


def _marginal(kind: str, scores: torch.Tensor | None, size: int) -> np.ndarray:
    if kind not in MARGINALS:
        raise IntraFusionError(f"unknown marginal {kind!r}; choose one of {', '.join(MARGINALS)}")
    if kind == "importance" and scores is not None:
        w = scores.detach().double().cpu().numpy().clip(min=0)
        if np.isfinite(w).all() and w.sum() > 0:
            return w / w.sum()
    return np.full(size, 1.0 / size)


def channel_distances(features: torch.Tensor, p: float = 1.0, columns: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """(n, n) p-norm distances between the L2-normalized rows of features (n, d), float32; only
    the columns (k,) of `columns` if given, (n, k). A column does not depend on the others (each
    entry is computed from its two rows alone), so `[:, keep]` of the full matrix is, to the bit,
    the matrix of `columns=keep`."""
    x = normalize_rows(features.detach().double()).float()
    return torch.cdist(x, x if columns is None else x[columns], p=p)


def transport_map(features: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor | None = None,
                  target: str = "most_important", source_prob: str = "uniform",
                  target_prob: str = "uniform", p: float = 1.0, seed: int = 0,
                  distances: torch.Tensor | None = None) -> torch.Tensor:
    """The map T (k, n) that fuses n channels into k.

    features: (n, d) group feature vectors of every channel, keep: (k,) indices of kept channels,
    scores: (n,) importance; distances: channel_distances(features, p) when the caller keeps
    them (fusing one group at several sparsities), used for the most_important target. The
    exact OT plan between the source marginal over all channels and the target marginal over
    the targets (the kept channels, or mixture centroids) under the p-norm cost is transposed
    and each source column divided by its sum, so every channel's mass is split among the
    targets with weights summing to one. Row j is the target written at kept position keep[j]:
    for mixture centroids, the rows are ordered by the assignment that gives each kept channel
    the centroid receiving most of its mass, so that downstream bookkeeping (which original
    channel a fused channel stands for, e.g. for repair) stays meaningful."""
    if target not in TARGETS:
        raise IntraFusionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    n, k = features.shape[0], len(keep)
    if target == "most_important":
        cost = distances[:, keep] if distances is not None else channel_distances(features, p, keep)
        target_scores = scores[keep] if scores is not None else None
    else:
        x = normalize_rows(features.detach().double())
        centroids, target_scores = cluster_centroids(x, k, seed)
        cost = torch.cdist(x.float(), centroids.float(), p=p)
    a = _marginal(source_prob, scores, n)
    b = _marginal(target_prob, target_scores, k)
    import ot  # imported here: it loads scikit-learn, seconds that runs without fusion don't need

    plan = ot.emd(a, b, cost.double().cpu().numpy())
    plan = torch.as_tensor(plan, dtype=torch.float64).T  # (k, n)
    plan = plan / plan.sum(dim=0, keepdim=True).clamp_min(1e-300)
    if target == "cluster_centroid":
        from scipy.optimize import linear_sum_assignment
        _, centroid_of = linear_sum_assignment(plan[:, keep].T.numpy(), maximize=True)
        plan = plan[torch.as_tensor(centroid_of)]
    return plan.to(dtype=features.dtype, device=features.device)
