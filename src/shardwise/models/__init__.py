"""Models the recipes train: a CIFAR ResNet-18 in plain torch (``resnet``), and the config that says
which pretrained transformers model to load (``pretrained``, imported from there: it needs no torch)."""

from shardwise.models.resnet import BasicBlock, ResNet, ResNetConfig, resnet18

__all__ = ["BasicBlock", "ResNet", "ResNetConfig", "resnet18"]
