"""In-place ops over lists of tensors, each one call for the whole list: the one place that uses ``torch._foreach_*``.

Why lists: the round loop copies, sums and scales every federated tensor of the model once per client (each
layer's base weight, bias and adaptor factors), and the preconditioner divides every factor's gradient once per
step. A Python loop of per-tensor ops pays one dispatcher call (and on a GPU one kernel launch) per tensor, which
dominates the round for the small models of the paper's tasks; the ``_foreach`` ops group a list by device and
dtype into a few kernels. They are underscored but are what ``torch.optim`` itself runs on; keeping every call
here means a change of theirs is fixed in one file.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def copy_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i."""
    torch._foreach_copy_(list(dst), list(src))


def add_(dst: Sequence[torch.Tensor], other: Sequence[torch.Tensor] | float, alpha: float = 1.0) -> None:
    """``dst[i] += alpha * other[i]`` for every i (``other`` a list of tensors), or ``dst[i] += other`` (a number)."""
    if isinstance(other, (int, float)):
        torch._foreach_add_(list(dst), other)
    else:
        torch._foreach_add_(list(dst), list(other), alpha=alpha)


def addcmul_(dst: Sequence[torch.Tensor], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> None:
    """``dst[i] += a[i] * b[i]`` for every i."""
    torch._foreach_addcmul_(list(dst), list(a), list(b))


def mul(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[a[i] * b[i]]``, new tensors."""
    return list(torch._foreach_mul(list(a), list(b)))


def div_(dst: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> None:
    """``dst[i] /= other[i]`` for every i."""
    torch._foreach_div_(list(dst), list(other))


def norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> list[torch.Tensor]:
    """``[vector_norm(tensors[i], ord)]``, one 0-dim tensor each."""
    return list(torch._foreach_norm(list(tensors), ord))
