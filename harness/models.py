"""Bundled models. Any `torch.nn.Module` class reachable by import path can be used instead
through the config's `model._target_`."""

from typing import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv5x5 -> pool -> conv5x5 -> pool -> dense -> dense, for 28x28 single-channel images."""

    def __init__(self, channels: Sequence[int] = (32, 64), hidden: int = 128,
                 num_classes: int = 10, dropout: float = 0.25, in_channels: int = 1,
                 image_size: int = 28):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = second * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))
