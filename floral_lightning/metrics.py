"""Personalised evaluation: per-client means, their summaries and routing purity (the mixtures figure is in
``floral_lightning.figures``)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PerClientMean(Metric):
    """Running per-client sums of a per-sample score (correctness, loss, squared error, ...).

    ``update(values [B], client_ids [B])`` adds each sample to its client's row with one ``index_add_``; the
    states are summed across processes, so multi-device evaluation gives the same numbers.
    """

    full_state_update = False

    def __init__(self, num_clients: int) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_clients, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, client_ids: torch.Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        self.total.index_add_(0, client_ids, values)
        self.count.index_add_(0, client_ids, torch.ones_like(values))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-client means (NaN for clients without samples) and per-client sample counts."""
        return self.total / self.count, self.count


def summarize_clients(
    means: torch.Tensor,
    counts: torch.Tensor,
    *,
    higher_is_better: bool,
    clusters: torch.Tensor | None = None,
) -> dict[str, float]:
    """Sample-weighted mean (the paper's number), unweighted mean, worst client, the spread across clients
    (``std``: the population standard deviation of the per-client means) and per-cluster means."""
    seen = counts > 0
    if not seen.any():
        return {}
    m, n = means[seen], counts[seen]
    out = {
        "mean": float((m * n).sum() / n.sum()),
        "unweighted": float(m.mean()),
        "worst": float(m.min() if higher_is_better else m.max()),
        "std": float(m.std(unbiased=False)),
    }
    if clusters is not None:
        c = clusters.to(means.device)[seen]
        for cluster in torch.unique(c).tolist():
            mask = c == cluster
            out[f"cluster{cluster}"] = float((m[mask] * n[mask]).sum() / n[mask].sum())
    return out


def adjusted_rand_index(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """Adjusted Rand index of two clusterings of the same items (1 = identical up to relabelling)."""
    labels_true = torch.as_tensor(labels_true).long().flatten()
    labels_pred = torch.as_tensor(labels_pred).long().flatten()
    if labels_true.shape != labels_pred.shape:
        raise ValueError(f"label shapes differ: {tuple(labels_true.shape)} vs {tuple(labels_pred.shape)}")
    n = labels_true.numel()
    _, t = torch.unique(labels_true, return_inverse=True)
    _, p = torch.unique(labels_pred, return_inverse=True)
    table = torch.zeros(int(t.max()) + 1, int(p.max()) + 1, dtype=torch.float64)
    table.index_put_((t, p), torch.ones(n, dtype=torch.float64), accumulate=True)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        return (x * (x - 1) / 2).sum()

    index, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / (n * (n - 1) / 2) if n > 1 else torch.tensor(0.0)
    maximum = (rows + cols) / 2
    if maximum == expected:  # both clusterings trivial (one cluster, or all singletons)
        return 1.0
    return float((index - expected) / (maximum - expected))
