"""CIFAR ResNet-18: the architecture of He et al. 2016 with the CIFAR stem, and its width multiplier."""

import pytest
import torch
from torch import nn

from shardwise.models import BasicBlock, ResNet, resnet18


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_full_width_matches_the_reference_parameter_count():
    # kuangliu/pytorch-cifar ResNet18 (the network behind most CIFAR optimizer tables): 11,173,962.
    assert n_params(resnet18()) == 11_173_962


def test_cifar_stem_and_stage_layout():
    m = resnet18()
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())
    stages = [m.layer1, m.layer2, m.layer3, m.layer4]
    assert [len(s) for s in stages] == [2, 2, 2, 2]
    assert all(isinstance(b, BasicBlock) for s in stages for b in s)
    assert [s[0].conv1.stride[0] for s in stages] == [1, 2, 2, 2]
    assert [s[-1].conv2.out_channels for s in stages] == [64, 128, 256, 512]
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    # 1 stem + 8 blocks x 2 + 3 projection shortcuts (where width or stride changes)
    assert len(convs) == 20 and sum(c.kernel_size == (1, 1) for c in convs) == 3


def test_resolution_through_the_stages():
    m = resnet18(width=0.125).eval()
    shapes = []
    for s in (m.layer1, m.layer2, m.layer3, m.layer4):
        s.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert shapes == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]


@pytest.mark.parametrize("width", [0.0625, 0.125, 0.5])
def test_width_scales_channels(width):
    m = resnet18(width=width, num_classes=7)
    assert m.conv1.out_channels == round(64 * width)
    assert m.linear.in_features == round(512 * width) and m.linear.out_features == 7
    # conv weights dominate and scale with width^2
    assert n_params(m) < 11_173_962 * width**2 * 1.1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="width"):
        resnet18(width=0)
    with pytest.raises(ValueError, match="num_classes"):
        ResNet(num_classes=0)


def test_deterministic_init_and_fits_a_tiny_batch():
    torch.manual_seed(0)
    a = resnet18(width=0.125)
    torch.manual_seed(0)
    b = resnet18(width=0.125)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 10
    opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(30):
        loss = nn.functional.cross_entropy(a(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first
