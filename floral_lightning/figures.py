"""The mixtures figure: which adaptor each client (and each true cluster) uses, drawn to answer "did routing work?".

Two panels share one colour scale (the mixture weight p(c | k), 0 to 1):

- left, **per cluster**: the mean mixture of each group of clients, the weights written in the cells, so the
  adaptor a cluster uses can be read off without a colour bar;
- right, **clients**: one row per client, grouped (and separated by white lines) by true cluster when it is
  known, else by the client's argmax adaptor; within a group sorted by argmax adaptor, so a misrouted client
  stands out as a row whose bright cell sits in another column. Above ``max_clients`` clients an evenly spaced
  sample of each group is drawn instead (the panel says so).

Mixtures that are NaN (a diverged router) are drawn in red and counted in the title rather than crashing.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

NAN_COLOUR = "red"


def group_clients(mixtures: torch.Tensor, clusters: torch.Tensor | None) -> tuple[np.ndarray, str]:
    """Each client's group: its true cluster if known, else its argmax adaptor (-1 for NaN mixtures)."""
    if clusters is not None:
        return clusters.detach().cpu().long().numpy(), "true cluster"
    m = mixtures.detach().cpu().float().numpy()
    nan_rows = np.isnan(m).any(axis=1)
    argmax = np.where(nan_rows, -1, np.nan_to_num(m, nan=-np.inf).argmax(axis=1))
    return argmax, "argmax adaptor"


def mixtures_figure(
    mixtures: torch.Tensor,
    clusters: torch.Tensor | None = None,
    *,
    title: str = "mixtures",
    max_clients: int = 400,
    figsize: tuple[float, float] = (9.0, 6.0),
    dpi: int = 100,
) -> Figure:
    """Draw all clients' mixtures ``[K, C]`` (rows sum to 1) grouped by cluster; see the module docstring.

    Args:
        mixtures: the clients' mixtures, one row per client (NaN rows allowed).
        clusters: each client's true cluster ``[K]``, or ``None`` to group by argmax adaptor.
        title: the figure's title (the caller puts the round and the routing ARI in it).
        max_clients: above this many clients the right panel shows an evenly spaced sample of each group.
        figsize, dpi: the figure's size in inches and its resolution (the PNG is figsize * dpi pixels).
    """
    m = mixtures.detach().cpu().float().numpy()
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"mixtures must be a non-empty [clients, adaptors] matrix, got shape {tuple(m.shape)}")
    if clusters is not None and len(clusters) != m.shape[0]:
        raise ValueError(f"clusters has {len(clusters)} entries but mixtures has {m.shape[0]} clients")
    num_clients, num_adaptors = m.shape
    groups, grouped_by = group_clients(mixtures, clusters)
    nan_rows = np.isnan(m).any(axis=1)
    argmax = np.where(nan_rows, num_adaptors, np.nan_to_num(m, nan=-np.inf).argmax(axis=1))
    group_ids = np.unique(groups)

    # Right panel rows: group by group, within a group by argmax adaptor then client id; sampled if too many.
    per_group = max(1, max_clients // len(group_ids))
    sampled = num_clients > max_clients
    rows, boundaries, centres, labels = [], [], [], []
    for g in group_ids:
        members = np.flatnonzero(groups == g)
        members = members[np.lexsort((members, argmax[members]))]
        if sampled and len(members) > per_group:
            members = members[np.linspace(0, len(members) - 1, per_group).round().astype(int)]
        centres.append(len(rows) + (len(members) - 1) / 2)
        rows.extend(members.tolist())
        boundaries.append(len(rows) - 0.5)
        name = "NaN" if g == -1 else f"{g}"
        labels.append(f"{name}\n({int((groups == g).sum())})")

    cmap = colormaps["viridis"].with_extremes(bad=NAN_COLOUR)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot state, safe inside any process
    summary_ax, clients_ax = fig.subplots(1, 2, width_ratios=[1, 1.3])

    # Left: mean mixture per group, with the weights written in (NaN rows excluded from the means).
    valid = ~nan_rows
    means = np.stack(
        [m[(groups == g) & valid].mean(0) if ((groups == g) & valid).any() else np.full(num_adaptors, np.nan)
         for g in group_ids]
    )  # fmt: skip
    image = summary_ax.imshow(np.ma.masked_invalid(means), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for (i, c), value in np.ndenumerate(means):
        if not np.isnan(value):
            summary_ax.text(c, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                            color="black" if value > 0.5 else "white")  # fmt: skip
    summary_ax.set_title("mean mixture per group")
    summary_ax.set_yticks(range(len(group_ids)), labels)
    summary_ax.set_ylabel(f"{grouped_by} (clients)")

    clients_ax.imshow(np.ma.masked_invalid(m[rows]), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")  # fmt: skip
    for boundary in boundaries[:-1]:
        clients_ax.axhline(boundary, color="white", linewidth=2)
    clients_ax.set_yticks(centres, [label.split("\n")[0] for label in labels])
    clients_ax.set_title(f"a sample: {len(rows)} of {num_clients} clients" if sampled else f"all {num_clients} clients")
    clients_ax.set_ylabel(f"client, grouped by {grouped_by}")

    for ax in (summary_ax, clients_ax):
        ax.set_xticks(range(num_adaptors))
        ax.set_xlabel("adaptor")
    fig.colorbar(image, ax=[summary_ax, clients_ax], label="mixture weight p(adaptor | client)", shrink=0.9)
    if nan_rows.any():
        title += f"  —  {int(nan_rows.sum())} client(s) with NaN mixtures (red)"
    fig.suptitle(title)
    return fig


def render_figure(fig: Figure) -> tuple[np.ndarray, bytes]:
    """Draw the figure once: its pixels (``uint8 [H, W, 3]``, for TensorBoard) and the same pixels as PNG."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="png")
    return rgb, buffer.getvalue()
