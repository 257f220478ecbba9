"""FLoRAL wrapper for ``nn.Linear``: adaptor c maps x to ``B_c A_c x + b_c``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import foreach
from .base import FloralLayer, per_sample, scale_channels
from .rank import RankSpec, init_factors_, resolve_rank


class FloralLinear(FloralLayer):
    """``nn.Linear`` plus C stacked adaptors ``A: [C, r, in]``, ``B: [C, out, r]``, ``bias: [C, out]``."""

    adapts = (nn.Linear,)

    def __init__(
        self,
        base: nn.Linear,
        num_adaptors: int,
        rank: RankSpec = 0.01,
        *,
        alpha: float = 1.0,
        bias: bool = True,
        init: str = "uniform_in",
        min_rank: int = 1,
        name: str = "linear",
    ) -> None:
        super().__init__(base, num_adaptors, alpha)
        d_in, d_out = base.in_features, base.out_features
        self.rank = resolve_rank(rank, d_in, d_out, min_rank=min_rank, name=name)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adaptor_A = nn.Parameter(torch.empty(num_adaptors, self.rank, d_in, **factory))
        self.adaptor_B = nn.Parameter(torch.empty(num_adaptors, d_out, self.rank, **factory))
        init_factors_(self.adaptor_A, self.adaptor_B, init, fan_in=d_in, fan_out=self.rank)
        # Decision (spec §1): adaptor biases start at zero so the model equals its base at step 0.
        has_bias = bias and base.bias is not None
        self.adaptor_bias = nn.Parameter(torch.zeros(num_adaptors, d_out, **factory)) if has_bias else None

    # stacked views: all C adaptors as one rank C*r pair
    def _stacked(self, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c, r, d_in = self.adaptor_A.shape
        a = self.adaptor_A.reshape(c * r, d_in)
        if r == 1:
            # B [C, out, 1] is B^T [out, C] transposed: a view, so no copy (nor its backward) at rank 1, where
            # the whole step of a small model is a few dozen such ops
            b = self.adaptor_B.reshape(c, -1)
            return a, (b if scale is None else b * scale.view(c, 1)).t()
        b = self.adaptor_B if scale is None else self.adaptor_B * scale.view(c, 1, 1)
        return a, b.permute(1, 0, 2).reshape(-1, c * r)  # a copy of B

    def delta_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``alpha * sum_c w_c B_c A_c`` and ``alpha * sum_c w_c b_c`` for a mixture ``w`` of shape [C]."""
        a, b = self._stacked(self.alpha * w)
        bias = None if self.adaptor_bias is None else self.alpha * (w @ self.adaptor_bias)
        return b @ a, bias

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forward_merged(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with ``W + B diag(alpha w) A`` (one ``addmm`` over the stacked factors) and
        ``b + sum_c alpha w_c b_c`` (one ``addmv``): the sums of ``delta_weight`` added to the base, fused.

        A small model's local step is a few dozen tensor ops, each a fixed cost of microseconds in forward and
        again as a node of the backward graph, so this path keeps its op count minimal. (``addmm`` over the
        stacked rank-``C*r`` pair rather than ``addbmm`` over C rank-r products: one matrix product with
        inner size ``C*r`` is faster than C with inner size ``r``.)
        """
        scale = w if self.alpha == 1.0 else self.alpha * w
        a, b = self._stacked(scale)
        weight = torch.addmm(self.base.weight, b, a)
        bias = self.base.bias
        if self.adaptor_bias is not None:
            bias = torch.addmv(bias, self.adaptor_bias.t(), scale)
        return F.linear(x, weight, bias)

    def forward_one_mixture(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Merged, or the adaptors beside the base when that is cheaper for this batch (both exact).

        Folding the adaptors into the weight costs ``C r in out`` multiply-adds (and again twice in backward)
        whatever the batch; running them beside the base costs ``N C r (in + out)`` for ``N`` rows. MNIST's
        784 x 200 layer at batch 32 composes five times more than it multiplies beside the base; the
        synthetic tasks' small layers are cheaper merged.
        """
        d_out, d_in = self.base.weight.shape
        rows = x.numel() // d_in
        if rows * (d_in + d_out) < d_in * d_out:
            return self.forward_low_rank(x, w)
        return self.forward_merged(x, w)

    def forward_low_rank(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One mixture ``w`` [C] for the batch, the adaptors as one rank ``C*r`` pair beside the base:
        ``x W^T + b + sum_c alpha w_c (B_c A_c x + b_c)``."""
        scale = w if self.alpha == 1.0 else self.alpha * w
        a, b = self._stacked()
        bias = self.base.bias
        if self.adaptor_bias is not None:
            bias = torch.addmv(bias, self.adaptor_bias.t(), scale)
        channels = scale if self.rank == 1 else scale.repeat_interleave(self.rank)  # channel c*r + j has w_c
        return F.linear(x, self.base.weight, bias) + F.linear(F.linear(x, a) * channels, b)

    def forward_factorised(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        a, b = self._stacked()
        h = F.linear(x, a) * per_sample(self.alpha * scale_channels(w, self.rank), x)
        out = self.base(x) + F.linear(h, b)
        if self.adaptor_bias is not None:
            out = out + per_sample(self.alpha * (w @ self.adaptor_bias), x)
        return out

    def forward_naive(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for c in range(self.num_adaptors):
            bias = None if self.adaptor_bias is None else self.adaptor_bias[c]
            delta = F.linear(F.linear(x, self.adaptor_A[c]), self.adaptor_B[c], bias)
            out = out + self.alpha * per_sample(w[:, c : c + 1], x) * delta
        return out

    @torch.no_grad()
    def precondition_gradients_(self, eps: float = 1e-5) -> None:
        """``grad A <- (B^T B + eps I)^-1 grad A`` and ``grad B <- grad B (A A^T + eps I)^-1`` per adaptor.

        At rank 1 the Grams are 1 x 1 and the inverse a division (:func:`precondition_rank1_`); above, one
        batched ``solve`` per factor.
        """
        if self.rank == 1:
            precondition_rank1_([self], eps)
            return
        a, b = self.adaptor_A, self.adaptor_B
        eye = eps * torch.eye(self.rank, device=a.device, dtype=a.dtype)
        if a.grad is not None:
            a.grad.copy_(torch.linalg.solve(b.transpose(1, 2) @ b + eye, a.grad))
        if b.grad is not None:
            # (A A^T + eps I) is symmetric, so right-multiplying by its inverse is a solve on the transpose
            b.grad.copy_(torch.linalg.solve(a @ a.transpose(1, 2) + eye, b.grad.transpose(1, 2)).transpose(1, 2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"


@torch.no_grad()
def precondition_rank1_(layers: list[FloralLinear], eps: float = 1e-5) -> None:
    """The preconditioning of ``FloralLinear.precondition_gradients_`` for rank-1 layers, all layers at once.

    At rank 1, ``B_c^T B_c + eps`` is the scalar ``||B_c||^2 + eps`` (and ``A_c A_c^T + eps`` is
    ``||A_c||^2 + eps``), so each adaptor's factor gradient is divided by the squared norm of its other
    factor plus eps. The squares and the divisions run as list ops (:mod:`floral_lightning.foreach`) over the
    factors of every layer: a handful of ops per step instead of two solves, two matmuls and an identity per layer.
    """
    grads, others = [], []
    for layer in layers:
        if layer.rank != 1:
            raise ValueError(f"precondition_rank1_ got a layer of rank {layer.rank}: only rank-1 layers")
        a, b = layer.adaptor_A, layer.adaptor_B
        if a.grad is not None:
            grads.append(a.grad)
            others.append(b)
        if b.grad is not None:
            grads.append(b.grad)
            others.append(a)
    if not grads:
        return
    norms = [t.sum((1, 2), keepdim=True) for t in foreach.mul(others, others)]  # [C, 1, 1] each
    foreach.add_(norms, eps)
    foreach.div_(grads, norms)
