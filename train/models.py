"""Teacher and student networks: torchvision's and MobileNet V1 for 224 px, small CIFAR-style
ResNets for 32 px.

Nothing here downloads weights: torchvision models are built with ``weights=None`` (a pretrained
teacher is loaded by ``train.teacher``).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
from torch import nn


def init_convs(model: nn.Module) -> None:
    """He initialisation (fan-out, ReLU) of every convolution of ``model``, in module order."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class BasicBlock(nn.Module):
    """The two-conv residual block of He et al. (2016), CIFAR variant (1x1 conv shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: three stages of n blocks at widths (16, 32, 64) x ``width``.

    Global average pooling makes it work at any input size >= 8 px (32 px is its design point).
    """

    def __init__(self, depth: int, num_classes: int, width: int = 1):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers: List[nn.Module] = []
        in_channels = widths[0]
        for stage, out_channels in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class MobileNetV1(nn.Module):
    """MobileNet V1 (Howard et al., 2017) at width 1.0 for 224 px: a 3x3 convolution, then 13
    depthwise-separable blocks (3x3 depthwise + 1x1 pointwise, each with BatchNorm and ReLU),
    global average pooling and a linear classifier (4.2 M parameters with 1000 classes).
    torchvision has no MobileNet V1; this is the student of the ImageNet ResNet-50 -> MobileNet V1
    distillation benchmark."""

    # (output channels, stride) of each depthwise-separable block
    BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
        (1024, 2), (1024, 1)]

    def __init__(self, num_classes: int):
        super().__init__()

        def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int,
                    groups: int = 1) -> List[nn.Module]:
            return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2,
                              groups=groups, bias=False),
                    nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]

        layers = conv_bn(3, 32, 3, 2)
        in_channels = 32
        for out_channels, stride in self.BLOCKS:
            layers += conv_bn(in_channels, in_channels, 3, stride, groups=in_channels)
            layers += conv_bn(in_channels, out_channels, 1, 1)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _cifar(depth: int, width: int = 1) -> Callable[[int], nn.Module]:
    return lambda num_classes: CifarResNet(depth, num_classes, width)


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    return build


# name -> builder(num_classes). "xN" multiplies the CIFAR ResNet widths by N.
ARCHITECTURES: Dict[str, Callable[[int], nn.Module]] = {
    "cifar_resnet8": _cifar(8),
    "cifar_resnet14": _cifar(14),
    "cifar_resnet20": _cifar(20),
    "cifar_resnet32": _cifar(32),
    "cifar_resnet56": _cifar(56),
    "cifar_resnet8x2": _cifar(8, 2),
    "cifar_resnet14x2": _cifar(14, 2),
    "cifar_resnet20x2": _cifar(20, 2),
    "cifar_resnet8x4": _cifar(8, 4),
    "cifar_resnet32x4": _cifar(32, 4),
    "resnet18": _torchvision("resnet18"),
    "resnet34": _torchvision("resnet34"),
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v2": _torchvision("mobilenet_v2"),
    "mobilenet_v1": MobileNetV1,
}

# The input size each family is designed for (a run at another size works, but warns).
DESIGN_IMAGE_SIZE = {name: (32 if name.startswith("cifar_") else 224) for name in ARCHITECTURES}


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised ``arch`` with a ``num_classes``-way classifier (no weights downloaded)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return ARCHITECTURES[arch](num_classes)
