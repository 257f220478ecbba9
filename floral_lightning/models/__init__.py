"""Base networks used by the paper's tasks (plain ``nn.Module``s; FLoRAL wraps them later)."""

from .paper import MLP, VGG8, CifarCNN

__all__ = ["MLP", "VGG8", "CifarCNN"]
