"""Rank rules and initialisation of the low-rank factors (spec §1)."""

from __future__ import annotations

import math
import warnings

import torch

RankSpec = int | float | str
RANK_RULES = ("sqrt", "log", "full")
INIT_STRATEGIES = ("uniform_in", "normal_in", "uniform_out", "normal_out")


def resolve_rank(rank: RankSpec, d_in: int, d_out: int, *, min_rank: int = 1, name: str = "layer") -> int:
    """Turn a rank rule into an integer rank for a layer of shape ``d_in -> d_out``.

    ``int`` is taken as is, a float ``rho`` in (0, 1) is that fraction of the layer's parameter budget
    (``r * (d_in + d_out) = rho * d_in * d_out``), and ``"sqrt"``, ``"log"``, ``"full"`` are
    ``sqrt(max rank)``, ``log2(1 + max rank)`` and the max rank ``min(d_in, d_out)``. Ranks above the max
    are clipped with a warning.
    """
    max_rank = min(d_in, d_out)
    if isinstance(rank, bool):
        raise TypeError(f"rank={rank!r} for {name}: expected an int, a float in (0, 1) or one of {RANK_RULES}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank={rank} for {name}: an integer rank must be >= 1")
        r = rank
    elif isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise ValueError(f"rank={rank} for {name}: a fractional rank must lie in (0, 1)")
        r = max(min_rank, math.floor(rank * d_in * d_out / (d_in + d_out)))
    elif rank == "sqrt":
        r = max(min_rank, math.floor(math.sqrt(max_rank)))
    elif rank == "log":
        r = max(min_rank, math.floor(math.log2(1 + max_rank)))
    elif rank == "full":
        r = max_rank
    else:
        raise ValueError(f"rank={rank!r} for {name}: expected an int >= 1, a float in (0, 1) or one of {RANK_RULES}")
    if r > max_rank:
        warnings.warn(f"rank {r} for {name} exceeds its max rank {max_rank}; clipped to {max_rank}", stacklevel=3)
        r = max_rank
    return r


def init_factors_(a: torch.Tensor, b: torch.Tensor, init: str, fan_in: int, fan_out: int) -> None:
    """Initialise a factor pair in place so that the product ``b @ a`` starts at zero.

    ``*_in`` strategies draw the input-side factor ``a`` (He-uniform ``U(+-sqrt(6/fan_in))`` or
    ``N(0, 2/fan_in)``) and zero ``b``; ``*_out`` strategies draw ``b`` from the output side and zero ``a``.
    """
    with torch.no_grad():
        if init == "uniform_in":
            bound = math.sqrt(6.0 / fan_in)
            a.uniform_(-bound, bound)
            b.zero_()
        elif init == "normal_in":
            a.normal_(0.0, math.sqrt(2.0 / fan_in))
            b.zero_()
        elif init == "uniform_out":
            bound = math.sqrt(6.0 / fan_out)
            b.uniform_(-bound, bound)
            a.zero_()
        elif init == "normal_out":
            b.normal_(0.0, math.sqrt(2.0 / fan_out))
            a.zero_()
        else:
            raise ValueError(f"init={init!r}: expected one of {INIT_STRATEGIES}")
