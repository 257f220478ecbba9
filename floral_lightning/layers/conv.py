"""FLoRAL wrappers for ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d`` (spec §1, "Conv kernel split").

Adaptor c is two convs, ``in -> r`` (factor ``A_c``, kernel ``k1``) then ``r -> out`` (factor ``B_c``, kernel
``k2``, plus a bias ``b_c``). Every spatial dim of the base kernel lives on exactly one of the two convs
together with that dim's stride, padding, dilation (and output padding); on the other conv the dim has
kernel 1, stride 1 and no padding. Each dim is therefore handled by one conv alone, and the pair composes
*exactly* to one conv with the base's geometry and kernel
``K[o, i, *k] = sum_q B[o, q, *k2] A[q, i, *k1]`` (the size-1 dims broadcast). Splits (``conv_split``):

- ``balanced_2d`` (default, 2-D only): width on the first conv (``1 x kw``), height on the second (``kh x 1``);
  other dimensionalities fall back to ``balanced``;
- ``in``: the full kernel on the first conv, ``1 x 1`` second;
- ``out``: ``1 x 1`` first, the full kernel on the second;
- ``balanced``: the full kernel on the side with fewer channels (``in`` if ``in_channels <= out_channels``).

Grouped convs (``groups = g``, depthwise included): both adaptor convs use ``g`` groups, so the rank ``r`` is
a multiple of ``g``. Stacked layouts mirror the base weight layouts:

- ``FloralConv`` (base weight ``[out, in/g, *k]``): ``adaptor_A: [C, r, in/g, *k1]``,
  ``adaptor_B: [C, out, r/g, *k2]``;
- ``FloralConvTranspose`` (base weight ``[in, out/g, *k]``): ``adaptor_A: [C, in, r/g, *k1]``,
  ``adaptor_B: [C, r, out/g, *k2]``;
- both: ``adaptor_bias: [C, out]`` (only if the base has a bias and ``bias=True``; zero-initialised).

All C adaptors run as one rank ``C*r`` pair whose middle channels are ordered (group, adaptor,
rank-within-group), the order :func:`~floral_lightning.layers.base.scale_channels` produces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import FloralLayer, gram_norm, scale_channels, with_trailing_dims
from .rank import RankSpec, init_factors_, resolve_rank

CONV_SPLITS = ("balanced_2d", "balanced", "in", "out")

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_SPATIAL = "xyz"  # einsum letters of the spatial dims


def kernel_sides(split: str, n_dims: int, in_channels: int, out_channels: int) -> tuple[int, ...]:
    """Which conv of the pair carries each spatial dim of the kernel: 0 = the first (``A``), 1 = the second."""
    if split not in CONV_SPLITS:
        raise ValueError(f"conv_split={split!r}: expected one of {CONV_SPLITS}")
    if split == "balanced_2d":
        if n_dims == 2:
            return (1, 0)  # height on the second conv, width on the first
        split = "balanced"
    if split == "balanced":
        split = "in" if in_channels <= out_channels else "out"
    return (0,) * n_dims if split == "in" else (1,) * n_dims


def _pad_argument(base: nn.Module) -> tuple[int, ...]:
    """``F.pad``'s argument for the base's padding (last dim first, each as (before, after)), as
    ``nn.Conv*d`` computes it for a padding mode other than 'zeros'; 'same' pads an even kernel more after."""
    if base.padding == "valid":
        return (0, 0) * len(base.kernel_size)
    if base.padding == "same":
        totals = [d * (k - 1) for d, k in zip(base.dilation, base.kernel_size)]
        return tuple(p for total in reversed(totals) for p in (total // 2, total - total // 2))
    return tuple(p for pad in reversed(base.padding) for p in (pad, pad))


def _on_side(values: tuple, sides: tuple[int, ...], side: int, default) -> tuple:
    return tuple(v if s == side else default for v, s in zip(values, sides))


class FloralConv(FloralLayer):
    """``nn.Conv{1,2,3}d`` plus C stacked two-conv adaptors (see the module docstring for layouts)."""

    adapts = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    #: whether the base (and so both adaptor convs) is a transposed conv
    transposed = False
    # The factorised path adds two thin convs at full resolution, which CPU conv kernels run far below their
    # peak, while merging a conv's small kernel is cheap: evaluating the CIFAR-10 CNN on client-sorted batches
    # cost 1.5x FedAvg factorised and 1.3x / 0.9x merged per run at 4 / 16 samples per client (bench/evaluation.py).
    merge_runs_from = 4.0

    def __init__(
        self,
        base: nn.Module,
        num_adaptors: int,
        rank: RankSpec = 0.01,
        *,
        split: str = "balanced_2d",
        alpha: float = 1.0,
        bias: bool = True,
        init: str = "uniform_in",
        min_rank: int = 1,
        name: str = "conv",
    ) -> None:
        if not isinstance(base, self.adapts):
            raise TypeError(
                f"{type(self).__name__} adapts {[t.__name__ for t in self.adapts]}, got {type(base).__name__}"
            )
        super().__init__(base, num_adaptors, alpha)
        n = len(base.kernel_size)
        g = base.groups
        self.n_dims = n
        self.split = split
        self.sides = kernel_sides(split, n, base.in_channels, base.out_channels)
        k = tuple(base.kernel_size)
        self.k1 = _on_side(k, self.sides, 0, 1)
        self.k2 = _on_side(k, self.sides, 1, 1)

        # rank (spec §1 Decision): d_in, d_out are channels per group x the kernel volume on that side
        d_in = base.in_channels // g * math.prod(self.k1)
        d_out = base.out_channels // g * math.prod(self.k2)
        if isinstance(rank, int) and not isinstance(rank, bool):
            if rank < 1 or rank % g:
                raise ValueError(
                    f"rank={rank} for {name}: a conv with groups={g} needs a rank that is a positive multiple "
                    f"of {g} (each group gets rank/groups adaptor channels)"
                )
            per_group = resolve_rank(rank // g, d_in, d_out, min_rank=min_rank, name=f"{name} (per group)")
        else:
            per_group = resolve_rank(rank, d_in, d_out, min_rank=min_rank, name=name)
        self.rank = per_group * g

        # geometry of the two adaptor convs
        stride, dilation = tuple(base.stride), tuple(base.dilation)
        self.stride1 = _on_side(stride, self.sides, 0, 1)
        self.stride2 = _on_side(stride, self.sides, 1, 1)
        self.dilation1 = _on_side(dilation, self.sides, 0, 1)
        self.dilation2 = _on_side(dilation, self.sides, 1, 1)
        op = tuple(getattr(base, "output_padding", (0,) * n))
        self.output_padding1 = _on_side(op, self.sides, 0, 0)
        self.output_padding2 = _on_side(op, self.sides, 1, 0)
        #: F.pad argument applied to the input of the adaptor pair (non-'zeros' padding modes), else None
        self._pre_pad: tuple[int, ...] | None = None
        padding = base.padding
        if base.padding_mode != "zeros":
            self._pre_pad = _pad_argument(base)
            padding = (0,) * n
        elif padding == "valid":
            padding = (0,) * n
        if isinstance(padding, str):  # 'same' (stride 1, enforced by torch): each conv pads its own dims
            self.padding1 = self.padding2 = padding
        else:
            self.padding1 = _on_side(tuple(padding), self.sides, 0, 0)
            self.padding2 = _on_side(tuple(padding), self.sides, 1, 0)

        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        c_in, c_out, r = base.in_channels, base.out_channels, self.rank
        if self.transposed:
            shape_a, shape_b = (c_in, r // g, *self.k1), (r, c_out // g, *self.k2)
        else:
            shape_a, shape_b = (r, c_in // g, *self.k1), (c_out, r // g, *self.k2)
        self.adaptor_A = nn.Parameter(torch.empty(num_adaptors, *shape_a, **factory))
        self.adaptor_B = nn.Parameter(torch.empty(num_adaptors, *shape_b, **factory))
        init_factors_(self.adaptor_A, self.adaptor_B, init, fan_in=d_in, fan_out=per_group * math.prod(self.k2))
        # Decision (spec §1): adaptor biases start at zero so the model equals its base at step 0.
        has_bias = bias and base.bias is not None
        self.adaptor_bias = nn.Parameter(torch.zeros(num_adaptors, c_out, **factory)) if has_bias else None

    # --- the adaptor convs -------------------------------------------------------------------------------
    def _first(self, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        if self.transposed:
            fn = _CONV_TRANSPOSE_FNS[self.n_dims]
            return fn(x, weight, None, self.stride1, self.padding1, self.output_padding1, groups, self.dilation1)
        return _CONV_FNS[self.n_dims](x, weight, None, self.stride1, self.padding1, self.dilation1, groups)

    def _second(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        if self.transposed:
            fn = _CONV_TRANSPOSE_FNS[self.n_dims]
            return fn(h, weight, bias, self.stride2, self.padding2, self.output_padding2, groups, self.dilation2)
        return _CONV_FNS[self.n_dims](h, weight, bias, self.stride2, self.padding2, self.dilation2, groups)

    def _adaptor_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the adaptor pair: padded once with the base's mode when that mode is not 'zeros'."""
        if self._pre_pad is None:
            return x
        return F.pad(x, self._pre_pad, mode=self.base.padding_mode)

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base op with another weight and bias (every padding mode: a non-'zeros' one pads first)."""
        base = self.base
        padding = base.padding if self._pre_pad is None else 0
        fn = _CONV_FNS[self.n_dims]
        return fn(self._adaptor_input(x), weight, bias, base.stride, padding, base.dilation, base.groups)

    # --- stacked views: all C adaptors as one rank C*r pair, channels ordered (group, adaptor, rank) --------
    def _stack_grouped(self, t: torch.Tensor) -> torch.Tensor:
        """[C, M, ...] with M split into groups -> [C*M, ...] ordered (group, adaptor, within-group)."""
        g = self.base.groups
        c, m = t.shape[:2]
        rest = t.shape[2:]
        return t.reshape(c, g, m // g, *rest).transpose(0, 1).reshape(c * m, *rest)

    @staticmethod
    def _stack_within(t: torch.Tensor) -> torch.Tensor:
        """[C, M, m, ...] (m channels within a group) -> [M, C*m, ...] ordered (adaptor, within-group)."""
        c, big_m, m = t.shape[:3]
        rest = t.shape[3:]
        return t.transpose(0, 1).reshape(big_m, c * m, *rest)

    def _stacked(self, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked weights of the first and second conv; ``scale`` [C] multiplies adaptor c's ``B``."""
        a = self.adaptor_A
        b = self.adaptor_B if scale is None else self.adaptor_B * with_trailing_dims(scale, self.adaptor_B.dim() - 1)
        if self.transposed:
            return self._stack_within(a), self._stack_grouped(b)
        return self._stack_grouped(a), self._stack_within(b)

    # --- composition ---------------------------------------------------------------------------------------
    def delta_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``alpha * sum_c w_c * compose(B_c, A_c)`` (base weight layout) and ``alpha * sum_c w_c b_c``."""
        g = self.base.groups
        c, q = self.num_adaptors, self.rank // g
        c_in, c_out = self.base.in_channels, self.base.out_channels
        k = tuple(self.base.kernel_size)
        ka = [k[d] for d in range(self.n_dims) if self.sides[d] == 0]
        kb = [k[d] for d in range(self.n_dims) if self.sides[d] == 1]
        la = "".join(_SPATIAL[d] for d in range(self.n_dims) if self.sides[d] == 0)
        lb = "".join(_SPATIAL[d] for d in range(self.n_dims) if self.sides[d] == 1)
        out_letters = _SPATIAL[: self.n_dims]
        b = self.adaptor_B * with_trailing_dims(self.alpha * w, self.adaptor_B.dim() - 1)
        if self.transposed:  # K[i, o] = sum_q A[i, q] B[q, o] per group, layout [in, out/g, *k]
            a = self.adaptor_A.reshape(c, g, c_in // g, q, *ka)
            b = b.reshape(c, g, q, c_out // g, *kb)
            dw = torch.einsum(f"cgiq{la},cgqo{lb}->gio{out_letters}", a, b)
            dw = dw.reshape(c_in, c_out // g, *k)
        else:  # K[o, i] = sum_q B[o, q] A[q, i] per group, layout [out, in/g, *k]
            a = self.adaptor_A.reshape(c, g, q, c_in // g, *ka)
            b = b.reshape(c, g, c_out // g, q, *kb)
            dw = torch.einsum(f"cgoq{lb},cgqi{la}->goi{out_letters}", b, a)
            dw = dw.reshape(c_out, c_in // g, *k)
        db = None if self.adaptor_bias is None else self.alpha * (w @ self.adaptor_bias)
        return dw, db

    # --- the three paths ------------------------------------------------------------------------------------
    def forward_factorised(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g = self.base.groups
        a, b = self._stacked()
        h = self._first(self._adaptor_input(x), a, g)
        h = h * with_trailing_dims(self.alpha * scale_channels(w, self.rank, g), self.n_dims)
        out = self.base(x) + self._second(h, b, None, g)
        if self.adaptor_bias is not None:
            out = out + with_trailing_dims(self.alpha * (w @ self.adaptor_bias), self.n_dims)
        return out

    def forward_naive(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g = self.base.groups
        xa = self._adaptor_input(x)
        out = self.base(x)
        for c in range(self.num_adaptors):
            bias = None if self.adaptor_bias is None else self.adaptor_bias[c]
            delta = self._second(self._first(xa, self.adaptor_A[c], g), self.adaptor_B[c], bias, g)
            out = out + self.alpha * with_trailing_dims(w[:, c : c + 1], self.n_dims) * delta
        return out

    @torch.no_grad()
    def precondition_gradients_(self, eps: float = 1e-5) -> None:
        """Divide adaptor c's grad of each factor by ``||G_c||_F + eps``, G_c the Gram of its other factor.

        Each factor is flattened per group to a matrix (its channel dim by everything else) whose Gram is taken;
        for a grouped conv the Gram is block-diagonal over the groups (see :func:`gram_norm`).
        """
        a, b, g = self.adaptor_A, self.adaptor_B, self.base.groups
        if a.grad is not None:
            a.grad.div_(with_trailing_dims(gram_norm(b, g) + eps, a.dim() - 1))
        if b.grad is not None:
            b.grad.div_(with_trailing_dims(gram_norm(a, g) + eps, b.dim() - 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, split={self.split!r}"


class FloralConvTranspose(FloralConv):
    """``nn.ConvTranspose{1,2,3}d`` plus C stacked two-transposed-conv adaptors (``forward(x)`` only).

    Layouts mirror the base's ``[in, out/g, *k]``: ``adaptor_A: [C, in, r/g, *k1]``,
    ``adaptor_B: [C, r, out/g, *k2]``. Each dim's output padding goes with its stride.
    """

    adapts = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    transposed = True

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        base = self.base
        fn = _CONV_TRANSPOSE_FNS[self.n_dims]
        return fn(x, weight, bias, base.stride, base.padding, base.output_padding, base.groups, base.dilation)
