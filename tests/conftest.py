"""Shared fixtures: tiny models and deterministic inputs."""

import warnings

import pytest
import torch
from torch import nn

from auglocal_fx._threads import single_thread


@pytest.fixture(autouse=True)
def _quiet_seeded_single_thread():
    """Seeded, warnings off, one intra-op thread: the tests run batch 2 on tiny inputs, where
    threads gain nothing and, on busy shared cores, slow every op down many times."""
    torch.manual_seed(0)
    with warnings.catch_warnings(), single_thread():
        warnings.simplefilter("ignore")
        yield


class TinyResNet(nn.Module):
    """Stem, two residual blocks (one with a stride-2 projection), pooling, classifier."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a1 = nn.Conv2d(8, 8, 3, padding=1)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Conv2d(8, 16, 1, stride=2)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(self.proj(x) + self.b2(torch.relu(self.b1(x))))
        x = torch.relu(self.c(x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.drop(x))


@pytest.fixture
def tiny_resnet():
    return TinyResNet()


def batch(input_size, n=2, num_classes=5, seed=0):
    """A deterministic batch of ``n`` images and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y
