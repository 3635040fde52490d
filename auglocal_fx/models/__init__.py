"""The paper's CIFAR networks (32x32 inputs): ResNet-32, ResNet-110 and VGG-19."""

from .cifar import resnet32, resnet110, vgg19, PAPER_MODELS

__all__ = ["resnet32", "resnet110", "vgg19", "PAPER_MODELS"]
