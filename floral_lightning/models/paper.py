"""The paper's base models (spec §3), with simple type-hinted arguments so LightningCLI can build them.

The synthetic linear task uses ``torch.nn.Linear(10, 3)`` directly and needs no class here.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Sequential):
    """Flatten, then ``Linear`` layers with ReLU between them (none after the last).

    Covers the synthetic 10-20-1 MLP (``MLP(10, [20], 1)``) and the MNIST 784-200-10 MLP
    (``MLP(784, [200], 10)``). An empty ``hidden`` gives a single linear layer.
    """

    def __init__(self, in_features: int, hidden: list[int], out_features: int) -> None:
        dims = [in_features, *hidden, out_features]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class CifarCNN(nn.Module):
    """The paper's CIFAR-10 CNN for 32x32 inputs.

    Conv(in,32,5)→ReLU→MaxPool(2)→Conv(32,64,3)→ReLU→MaxPool(3)→Flatten→Linear(1024,64)→ReLU→Linear(64,C).
    Spatial sizes: 32 →conv5→ 28 →pool2→ 14 →conv3→ 12 →pool3→ 4, so the flatten size is 64·4·4 = 1024.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(3),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class VGG8(nn.Module):
    """The paper's VGG8 without batch norm, for 32x32 inputs (CIFAR-100).

    3x3 convs (padding 1, ReLU after each) 16-M-32-M-64-M-128-M-512-M bring 32x32 down to 1x1x512, then
    Dropout(0.5)→Linear(512,512)→ReLU→Dropout(0.5)→Linear(512,512)→ReLU→Linear(512,C).
    """

    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (16, 32, 64, 128, 512):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
