"""FLoRAL wrapper for normalisation layers: adaptor c is a fresh copy of the norm, output added.

``h = base(x) + alpha * sum_c w_c * norm_c(x)`` where ``norm_c`` has its own zero-initialised affine
(``gamma_c``, ``beta_c``; always present, even when the base has none) and, for norms that track running
statistics (BatchNorm, InstanceNorm with ``track_running_stats=True``), its own running statistics.

Two facts make every path one normalisation:

- when the statistics come from the input (training mode, LayerNorm, GroupNorm, non-tracking norms), all
  ``norm_c`` compute the same ``x_hat``, so ``sum_c w_c norm_c(x) = x_hat * sum_c w_c gamma_c + sum_c w_c beta_c``;
  in training mode every adaptor's running statistics are still updated from the batch (the base's momentum
  rules, ``momentum=None`` included), all C at once;
- in eval mode with running statistics, ``norm_c`` is a per-channel affine map, and so is the mixture:
  ``x * S + T`` with ``S = sum_c w_c gamma_c / sqrt(rv_c + eps)`` and ``T = sum_c w_c (beta_c - rm_c * ...)``.

The merged path (``w: [C]``) folds the adaptors into the base's affine and runs one ``F.*_norm`` call;
the factorised path (``w: [B, C]``) adds a per-sample affine of ``x_hat`` (or of ``x``) to ``base(x)``.
``SyncBatchNorm`` is treated as a plain BatchNorm (no cross-process statistics). Unbatched InstanceNorm input
is accepted by the merged path only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .base import FloralLayer

# The input dims each kind accepts (torch's own rules: BatchNorm1d takes [B, F] or [B, F, L], ...); for an
# InstanceNorm the first is its unbatched input. SyncBatchNorm takes any batched input. The Lazy* variants
# subclass these.
INPUT_DIMS: dict[type[nn.Module], tuple[int, ...] | None] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
    nn.SyncBatchNorm: None,
    nn.InstanceNorm1d: (2, 3),
    nn.InstanceNorm2d: (3, 4),
    nn.InstanceNorm3d: (4, 5),
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NORM_TYPES = (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm, *INSTANCE_NORMS)


class FloralNorm(FloralLayer):
    """A norm layer plus C stacked norm adaptors.

    Adaptor tensors: ``adaptor_weight`` and ``adaptor_bias`` ``[C, *affine_shape]`` (zeros), and for norms that
    track running statistics the buffers ``adaptor_running_mean`` ``[C, F]`` (zeros), ``adaptor_running_var``
    ``[C, F]`` (ones) and ``adaptor_num_batches_tracked`` ``[C]`` (long). ``affine_shape`` is
    ``normalized_shape`` for LayerNorm and ``[num_channels]`` (channel dim 1) otherwise.
    ``precondition_gradients_`` is a no-op (no factors).
    """

    adapts = NORM_TYPES

    def __init__(self, base: nn.Module, num_adaptors: int, *, alpha: float = 1.0) -> None:
        super().__init__(base, num_adaptors, alpha)
        if isinstance(base, LazyModuleMixin) and base.has_uninitialized_params():
            raise TypeError(f"{type(base).__name__} is uninitialised: run one batch through it before wrapping it")
        if isinstance(base, nn.LayerNorm):
            self.kind, shape = "layer", tuple(base.normalized_shape)
        elif isinstance(base, nn.GroupNorm):
            self.kind, shape = "group", (base.num_channels,)
        elif isinstance(base, BATCH_NORMS):
            self.kind, shape = "batch", (base.num_features,)
        elif isinstance(base, INSTANCE_NORMS):
            self.kind, shape = "instance", (base.num_features,)
        else:
            raise TypeError(f"FloralNorm adapts {[t.__name__ for t in NORM_TYPES]}, not {type(base).__name__}")
        #: the input dims the base accepts (None: any batched input, or no rule: LayerNorm, GroupNorm)
        self.input_dims = next((d for t, d in INPUT_DIMS.items() if isinstance(base, t)), None)
        self.affine_shape = shape
        #: whether eval mode normalises with running statistics (which each adaptor then has its own of)
        self.tracks = self.kind in ("batch", "instance") and base.running_mean is not None
        refs = [t for t in (getattr(base, "weight", None), getattr(base, "running_mean", None)) if t is not None]
        factory = {"device": refs[0].device, "dtype": refs[0].dtype} if refs else {}
        self.adaptor_weight = nn.Parameter(torch.zeros(num_adaptors, *shape, **factory))
        self.adaptor_bias = nn.Parameter(torch.zeros(num_adaptors, *shape, **factory))
        if self.tracks:
            f = base.num_features
            self.register_buffer("adaptor_running_mean", torch.zeros(num_adaptors, f, **factory))
            self.register_buffer("adaptor_running_var", torch.ones(num_adaptors, f, **factory))
            self.register_buffer(
                "adaptor_num_batches_tracked",
                torch.zeros(num_adaptors, dtype=torch.long, device=factory.get("device")),
            )

    # --- modes and views ---------------------------------------------------------------------------------
    def _input_stats(self) -> bool:
        """Whether the statistics come from the input (else: eval mode with running statistics)."""
        return not self.tracks or self.base.training

    def _updates_stats(self) -> bool:
        return self.tracks and self.base.training and self.base.track_running_stats

    def _view(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """View an affine ``[*A]`` or per-sample ``[B, *A]`` tensor so it broadcasts against ``x``."""
        lead = v.shape[: v.dim() - len(self.affine_shape)]
        if self.kind == "layer":
            if not lead:
                return v
            return v.view(*lead, *([1] * (x.dim() - 1 - len(self.affine_shape))), *self.affine_shape)
        return v.view(*lead, *self.affine_shape, *([1] * (x.dim() - 2)))

    def _check_input(self, x: torch.Tensor, per_sample: bool = True) -> bool:
        """Check ``x``'s dims as the base would; True when ``x`` is an unbatched InstanceNorm input."""
        if self.input_dims is not None and x.dim() not in self.input_dims:
            expected = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"{type(self.base).__name__}: expected {expected} input (got {x.dim()}D input)")
        unbatched = self.kind == "instance" and x.dim() == self.input_dims[0]
        if unbatched and per_sample:
            raise ValueError(
                f"unbatched input of shape {tuple(x.shape)}: only the merged path (one mixture of shape "
                f"[{self.num_adaptors}]) accepts unbatched InstanceNorm input"
            )
        return unbatched

    # --- mixtures of the adaptors ---------------------------------------------------------------------------
    def _mixed_affine(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha * sum_c w_c gamma_c`` and ``alpha * sum_c w_c beta_c``: ``[*A]`` or ``[B, *A]``."""
        shape = (*w.shape[:-1], *self.affine_shape)
        g = (self.alpha * w) @ self.adaptor_weight.flatten(1)
        b = (self.alpha * w) @ self.adaptor_bias.flatten(1)
        return g.view(shape), b.view(shape)

    def _running_affine(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval mode with running statistics: ``alpha * sum_c w_c norm_c(x) = x * S + T``; returns S, T."""
        scale = self.adaptor_weight * (self.adaptor_running_var + self.base.eps).rsqrt()
        shift = self.adaptor_bias - self.adaptor_running_mean * scale
        return (self.alpha * w) @ scale, (self.alpha * w) @ shift

    def _merged_affine(self, w: torch.Tensor, input_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine that, put in place of the base's, gives ``base(x) + adaptor term`` for ``w: [C]``
        (``input_stats``: the statistics come from the input, else from the running statistics)."""
        base = self.base
        if input_stats:
            g, b = self._mixed_affine(w)
        else:  # fold x * S + T into the base's normalisation by its running statistics
            s, t = self._running_affine(w)
            g = s * (base.running_var + base.eps).sqrt()
            b = t + s * base.running_mean
        weight = 1.0 + g if base.weight is None else base.weight + g
        bias = b if base.bias is None else base.bias + b
        return weight, bias

    @torch.no_grad()
    def _update_adaptor_stats_(self, x: torch.Tensor) -> None:
        """Training mode: every adaptor's running statistics take the batch's, as the base's own do."""
        base = self.base
        rm, rv = self.adaptor_running_mean, self.adaptor_running_var
        if self.kind == "batch":
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x, dim=dims, correction=1)
            self.adaptor_num_batches_tracked.add_(1)
            if base.momentum is None:  # cumulative moving average, per adaptor
                f = (1.0 / self.adaptor_num_batches_tracked.to(rm.dtype)).unsqueeze(1)
            else:
                f = base.momentum
        else:  # instance norm: per-instance statistics averaged over the batch; momentum None means 0
            var, mean = torch.var_mean(x, dim=list(range(2, x.dim())), correction=1)
            var, mean = var.mean(0), mean.mean(0)
            f = 0.0 if base.momentum is None else base.momentum
        rm.copy_(f * mean.to(rm.dtype) + (1 - f) * rm)
        rv.copy_(f * var.to(rv.dtype) + (1 - f) * rv)

    def _base_momentum(self) -> float:
        """The base's momentum argument for this call (increments its ``num_batches_tracked`` like its forward)."""
        base = self.base
        if self.kind == "instance":
            return 0.0 if base.momentum is None else base.momentum
        factor = 0.0 if base.momentum is None else base.momentum
        if base.training and base.track_running_stats and base.num_batches_tracked is not None:
            base.num_batches_tracked.add_(1)
            factor = 1.0 / float(base.num_batches_tracked) if base.momentum is None else base.momentum
        return factor

    def _normalise(self, x: torch.Tensor, weight=None, bias=None, stats: bool = False) -> torch.Tensor:
        """``F.*_norm`` of the base's kind with the given affine; ``stats``: with the base's running statistics
        (used and updated as the base's forward does), else from the input alone."""
        base = self.base
        if self.kind == "layer":
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        if self.kind == "group":
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        if not stats:
            norm = F.batch_norm if self.kind == "batch" else F.instance_norm
            return norm(x, None, None, weight, bias, True, 0.0, base.eps)
        momentum = self._base_momentum()
        pass_stats = not base.training or base.track_running_stats
        rm = base.running_mean if pass_stats else None
        rv = base.running_var if pass_stats else None
        if self.kind == "batch":
            bn_training = base.training or (base.running_mean is None and base.running_var is None)
            return F.batch_norm(x, rm, rv, weight, bias, bn_training, momentum, base.eps)
        use_input_stats = base.training or not base.track_running_stats
        return F.instance_norm(x, rm, rv, weight, bias, use_input_stats, momentum, base.eps)

    # --- the three paths ---------------------------------------------------------------------------------
    def forward_merged(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._check_input(x, per_sample=False):
            return self.forward_merged(x.unsqueeze(0), w).squeeze(0)
        weight, bias = self._merged_affine(w, self._input_stats())
        # the kernel gets only the affine pieces the base has (so the output is the base's, bit for bit, at
        # init); a missing piece is applied elementwise
        if self.base.weight is None:
            out = torch.addcmul(self._view(bias, x), self._normalise(x, stats=True), self._view(weight, x))
        elif self.base.bias is None:
            out = self._normalise(x, weight, None, stats=True) + self._view(bias, x)
        else:
            out = self._normalise(x, weight, bias, stats=True)
        if self._updates_stats():
            self._update_adaptor_stats_(x)
        return out

    def forward_factorised(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        out = self.base(x)
        if self._input_stats():
            g, b = self._mixed_affine(w)
            delta = torch.addcmul(self._view(b, x), self._normalise(x), self._view(g, x))
            if self._updates_stats():
                self._update_adaptor_stats_(x)
        else:
            s, t = self._running_affine(w)
            delta = torch.addcmul(self._view(t, x), x, self._view(s, x))
        return out + delta

    def forward_naive(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        base = self.base
        out = base(x)
        for c in range(self.num_adaptors):
            gamma, beta = self.adaptor_weight[c], self.adaptor_bias[c]
            if self.kind == "layer":
                y = F.layer_norm(x, base.normalized_shape, gamma, beta, base.eps)
            elif self.kind == "group":
                y = F.group_norm(x, base.num_groups, gamma, beta, base.eps)
            elif not self.tracks:
                norm = F.batch_norm if self.kind == "batch" else F.instance_norm
                y = norm(x, None, None, gamma, beta, True, 0.0, base.eps)
            else:
                rm, rv = self.adaptor_running_mean[c], self.adaptor_running_var[c]
                update = self._updates_stats()
                momentum = 0.0 if base.momentum is None else base.momentum
                if self.kind == "batch" and update:
                    self.adaptor_num_batches_tracked[c] += 1
                    if base.momentum is None:
                        momentum = 1.0 / float(self.adaptor_num_batches_tracked[c])
                if not base.training or update:
                    norm = F.batch_norm if self.kind == "batch" else F.instance_norm
                    y = norm(x, rm, rv, gamma, beta, base.training, momentum, base.eps)
                else:  # training without updating the statistics (track_running_stats switched off)
                    norm = F.batch_norm if self.kind == "batch" else F.instance_norm
                    y = norm(x, None, None, gamma, beta, True, 0.0, base.eps)
            weight = w[:, c].view(-1, *([1] * (x.dim() - 1)))
            out = out + self.alpha * weight * y
        return out

    # --- merging -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_module(self, w: torch.Tensor) -> nn.Module:
        """A copy of ``base`` with eval semantics ``base(x) + adaptor term``: the adaptors are folded into its
        affine (created when the base has none), its running statistics are the base's."""
        merged = self._copy_base()
        weight, bias = self._merged_affine(w, input_stats=not self.tracks)
        for name, value in (("weight", weight), ("bias", bias)):
            if getattr(merged, name) is None:
                setattr(merged, name, nn.Parameter(value.detach().clone()))
            else:
                getattr(merged, name).copy_(value)
        if self.kind == "layer":
            merged.elementwise_affine = True
        else:
            merged.affine = True
        return merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, tracks_running_stats={self.tracks}"
