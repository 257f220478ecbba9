"""Personalised evaluation: per-client means, their summaries, routing purity and the mixture heatmap."""

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
    """Sample-weighted mean (the paper's number), unweighted mean, worst client and per-cluster means."""
    seen = counts > 0
    if not seen.any():
        return {}
    m, n = means[seen], counts[seen]
    out = {
        "mean": float((m * n).sum() / n.sum()),
        "unweighted": float(m.mean()),
        "worst": float(m.min() if higher_is_better else m.max()),
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


# A few anchors of matplotlib's viridis, so the heatmap needs no plotting library.
_VIRIDIS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
)


def mixture_heatmap(mixtures: torch.Tensor, cell_width: int = 16, max_height: int = 512) -> torch.Tensor:
    """Render a clients x adaptors matrix in [0, 1] as a uint8 RGB image ``[3, H, W]`` (viridis colours).

    More clients than ``max_height`` are shown as ``max_height`` evenly spaced rows, so the image stays small.
    """
    if mixtures.shape[0] > max_height:
        mixtures = mixtures[torch.linspace(0, mixtures.shape[0] - 1, max_height).round().long()]
    k, c = mixtures.shape
    row_height = max(1, min(16, max_height // max(k, 1)))
    x = mixtures.detach().float().cpu().clamp(0, 1) * (len(_VIRIDIS) - 1)
    lo = x.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (x - lo).unsqueeze(-1)
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac  # [K, C, 3]
    rgb = rgb.repeat_interleave(row_height, 0).repeat_interleave(cell_width, 1)
    return rgb.permute(2, 0, 1).round().to(torch.uint8)
