"""Tiny networks for the training and memory tests (file specs: ``tests/_tiny_models.py:NAME``)."""

import os
import time

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


def tiny_logged(num_classes: int = 10) -> TinyCNN:
    """``tiny_cnn`` that logs each creation (the process's ``RANK``, or ``parent``) to the file
    ``$AUGLOCAL_TEST_BUILD_LOG``: every conversion of a spec creates its model."""
    with open(os.environ["AUGLOCAL_TEST_BUILD_LOG"], "a") as log:
        log.write(os.environ.get("RANK", "parent") + "\n")
    return TinyCNN(num_classes)


@torch.fx.wrap
def fail_in_worker(x: torch.Tensor) -> torch.Tensor:
    """Raise in the process whose ``RANK`` is ``$AUGLOCAL_TEST_FAIL_RANK``, on its second
    training forward with a batch of 8 (a pipeline worker dying mid-run); identity elsewhere."""
    if (os.environ.get("AUGLOCAL_TEST_FAIL_RANK") == os.environ.get("RANK") and x.shape[0] == 8
            and torch.is_grad_enabled()):
        _FAILURES["calls"] += 1
        if _FAILURES["calls"] >= 2:
            raise RuntimeError("injected failure")
    return x


_FAILURES = {"calls": 0}


class FailingCNN(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(fail_in_worker(self.features(x))), 1))


def tiny_failing(num_classes: int = 10) -> FailingCNN:
    """``tiny_cnn`` whose last block fails in the worker named by ``$AUGLOCAL_TEST_FAIL_RANK``."""
    return FailingCNN(num_classes)


SLEEP_SECONDS = 0.3


@torch.fx.wrap
def sleep_in_worker(x: torch.Tensor) -> torch.Tensor:
    """Sleep ``SLEEP_SECONDS`` in the process whose ``RANK`` is ``$AUGLOCAL_TEST_SLOW_RANK``, on
    each training forward with a batch of 8 (a slow last pipeline worker), and add a line to the
    file ``$AUGLOCAL_TEST_SLOW_LOG``; identity elsewhere."""
    if (os.environ.get("AUGLOCAL_TEST_SLOW_RANK") == os.environ.get("RANK") and x.shape[0] == 8
            and torch.is_grad_enabled()):
        time.sleep(SLEEP_SECONDS)
        with open(os.environ["AUGLOCAL_TEST_SLOW_LOG"], "a") as log:
            log.write("slept\n")
    return x


class SlowCNN(TinyCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(sleep_in_worker(self.features(x))), 1))


def tiny_slow(num_classes: int = 10) -> SlowCNN:
    """``tiny_cnn`` whose last block sleeps in the worker named by ``$AUGLOCAL_TEST_SLOW_RANK``."""
    return SlowCNN(num_classes)


def wide_cnn(num_classes: int = 10, width: int = 4, depth: int = 2) -> nn.Sequential:
    """A plain ``nn.Sequential`` whose ``width`` and ``depth`` are builder arguments: the file
    spec ``tests/_tiny_models.py:wide_cnn`` for ``model_kwargs`` and weights-file tests."""
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class _Stage(nn.Module):
    """A residual conv block that first adds a position encoding it shares (CoaT's ``cpe``)."""

    def __init__(self, channels: int, cpe: nn.Module, batch_norm: bool = True):
        super().__init__()
        self.cpe = cpe  # the same module object in every block of a stage
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x)
        return x + torch.relu(self.bn(self.conv(x)))


class _Mix(nn.Module):
    """A channel mix by a linear layer shared with the classifier (weights tied to the head)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class SharedNet(nn.Module):
    """Blocks sharing modules as CoaT's do: the blocks of a stage share one depthwise position
    encoding (``cpe1``, ``cpe2``), and a channel mix uses the classifier ``fc`` (its width is the
    number of classes). Blocks: stem, 2 stage-1 blocks, downsampling, stage-2 block, mix, 2
    stage-2 blocks; the head is pooling and ``fc``."""

    def __init__(self, num_classes: int = 10, width: int = 8, batch_norm: bool = True, stride: int = 2):
        super().__init__()
        wide = num_classes
        norm = nn.BatchNorm2d if batch_norm else (lambda _: nn.Identity())
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU())
        self.cpe1 = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.stage1 = nn.Sequential(_Stage(width, self.cpe1, batch_norm), _Stage(width, self.cpe1, batch_norm))
        self.down = nn.Sequential(nn.Conv2d(width, wide, 3, stride=stride, padding=1), norm(wide), nn.ReLU())
        self.cpe2 = nn.Conv2d(wide, wide, 3, padding=1, groups=wide)
        self.fc = nn.Linear(wide, num_classes)
        self.stage2 = nn.Sequential(*(_Mix(self.fc) if k == 1 else _Stage(wide, self.cpe2, batch_norm)
                                      for k in range(4)))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def shared_net(num_classes: int = 10) -> SharedNet:
    """Blocks sharing position encodings and a classifier (as CoaT's)."""
    return SharedNet(num_classes)


def shared_nobn(num_classes: int = 10) -> SharedNet:
    """:class:`SharedNet` without batch norm (per-process batch statistics would differ under DDP),
    of one width and resolution, so that no auxiliary copy needs a projection with batch norm."""
    return SharedNet(num_classes, width=num_classes, batch_norm=False, stride=1)
