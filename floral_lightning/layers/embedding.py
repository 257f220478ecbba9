"""FLoRAL wrapper for ``nn.Embedding``: adaptor c maps index i to ``B_c A_c[i]``.

Adaptor c is an r-dim embedding table ``A_c: [num_embeddings, r]`` (initialised N(0, 1)) followed by a linear
map ``B_c: r -> embedding_dim`` without bias (initialised 0, so the wrapper equals its base at init). The
effective table of a mixture ``w`` is ``E + alpha * sum_c w_c A_c B_c^T``.

Semantics of the base's options (all three paths agree on them):

- ``padding_idx``: padding positions output exactly the base's padding vector. The adaptors contribute nothing
  there and get no gradient from them (their contribution is masked; ``A_c``'s padding row also starts at 0).
- ``max_norm``: constrains the *base* table only, as in ``nn.Embedding``: the looked-up rows of ``E`` are
  renormalised in place, then the adaptor delta is added unconstrained. ``merged_module`` renormalises every
  row of its copy of ``E`` up front and drops ``max_norm`` (renormalisation is idempotent, so it is exact).
- ``scale_grad_by_freq``: applies to ``E`` and to the adaptor tables ``A_c`` (not to ``B_c``).
- ``sparse``: applies to ``E`` only; the stacked adaptor tables get dense gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import FloralLayer, gram_norm, per_sample, scale_channels, with_trailing_dims
from .rank import RankSpec, resolve_rank


class FloralEmbedding(FloralLayer):
    """``nn.Embedding`` plus C stacked adaptors ``A: [C, num_embeddings, r]``, ``B: [C, embedding_dim, r]``."""

    adapts = (nn.Embedding,)

    def __init__(
        self,
        base: nn.Embedding,
        num_adaptors: int,
        rank: RankSpec = 0.01,
        *,
        alpha: float = 1.0,
        min_rank: int = 1,
        name: str = "embedding",
    ) -> None:
        super().__init__(base, num_adaptors, alpha)
        n, d = base.num_embeddings, base.embedding_dim
        self.rank = resolve_rank(rank, n, d, min_rank=min_rank, name=name)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.adaptor_A = nn.Parameter(torch.randn(num_adaptors, n, self.rank, **factory))
        self.adaptor_B = nn.Parameter(torch.zeros(num_adaptors, d, self.rank, **factory))
        if base.padding_idx is not None:
            with torch.no_grad():
                self.adaptor_A[:, base.padding_idx].zero_()

    # --- pieces shared by the paths ------------------------------------------------------------------
    def _b_cat(self) -> torch.Tensor:
        """All C ``B_c`` side by side: [embedding_dim, C*r], channels in (adaptor, rank) order."""
        c, d, r = self.adaptor_B.shape
        return self.adaptor_B.permute(1, 0, 2).reshape(d, c * r)

    def _keep(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``h`` ([*x.shape, F]) with the padding positions zeroed."""
        pad = self.base.padding_idx
        return h if pad is None else h * (x != pad).unsqueeze(-1).to(h.dtype)

    def _lookup(self, x: torch.Tensor) -> torch.Tensor:
        """Every adaptor's row of ``x``: [*x.shape, C*r] in (adaptor, rank) order, padding positions zeroed.

        One gather in a flat view of the stacked tables (index ``c * num_embeddings + i``), so nothing of the
        size of the tables is copied.
        """
        c, n, r = self.adaptor_A.shape
        offsets = torch.arange(c, device=x.device) * n
        idx = x.unsqueeze(-1) + offsets
        h = F.embedding(idx, self.adaptor_A.view(c * n, r), scale_grad_by_freq=self.base.scale_grad_by_freq)
        return self._keep(x, h.flatten(-2))

    def delta_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``alpha * sum_c w_c A_c B_c^T`` ([num_embeddings, embedding_dim]) for ``w: [C]``, padding row zeroed."""
        c, n, r = self.adaptor_A.shape
        a = self.adaptor_A.permute(1, 0, 2).reshape(n, c * r) * (self.alpha * w).repeat_interleave(r)
        delta = a @ self._b_cat().T
        pad = self.base.padding_idx
        if pad is not None:
            keep = torch.ones(n, 1, device=delta.device, dtype=delta.dtype)
            keep[pad] = 0
            delta = delta * keep
        return delta

    def _renorm_(self, x: torch.Tensor) -> None:
        """The base's ``max_norm`` renormalisation of the rows ``x`` of ``E``, in place (as ``F.embedding``)."""
        if self.base.max_norm is not None:
            with torch.no_grad():
                torch.embedding_renorm_(self.base.weight, x.contiguous(), self.base.max_norm, self.base.norm_type)

    def _use_table(self, x: torch.Tensor) -> bool:
        """Whether merging into the table is cheaper than looking the adaptors up (and gives the same gradients)."""
        base = self.base
        return x.numel() >= base.num_embeddings and not base.sparse and not base.scale_grad_by_freq

    # --- the three paths -------------------------------------------------------------------------------
    def forward_merged(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One mixture for the batch. When ``x`` holds at least as many indices as the table has rows, the
        delta is folded into the table (``F.embedding`` on ``E_eff``); otherwise building ``E_eff`` would cost
        more than the lookup, and the adaptor rows of ``x`` are looked up and mixed with the shared scale."""
        base = self.base
        if self._use_table(x):
            self._renorm_(x)
            return F.embedding(x, base.weight + self.delta_weight(w), base.padding_idx)
        h = self._lookup(x) * (self.alpha * w).repeat_interleave(self.rank)
        return base(x) + F.linear(h, self._b_cat())

    def forward_factorised(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = self._lookup(x)
        h = h * per_sample(self.alpha * scale_channels(w, self.rank), h)
        return self.base(x) + F.linear(h, self._b_cat())

    def forward_naive(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        sgbf = self.base.scale_grad_by_freq
        for c in range(self.num_adaptors):
            h = self._keep(x, F.embedding(x, self.adaptor_A[c], scale_grad_by_freq=sgbf))
            delta = F.linear(h, self.adaptor_B[c])
            out = out + self.alpha * per_sample(w[:, c : c + 1], delta) * delta
        return out

    @torch.no_grad()
    def merged_module(self, w: torch.Tensor) -> nn.Embedding:
        """A copy of ``base`` whose table is ``E + delta``. With ``max_norm``, every row of the copied ``E`` is
        renormalised first and the copy has ``max_norm=None`` (the adaptor delta is not norm-constrained)."""
        merged = self._copy_base()
        if merged.max_norm is not None:
            rows = torch.arange(merged.num_embeddings, device=merged.weight.device)
            torch.embedding_renorm_(merged.weight, rows, merged.max_norm, merged.norm_type)
            merged.max_norm = None
        merged.weight.add_(self.delta_weight(w))
        return merged

    @torch.no_grad()
    def precondition_gradients_(self, eps: float = 1e-5) -> None:
        """Divide adaptor c's grad of each factor by ``||G_c||_F + eps``, G_c the Gram of its other factor."""
        a, b = self.adaptor_A, self.adaptor_B
        if a.grad is not None:
            a.grad.div_(with_trailing_dims(gram_norm(b) + eps, 2))
        if b.grad is not None:
            b.grad.div_(with_trailing_dims(gram_norm(a) + eps, 2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
