"""FLoRAL: federated low-rank adaptive learning with mixtures of adaptors.

The core (layers, router, model, aggregation) is plain PyTorch; ``FloralModule`` and the data module need
Lightning and are imported only when first used, so ``import floral_lightning`` does not load Lightning.
"""

from .layers import FloralConv, FloralConvTranspose, FloralEmbedding, FloralLayer, FloralLinear, FloralNorm
from .model import FloralModel, ParameterOverhead
from .router import ClientMixtures

_LIGHTNING_EXPORTS = {"FloralModule": ".module", "RegressionModule": ".module", "FederatedDataModule": ".data"}


def __getattr__(name: str):
    if name in _LIGHTNING_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LIGHTNING_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClientMixtures",
    "FederatedDataModule",
    "FloralConv",
    "FloralConvTranspose",
    "FloralEmbedding",
    "FloralLayer",
    "FloralLinear",
    "FloralModel",
    "FloralModule",
    "FloralNorm",
    "ParameterOverhead",
    "RegressionModule",
]
