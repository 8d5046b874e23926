"""Bundled models. Any `torch.nn.Module` class reachable by import path can be used instead
through the config's `model._target_`."""

from typing import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """(conv5x5 -> batchnorm -> relu -> pool) x 2 -> dense -> dense, for 28x28 images."""

    def __init__(self, channels: Sequence[int] = (32, 64), hidden: int = 128,
                 num_classes: int = 10, dropout: float = 0.25, in_channels: int = 1,
                 image_size: int = 28, batch_norm: bool = True):
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            *self._block(in_channels, first, batch_norm), *self._block(first, second, batch_norm))
        flat = second * (image_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    @staticmethod
    def _block(inputs: int, outputs: int, batch_norm: bool):
        norm = [nn.BatchNorm2d(outputs)] if batch_norm else []
        return [nn.Conv2d(inputs, outputs, kernel_size=5, padding=2), *norm, nn.ReLU(),
                nn.MaxPool2d(2)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))
