"""Evaluation metrics on similarity and score matrices: pure torch, no model, no files.

Retrieval metrics take ``similarity[Q, T]`` (query rows, target columns), the class label of
every query and target (``-1`` for a distractor, which is never relevant), and an optional
``excluded[Q, T]`` mask of targets a query may not retrieve (itself).
"""

from __future__ import annotations

import torch

DISTRACTOR = -1


def top_k_accuracy(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """``Tensor[N]`` bool: whether the true class is among the ``k`` best-scored classes.

    With fewer than ``k`` classes every class is in the top ``k``.
    """
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def self_excluded(num_queries: int, num_targets: int, offset: int = 0) -> torch.Tensor:
    """``excluded[Q, T]`` for queries that are targets ``offset .. offset + Q - 1`` themselves."""
    excluded = torch.zeros(num_queries, num_targets, dtype=torch.bool)
    rows = torch.arange(num_queries)
    excluded[rows, rows + offset] = True
    return excluded


def top_k(similarity: torch.Tensor, k: int, excluded: torch.Tensor | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores[Q, k], indices[Q, k])`` of each query's ``k`` most similar allowed targets."""
    available = similarity.shape[1] - (int(excluded.sum(dim=1).max()) if excluded is not None
                                       and excluded.numel() else 0)
    if k > available:
        raise ValueError(f"k={k} is more than the {available} images a query can retrieve")
    return _masked(similarity, excluded).topk(k, dim=1)


def precision_at_k(similarity: torch.Tensor, query_labels: torch.Tensor, target_labels: torch.Tensor,
                   k: int, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """``Tensor[Q]``: the fraction of each query's top ``k`` that shares its class."""
    indices = top_k(similarity, k, excluded)[1]
    return (target_labels[indices] == query_labels[:, None]).float().mean(dim=1)


def average_precision(similarity: torch.Tensor, query_labels: torch.Tensor,
                      target_labels: torch.Tensor, excluded: torch.Tensor | None = None,
                      ) -> torch.Tensor:
    """``Tensor[Q]`` float64: average precision of each query's full ranking.

    The mean, over the relevant targets, of the precision at the rank where each is found;
    ``nan`` for a query with no relevant target (its class has no other image).
    """
    order = _masked(similarity, excluded).argsort(dim=1, descending=True, stable=True)
    relevant = target_labels[order] == query_labels[:, None]
    if excluded is not None:
        relevant &= ~excluded.gather(1, order)
    hits = relevant.cumsum(dim=1).double()
    ranks = torch.arange(1, similarity.shape[1] + 1, dtype=torch.float64)
    total = relevant.sum(dim=1).double()
    ap = ((hits / ranks) * relevant).sum(dim=1) / total
    return torch.where(total > 0, ap, torch.full_like(ap, float("nan")))


def mean_top_k_similarity(similarity: torch.Tensor, k: int,
                          excluded: torch.Tensor | None = None) -> torch.Tensor:
    """``Tensor[Q]``: the mean similarity of each query's ``k`` best matches."""
    return top_k(similarity, k, excluded)[0].float().mean(dim=1)


def distractors_in_top_k(similarity: torch.Tensor, target_labels: torch.Tensor, k: int,
                         excluded: torch.Tensor | None = None) -> torch.Tensor:
    """``Tensor[Q]`` int: how many distractors (label ``-1``) entered each query's top ``k``."""
    indices = top_k(similarity, k, excluded)[1]
    return (target_labels[indices] == DISTRACTOR).sum(dim=1)


def per_class_mean(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Tensor[C]`` float64: the mean of ``values`` over each class, ``nan`` values left out.

    A class with no (non-``nan``) value gets ``nan``.
    """
    values = values.double()
    valid = ~values.isnan()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels[valid], values[valid])
    counts = torch.zeros(num_classes, dtype=torch.float64).index_add_(
        0, labels[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))


def per_class_sum(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Tensor[C]``: the sum of ``values`` over each class."""
    return torch.zeros(num_classes, dtype=values.dtype).index_add_(0, labels, values)


def _masked(similarity: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
    similarity = similarity.float()
    return similarity if excluded is None else similarity.masked_fill(excluded, float("-inf"))
