from torch import nn

from .base import FloralLayer

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
class FloralNorm(FloralLayer): ...
