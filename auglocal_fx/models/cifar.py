"""CIFAR ResNets and VGG-19 as used by the AugLocal paper (after He et al. 2016 and InfoPro).

ResNet-(6n+2): a 3x3 stem with 16 channels, three stages of ``n`` basic blocks with 16, 32 and
64 channels, projection shortcuts (1x1 conv + BN) where the shape changes, global average
pooling and a linear classifier. VGG-19: sixteen 3x3 conv+BN+ReLU layers with max pooling,
global average pooling and a linear classifier.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Union

import torch
from torch import nn

__all__ = ["CifarResNet", "BasicBlock", "CifarVGG", "resnet32", "resnet110", "vgg19", "PAPER_MODELS"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``depth = 6n + 2``."""

    input_size = (3, 32, 32)  # read by auglocal_fx.specs.model_input_size

    def __init__(self, depth: int = 110, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, 16, n, 1)
        self.layer2 = self._make_layer(16, 32, n, 2)
        self.layer3 = self._make_layer(32, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


_VGG19_CFG: List[Union[int, str]] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
]


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 inputs."""

    input_size = (3, 32, 32)  # read by auglocal_fx.specs.model_input_size

    def __init__(self, cfg: List[Union[int, str]], num_classes: int = 10):
        super().__init__()
        layers: List[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32 (16 local blocks)."""
    return CifarResNet(32, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-110 (55 local blocks)."""
    return CifarResNet(110, num_classes)


def vgg19(num_classes: int = 10) -> CifarVGG:
    """CIFAR VGG-19 with batch norm (16 local blocks)."""
    return CifarVGG(_VGG19_CFG, num_classes)


PAPER_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet32": resnet32,
    "resnet110": resnet110,
    "vgg19": vgg19,
}
