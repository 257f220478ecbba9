"""The contract every FLoRAL wrapper follows.

A wrapper holds the original layer as ``base`` and the C adaptors as *stacked* tensors whose leading
dimension is the adaptor index (``adaptor_A[c]`` is adaptor c's factor). Every tensor of the wrapper that is
not under ``base`` is an adaptor tensor; the aggregation rule relies on that leading dimension.

The mixture ``w`` decides the forward path:

- ``w.shape == (C,)``: one mixture for the whole batch (a client's local training). The **merged** path
  folds ``alpha * sum_c w_c * delta_c`` into the base weight and runs one base-sized op (an embedding may
  instead look the adaptor rows up when that is cheaper; "merged" means one mixture for the batch). Under
  "auto", ``forward_one_mixture`` may pick a cheaper exact form for the batch at hand (a linear layer
  with a large weight and a small batch runs its adaptors beside the base instead of folding them in).
- ``w.shape == (B, C)``: a mixture per sample (many clients in one batch). The **factorised** path runs all
  adaptors as one rank ``C*r`` factor pair with the mixture scaling the ``C*r`` channels. When the samples
  come in runs of one client (``runs``, handed over by ``FloralModel`` in eval mode for client-sorted
  batches), a layer type whose factorised path is slow may run each run through the merged path instead
  (``merge_runs_from``).

``FloralModel`` hands the mixture to its wrappers through one :class:`MixtureContext` that they all share:
a forward sets two plain attributes on it, instead of ``nn.Module.__setattr__`` on every wrapper (a small
model steps in about a millisecond, and four module attribute writes per layer per step showed up in it).

``forward_naive`` is the definition, one adaptor at a time; it exists for tests and benchmarks.
Inputs carry a leading batch dimension.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PATHS = ("auto", "merged", "factorised", "naive")


class MixtureContext:
    """The mixture of the forward in progress, shared by all wrappers of one ``FloralModel``.

    ``mixture`` is ``[C]`` or ``[B, C]``; ``runs`` is the per-sample mixture as runs of equal rows,
    ``(mixtures [U, C], run lengths)`` (eval mode, a LongTensor of client ids), valid only with ``mixture``.
    A plain object, not a module: setting its attributes costs a Python attribute write.
    """

    __slots__ = ("mixture", "runs")

    def __init__(self) -> None:
        self.mixture: torch.Tensor | None = None
        self.runs: tuple[torch.Tensor, list[int]] | None = None


class FloralLayer(nn.Module):
    """Base class of the wrappers: ``base`` plus C stacked adaptors mixed by a mixture vector."""

    #: base layer types this wrapper adapts (the layer registry matches modules against it: ``register_layer``)
    adapts: tuple[type[nn.Module], ...] = ()
    #: with a per-sample mixture in runs, the shortest mean run length (samples per client) from which "auto"
    #: runs each run through the merged path rather than the batch through the factorised one; None: never
    merge_runs_from: float | None = None

    def __init__(self, base: nn.Module, num_adaptors: int, alpha: float = 1.0) -> None:
        super().__init__()
        if num_adaptors < 1:
            raise ValueError(f"num_adaptors={num_adaptors}: must be >= 1")
        self.base = base
        self.num_adaptors = num_adaptors
        self.alpha = float(alpha)
        #: forward path: "auto" picks merged for a [C] mixture and factorised for a [B, C] one
        self.path = "auto"
        #: where ``FloralModel`` puts the mixture of each forward (it replaces this one with the context all its
        #: wrappers share); ``forward(x, mixture=...)`` overrides it
        self.context = MixtureContext()

    @property
    def mixture(self) -> torch.Tensor | None:
        """The mixture of the forward in progress (``None`` outside ``FloralModel.forward``)."""
        return self.context.mixture

    @property
    def runs(self) -> tuple[torch.Tensor, list[int]] | None:
        """The per-sample mixture as runs of equal rows (eval mode), or ``None``."""
        return self.context.runs

    def forward(self, x: torch.Tensor, mixture: torch.Tensor | None = None) -> torch.Tensor:
        context = self.context
        w = context.mixture if mixture is None else mixture
        if w is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a mixture: call it through FloralModel(x, client_ids=...) or pass "
                "mixture=... (shape [num_adaptors] or [batch, num_adaptors])"
            )
        if w.shape[-1] != self.num_adaptors or w.dim() not in (1, 2):
            raise ValueError(
                f"mixture of shape {tuple(w.shape)}: expected [{self.num_adaptors}] or [batch, {self.num_adaptors}]"
            )
        path = self.path
        if path == "auto":
            if w.dim() == 1:
                return self.forward_one_mixture(x, w)
            if mixture is None and self._merge_runs(x, context.runs):
                return self.forward_runs(x, *context.runs)
            else:
                path = "factorised"
        if path == "merged":
            if w.dim() != 1:
                raise ValueError("the merged path needs one mixture for the whole batch (shape [num_adaptors])")
            return self.forward_merged(x, w)
        if w.dim() == 1:
            w = w.expand(x.shape[0], -1)
        elif w.shape[0] != x.shape[0]:
            raise ValueError(f"per-sample mixture for {w.shape[0]} samples, but the batch has {x.shape[0]}")
        if path == "factorised":
            return self.forward_factorised(x, w)
        if path == "naive":
            return self.forward_naive(x, w)
        raise ValueError(f"path={self.path!r}: expected one of {PATHS}")

    def _merge_runs(self, x: torch.Tensor, runs: tuple[torch.Tensor, list[int]] | None) -> bool:
        if runs is None or self.merge_runs_from is None:
            return False
        return x.shape[0] >= self.merge_runs_from * len(runs[1])

    def forward_runs(self, x: torch.Tensor, mixtures: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """A batch in runs of one mixture each (``mixtures`` [U, C], run ``lengths``): the merged path per run."""
        if sum(lengths) != x.shape[0] or len(lengths) != len(mixtures):
            raise ValueError(f"runs of lengths {lengths} with {len(mixtures)} mixtures for a batch of {x.shape[0]}")
        return torch.cat([self.forward_merged(part, w) for part, w in zip(x.split(lengths), mixtures)])

    def forward_one_mixture(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """What "auto" runs for one mixture ``w`` [C] for the whole batch: the merged path, unless a layer type
        knows a cheaper exact one for this batch (``FloralLinear`` does)."""
        return self.forward_merged(x, w)

    # --- the three paths, implemented per layer type -------------------------------------------------
    def forward_merged(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The base op with ``delta_weight(w)`` added to its weight and bias (layers with a weight and bias)."""
        dw, db = self.delta_weight(w)
        bias = self.base.bias
        if db is not None:
            bias = db if bias is None else bias + db
        return self._base_forward(x, self.base.weight + dw, bias)

    def _base_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's op with another weight and bias."""
        raise NotImplementedError

    def forward_factorised(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_naive(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- merging ---------------------------------------------------------------------------------------
    def delta_weight(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The change ``alpha * sum_c w_c delta_c`` to the base weight and bias for a mixture ``w`` [C]."""
        raise NotImplementedError

    @torch.no_grad()
    def merged_module(self, w: torch.Tensor) -> nn.Module:
        """A plain copy of ``base`` with the mixture ``w`` ([C]) folded into its weights (eval semantics).

        This default adds ``delta_weight(w)`` to the copy's ``weight`` and ``bias``.
        """
        merged = self._copy_base()
        dw, db = self.delta_weight(w)
        merged.weight.add_(dw)
        if db is not None:
            merged.bias.add_(db)
        return merged

    def _copy_base(self) -> nn.Module:
        return copy.deepcopy(self.base)

    # --- optional gradient preconditioning (spec §2) -----------------------------------------------------
    @torch.no_grad()
    def precondition_gradients_(self, eps: float = 1e-5) -> None:
        """Rescale the factor gradients by the inverse Gram of the other factor; no-op for layers without factors."""

    def extra_repr(self) -> str:
        return f"num_adaptors={self.num_adaptors}, alpha={self.alpha}"


def scale_channels(w: torch.Tensor, rank: int, groups: int = 1) -> torch.Tensor:
    """Expand a per-sample mixture [B, C] to the C*r channels of a stacked factor pair.

    Channels are ordered (group, adaptor, rank-within-group) so that a grouped conv with ``groups`` groups
    sees each adaptor's slice of its group; with ``groups == 1`` this is plain (adaptor, rank) order.
    """
    b, c = w.shape
    per_group = rank // groups
    return w[:, None, :, None].expand(b, groups, c, per_group).reshape(b, groups * c * per_group)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-sample ``[B, F]`` tensor so it broadcasts against ``like`` of shape ``[B, ..., F]``."""
    return v.view(v.shape[0], *([1] * (like.dim() - 2)), v.shape[-1])


def with_trailing_dims(v: torch.Tensor, n: int) -> torch.Tensor:
    """``v`` viewed with ``n`` trailing singleton dims: a per-sample ``[B, F]`` against a channels-first
    ``[B, F, *spatial]`` activation, or a per-adaptor ``[C]`` against a stacked ``[C, ...]`` factor."""
    return v.view(*v.shape, *([1] * n))


def gram_norm(t: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Frobenius norm of the Gram of each adaptor's factor in a stacked ``t: [C, M, ...]`` ([C]).

    Shared by every layer whose factors are not rank-1 vectors (linear layers have a closed form).
    ``M`` (dim 1 of every layout here) is the grouped channel dim; group j's block is flattened to a matrix
    ``[M/g, -1]`` and the Gram is block-diagonal over the groups, so its norm is the root sum of squares of
    the blocks' norms. ``M M^T`` and ``M^T M`` share their Frobenius norm, so the smaller is formed.
    """
    m = t.reshape(t.shape[0], groups, t.shape[1] // groups, -1)
    gram = m @ m.transpose(-1, -2) if m.shape[-2] <= m.shape[-1] else m.transpose(-1, -2) @ m
    return torch.linalg.matrix_norm(gram).pow(2).sum(1).sqrt()
