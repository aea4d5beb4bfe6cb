"""Models trained by the recipes that are not Hugging Face models: a CIFAR ResNet-18 in plain torch."""

from shardwise.models.resnet import BasicBlock, ResNet, resnet18

__all__ = ["BasicBlock", "ResNet", "resnet18"]
