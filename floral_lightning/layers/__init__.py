"""FLoRAL wrapper layers: one class per base layer type, each holding ``base`` and C stacked adaptors."""

from __future__ import annotations

from torch import nn

from .base import FloralLayer
from .conv import CONV_SPLITS, FloralConv, FloralConvTranspose
from .embedding import FloralEmbedding
from .linear import FloralLinear
from .norm import NORM_TYPES, FloralNorm
from .rank import INIT_STRATEGIES, RANK_RULES, resolve_rank

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def adaptor_kind(module: nn.Module) -> str | None:
    """Which type switch governs ``module``: ``linear``, ``conv``, ``norm``, ``embedding``, or ``None``."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CONV_TYPES + CONV_TRANSPOSE_TYPES):
        return "conv"
    if isinstance(module, NORM_TYPES):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def build_wrapper(
    module: nn.Module,
    num_adaptors: int,
    *,
    name: str,
    rank: int | float | str,
    conv_split: str,
    init: str,
    alpha: float,
    bias: bool,
    min_rank: int,
) -> FloralLayer:
    """The FLoRAL wrapper of the right class for ``module``."""
    kind = adaptor_kind(module)
    factor = dict(rank=rank, alpha=alpha, min_rank=min_rank, name=name)
    if kind == "linear":
        return FloralLinear(module, num_adaptors, init=init, bias=bias, **factor)
    if isinstance(module, CONV_TRANSPOSE_TYPES):
        return FloralConvTranspose(module, num_adaptors, split=conv_split, init=init, bias=bias, **factor)
    if kind == "conv":
        return FloralConv(module, num_adaptors, split=conv_split, init=init, bias=bias, **factor)
    if kind == "embedding":
        return FloralEmbedding(module, num_adaptors, **factor)
    if kind == "norm":
        return FloralNorm(module, num_adaptors, alpha=alpha)
    raise TypeError(
        f"{name!r} is a {type(module).__name__}, which FLoRAL cannot adapt: adaptable types are Linear, "
        "Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, BatchNorm, LayerNorm, GroupNorm and InstanceNorm"
    )


__all__ = [
    "CONV_SPLITS",
    "INIT_STRATEGIES",
    "RANK_RULES",
    "FloralConv",
    "FloralConvTranspose",
    "FloralEmbedding",
    "FloralLayer",
    "FloralLinear",
    "FloralNorm",
    "adaptor_kind",
    "build_wrapper",
    "resolve_rank",
]
