"""FLoRAL wrapper layers: one class per base layer type, each holding ``base`` and C stacked adaptors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .base import FloralLayer
from .conv import CONV_SPLITS, FloralConv, FloralConvTranspose
from .embedding import FloralEmbedding
from .linear import FloralLinear
from .norm import FloralNorm
from .rank import INIT_STRATEGIES, RANK_RULES, resolve_rank

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class WrapperOptions:
    """The options ``FloralModel`` passes to every wrapper it builds (each wrapper uses the ones it has)."""

    rank: int | float | str = 0.01
    conv_split: str = "balanced_2d"
    init: str = "uniform_in"
    alpha: float = 1.0
    bias: bool = True
    min_rank: int = 1
    name: str = "layer"


Builder = Callable[[nn.Module, int, WrapperOptions], FloralLayer]


@dataclass(frozen=True)
class LayerEntry:
    """A registered wrapper: it adapts modules of ``wrapper.adapts``, under the type switch ``kind``."""

    wrapper: type[FloralLayer]
    kind: str
    build: Builder


def _factor_layer(cls: type[FloralLayer]) -> Builder:
    """The builder of a wrapper with the signature of ``FloralLinear`` (rank, alpha, min_rank, name)."""
    return lambda m, c, o: cls(m, c, o.rank, alpha=o.alpha, min_rank=o.min_rank, name=o.name)


_BUILT_IN: tuple[LayerEntry, ...] = (
    LayerEntry(
        FloralLinear,
        "linear",
        lambda m, c, o: FloralLinear(
            m, c, o.rank, alpha=o.alpha, bias=o.bias, init=o.init, min_rank=o.min_rank, name=o.name
        ),
    ),
    *(
        LayerEntry(
            cls,
            "conv",
            lambda m, c, o, cls=cls: cls(
                m,
                c,
                o.rank,
                split=o.conv_split,
                alpha=o.alpha,
                bias=o.bias,
                init=o.init,
                min_rank=o.min_rank,
                name=o.name,
            ),
        )
        for cls in (FloralConv, FloralConvTranspose)
    ),
    LayerEntry(FloralEmbedding, "embedding", _factor_layer(FloralEmbedding)),
    LayerEntry(FloralNorm, "norm", lambda m, c, o: FloralNorm(m, c, alpha=o.alpha)),
)
# entries registered by users; looked up before the built-in ones
_REGISTERED: list[LayerEntry] = []


def register_layer(wrapper: type[FloralLayer], kind: str | None = None, build: Builder | None = None) -> LayerEntry:
    """Let ``FloralModel`` wrap modules of the types in ``wrapper.adapts`` with ``wrapper``.

    Lookup is first match wins, newest registration first, then the built-in wrappers, so a registration can
    also replace the wrapper of a built-in type. ``kind`` names the ``FloralModel`` type switch that selects
    these modules (``"linear"``, ``"conv"``, ``"norm"``, ``"embedding"``; any other name is always selected,
    narrowed only by ``target_modules``/``exclude_modules``); default: the wrapper's class name.
    ``build(module, num_adaptors, options)`` constructs the wrapper; default: ``wrapper(module, num_adaptors,
    options.rank, alpha=..., min_rank=..., name=...)``, the signature of ``FloralLinear``.
    """
    if not (isinstance(wrapper, type) and issubclass(wrapper, FloralLayer)):
        raise TypeError(f"register_layer: {wrapper!r} is not a FloralLayer subclass")
    if not wrapper.adapts:
        raise ValueError(f"register_layer: {wrapper.__name__}.adapts is empty: list the base layer types it wraps")
    entry = LayerEntry(wrapper, kind or wrapper.__name__, build or _factor_layer(wrapper))
    _REGISTERED.insert(0, entry)
    return entry


def unregister_layer(wrapper: type[FloralLayer]) -> None:
    """Remove every registration of ``wrapper`` (the built-in wrappers stay)."""
    _REGISTERED[:] = [e for e in _REGISTERED if e.wrapper is not wrapper]


def layer_entry(module: nn.Module) -> LayerEntry | None:
    """The first registered entry whose wrapper adapts ``module``'s type, or ``None``."""
    return next((e for e in (*_REGISTERED, *_BUILT_IN) if isinstance(module, e.wrapper.adapts)), None)


def adaptable_types() -> str:
    """The adaptable base layer types, for error messages."""
    names = dict.fromkeys(t.__name__ for e in (*_REGISTERED, *_BUILT_IN) for t in e.wrapper.adapts)
    return ", ".join(names)


def adaptor_kind(module: nn.Module) -> str | None:
    """Which type switch governs ``module`` (``linear``, ``conv``, ``norm``, ``embedding``, or a registered
    wrapper's kind), or ``None`` if no wrapper adapts it."""
    entry = layer_entry(module)
    return None if entry is None else entry.kind


def build_wrapper(module: nn.Module, num_adaptors: int, options: WrapperOptions) -> FloralLayer:
    """The wrapper of ``module`` from the first matching registry entry."""
    entry = layer_entry(module)
    if entry is None:
        raise TypeError(
            f"{options.name!r} is a {type(module).__name__}, which FLoRAL cannot adapt: adaptable types are "
            f"{adaptable_types()} (register_layer adds a wrapper for another type)"
        )
    return entry.build(module, num_adaptors, options)


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
    "LayerEntry",
    "WrapperOptions",
    "adaptable_types",
    "adaptor_kind",
    "build_wrapper",
    "layer_entry",
    "register_layer",
    "resolve_rank",
    "unregister_layer",
]
