"""``FloralModel``: any ``nn.Module`` with FLoRAL wrappers in place of its target layers, plus the router."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
from torch import nn

from .layers import FloralLayer, WrapperOptions, adaptable_types, adaptor_kind, build_wrapper
from .layers.base import PATHS, MixtureContext
from .layers.linear import FloralLinear, precondition_rank1_
from .personalized import ParameterOverhead, PersonalizedModel, Role
from .router import ClientMixtures

__all__ = ["KINDS", "FloralModel", "ParameterOverhead", "Role", "client_runs"]
KINDS = ("linear", "conv", "norm", "embedding")


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches names or suffixes."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


class FloralModel(PersonalizedModel):
    """Wrap ``base`` with C low-rank adaptors per target layer and a router of K private mixtures.

    The target layers of ``base`` are replaced in place by explicit wrapper modules (``FloralLinear``,
    ``FloralConv``, ...) that hold the original layer as ``.base``; the wrapped network stays reachable as
    ``model.base`` with its own methods. Targets are chosen by the type switches ``linear``, ``conv``,
    ``norm``, ``embedding``, optionally narrowed by ``target_modules`` and ``exclude_modules`` (a string is
    a regex matched against the whole module name; a list matches names or name suffixes, as in PEFT).

    Args:
        base: the network to adapt (modified in place).
        num_clients: K, the number of clients with a private mixture.
        num_adaptors: C, adaptors per layer.
        rank: an int, a fraction of each layer's parameter budget, or ``"sqrt"``, ``"log"``, ``"full"``.
        conv_split: how conv kernels are split between the two factors: ``"balanced_2d"``,
            ``"balanced"``, ``"in"`` or ``"out"``.
        init: ``"uniform_in"``, ``"normal_in"``, ``"uniform_out"`` or ``"normal_out"``.
        alpha: scale of the adaptor sum.
        bias: give adaptors of biased layers a (zero-initialised) bias of their own.
        min_rank: lower bound for fractional and rule-based ranks.
        router: keyword arguments of :class:`ClientMixtures` (temperature, noise, min_prob, ...).
    """

    def __init__(
        self,
        base: nn.Module,
        num_clients: int,
        num_adaptors: int = 4,
        rank: int | float | str = 0.01,
        *,
        linear: bool = True,
        conv: bool = True,
        norm: bool = False,
        embedding: bool = False,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
        conv_split: str = "balanced_2d",
        init: str = "uniform_in",
        alpha: float = 1.0,
        bias: bool = True,
        min_rank: int = 1,
        router: dict | None = None,
    ) -> None:
        super().__init__()
        if num_adaptors < 1:
            raise ValueError(f"num_adaptors={num_adaptors}: must be >= 1 (use the FedAvg method for no adaptors)")
        self.num_adaptors = num_adaptors
        # the constructor's options, as plain data: with the base network they rebuild this model
        # (``floral_lightning.pretrained``)
        self.options = {
            "num_clients": num_clients,
            "num_adaptors": num_adaptors,
            "rank": rank,
            "linear": linear,
            "conv": conv,
            "norm": norm,
            "embedding": embedding,
            "target_modules": target_modules if isinstance(target_modules, (str, type(None))) else list(target_modules),
            "exclude_modules": exclude_modules
            if isinstance(exclude_modules, (str, type(None)))
            else list(exclude_modules),
            "conv_split": conv_split,
            "init": init,
            "alpha": alpha,
            "bias": bias,
            "min_rank": min_rank,
            "router": dict(router or {}),
        }
        self.base = base
        self.router = ClientMixtures(num_clients, num_adaptors, **(router or {}))
        enabled = {"linear": linear, "conv": conv, "norm": norm, "embedding": embedding}
        options = dict(rank=rank, conv_split=conv_split, init=init, alpha=alpha, bias=bias, min_rank=min_rank)
        # registered wrappers of kinds other than the four switches are selected unless patterns exclude them
        targets = _select_targets(base, enabled, target_modules, exclude_modules)
        if not targets:
            raise ValueError(
                "no layer of the base model was selected for adaptation: enable one of "
                f"{KINDS} that the model has, or check target_modules/exclude_modules"
            )
        for name in targets:
            wrapper = build_wrapper(
                base.get_submodule(name), num_adaptors, WrapperOptions(name=name or "base", **options)
            )
            if not name:  # the base model is itself one adaptable layer, e.g. nn.Linear
                self.base = wrapper
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent_name), child, wrapper)
        # A plain list, not a ModuleList: the wrappers are already registered inside ``base``.
        self._floral_layers: list[tuple[str, FloralLayer]] = [
            (n, m) for n, m in self.base.named_modules() if isinstance(m, FloralLayer)
        ]
        # One context for all wrappers: a forward hands them its mixture with two plain attribute writes.
        self._context = MixtureContext()
        for _, layer in self._floral_layers:
            layer.context = self._context
        # the preconditioner's grouping (ranks are fixed at construction)
        self._rank1_linear = [m for _, m in self._floral_layers if isinstance(m, FloralLinear) and m.rank == 1]
        self._other_layers = [m for _, m in self._floral_layers if m not in self._rank1_linear]
        self._roles = self._assign_roles()

    # --- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        client_ids: int | torch.Tensor | None = None,
        *,
        mixture: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``base`` with every adapted layer mixing its adaptors by the given clients' mixtures.

        ``client_ids`` is an ``int`` (one client for the whole batch: the merged path) or a ``LongTensor``
        of shape [B] (one client per sample: the factorised path); ``mixture`` bypasses the router.
        """
        runs = None
        if mixture is None:
            if client_ids is None:
                raise ValueError("FloralModel.forward needs client_ids (int or LongTensor [B]) or mixture=...")
            mixture = self.router(client_ids)
            if isinstance(client_ids, torch.Tensor) and client_ids.dim() == 1 and not self.training:
                runs = client_runs(client_ids, mixture)
        context = self._context
        context.mixture, context.runs = mixture, runs
        try:
            return self.base(x)
        finally:
            context.mixture, context.runs = None, None

    def set_path(self, path: str) -> None:
        """Force a forward path in every layer: ``auto`` (default), ``merged``, ``factorised`` or ``naive``."""
        if path not in PATHS:
            raise ValueError(f"path={path!r}: expected one of {PATHS}")
        for _, layer in self._floral_layers:
            layer.path = path

    def floral_layers(self) -> dict[str, FloralLayer]:
        """The wrappers by their name inside ``base``."""
        return dict(self._floral_layers)

    # --- parameter roles ---------------------------------------------------------------------------------
    def _assign_roles(self) -> dict[str, Role]:
        adaptor_prefixes = tuple(f"base.{name}." if name else "base." for name, _ in self._floral_layers)
        roles: dict[str, Role] = {}
        for name, _ in self.named_tensors():
            if name.startswith("router."):
                roles[name] = "private"
            elif name.startswith(adaptor_prefixes) and not _is_under_wrapped_base(name, adaptor_prefixes):
                roles[name] = "adaptor"
            else:
                roles[name] = "shared"
        return roles

    # --- merging and reporting ---------------------------------------------------------------------------
    @torch.no_grad()
    def mixture_of(self, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s mixture as used at evaluation (no noise)."""
        was_training = self.router.training
        self.router.eval()
        try:
            return self.router(client_id)
        finally:
            self.router.train(was_training)

    @torch.no_grad()
    def merge(self, client_id: int) -> nn.Module:
        """A plain copy of the base architecture with client ``client_id``'s mixture folded into its weights.

        The result equals this model for that client in eval mode (batch-norm adaptors fold their running
        statistics, so in train mode the merged copy normalises differently).
        """
        w = self.mixture_of(client_id)
        merged = copy.deepcopy(self.base)
        for name, layer in self._floral_layers:
            if not name:
                return layer.merged_module(w)
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, layer.merged_module(w))
        return merged

    def client_network(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s network: :meth:`merge`."""
        return self.merge(client_id)

    @torch.no_grad()
    def precondition_gradients_(self, eps: float = 1e-5) -> None:
        """Precondition the factor gradients of every adapted layer (spec §2).

        The rank-1 linear layers (every linear layer of the small tasks at rho = 1 %) are done together in
        closed form (:func:`~floral_lightning.layers.linear.precondition_rank1_`); the others one by one.
        """
        if self._rank1_linear:
            precondition_rank1_(self._rank1_linear, eps)
        for layer in self._other_layers:
            layer.precondition_gradients_(eps)


def client_runs(client_ids: torch.Tensor, mixture: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The batch's runs of consecutive samples of one client: one mixture row per run [U, C] and the run lengths.

    Exact only when a client's rows are equal, i.e. without router noise (eval mode).
    """
    _, lengths = torch.unique_consecutive(client_ids, return_counts=True)
    return mixture[lengths.cumsum(0) - lengths], lengths.tolist()


def _is_under_wrapped_base(name: str, adaptor_prefixes: tuple[str, ...]) -> bool:
    """True for tensors of the original layer inside a wrapper, e.g. ``base.fc.base.weight``."""
    return any(name.startswith(p) and name[len(p) :].startswith("base.") for p in adaptor_prefixes)


def _select_targets(
    base: nn.Module,
    enabled: dict[str, bool],
    target_modules: str | Sequence[str] | None,
    exclude_modules: str | Sequence[str] | None,
) -> list[str]:
    """Names of the modules to wrap, validated against the patterns."""
    if isinstance(base, FloralLayer) or any(isinstance(m, FloralLayer) for m in base.modules()):
        raise ValueError("the base model already contains FLoRAL layers; wrap the original model once")
    # The root is a candidate only when the whole base model is one adaptable layer.
    names = [n for n, _ in base.named_modules() if n or next(base.children(), None) is None]
    if target_modules is not None:
        patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        for p in patterns:
            hits = [n for n in names if _matches(n, p if isinstance(target_modules, str) else [p])]
            if not hits:
                raise ValueError(f"target_modules pattern {p!r} matches no module of the base model")
            if not isinstance(target_modules, str):
                for n in hits:
                    if adaptor_kind(base.get_submodule(n)) is None:
                        raise TypeError(
                            f"target module {n!r} is a {type(base.get_submodule(n)).__name__}, which FLoRAL cannot "
                            f"adapt: adaptable types are {adaptable_types()} (register_layer adds a wrapper)"
                        )
    if exclude_modules is not None:
        patterns = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
        for p in patterns:
            if not any(_matches(n, p if isinstance(exclude_modules, str) else [p]) for n in names):
                raise ValueError(f"exclude_modules pattern {p!r} matches no module of the base model")
    targets = []
    for name in names:
        kind = adaptor_kind(base.get_submodule(name))
        if kind is None:
            continue
        if target_modules is not None:
            if not _matches(name, target_modules):
                continue
        elif not enabled.get(kind, True):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        targets.append(name)
    return targets
