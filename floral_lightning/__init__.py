"""FLoRAL: federated low-rank adaptive learning with mixtures of adaptors."""

from .layers import FloralConv, FloralConvTranspose, FloralEmbedding, FloralLayer, FloralLinear, FloralNorm
from .model import FloralModel, ParameterOverhead
from .router import ClientMixtures

__all__ = [
    "ClientMixtures",
    "FloralConv",
    "FloralConvTranspose",
    "FloralEmbedding",
    "FloralLayer",
    "FloralLinear",
    "FloralModel",
    "FloralNorm",
    "ParameterOverhead",
]
