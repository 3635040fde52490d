"""Tiny networks for the training and memory tests (file specs: ``tests/_tiny_models.py:NAME``)."""

import torch
from torch import nn


class TinyCNN(nn.Module):
    """``depth`` conv blocks (optionally with batch norm), global pooling and a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 8, batch_norm: bool = True, depth: int = 4,
                 downsample: bool = True):
        super().__init__()
        layers = []
        channels = 3
        for i in range(depth):
            stride = 2 if downsample and i in (1, 3) else 1
            layers.append(nn.Conv2d(channels, width, 3, stride, 1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def tiny_cnn(num_classes: int = 10) -> TinyCNN:
    """Conv-BN-ReLU blocks."""
    return TinyCNN(num_classes)


def tiny_nobn(num_classes: int = 10) -> TinyCNN:
    """Conv-ReLU blocks without batch norm (per-process batch statistics would differ under DDP)."""
    return TinyCNN(num_classes, batch_norm=False)
