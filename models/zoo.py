"""A registry of BN-equipped architectures covering every fold pattern and every skip case.

Each entry has a factory and a default input shape (batch first). The networks are small so tests run in
seconds on a CPU; ``resnet50`` is the full-size ResNet-50 (25.6 M parameters) for benchmarks.

    from bnfold.models import zoo
    model = zoo.create("small_resnet")
    shape = zoo.get("small_resnet").input_shape
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str
    #: BatchNorms that cannot be folded in this architecture (by design: pre-activation BN and the like)
    unfoldable_bn: int = 0


_REGISTRY: dict[str, ZooEntry] = {}


def register(name: str, input_shape: tuple[int, ...], description: str, unfoldable_bn: int = 0):
    def deco(factory):
        _REGISTRY[name] = ZooEntry(name, factory, tuple(input_shape), description, unfoldable_bn)
        return factory
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ZooEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown zoo model '{name}'; known: {', '.join(names())}")
    return _REGISTRY[name]


def create(name: str) -> nn.Module:
    return get(name).factory()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics (in place), as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.3)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=True, dims=2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), bn(cout)]
    if act:
        layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ the paper
@register("mnist_mlp", (1, 64), "the paper's MNIST network: 3 x 100 sigmoid units, BN before each nonlinearity "
          "(64 inputs for the 8x8 digits)")
class MnistMLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 100, classes: int = 10, bn: bool = True):
        super().__init__()
        layers = []
        d = in_features
        for _ in range(3):
            layers += [nn.Linear(d, hidden), nn.BatchNorm1d(hidden) if bn else nn.Identity(), nn.Sigmoid()]
            d = hidden
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.features(x.flatten(1)))


# ------------------------------------------------------------------------------------------------ ResNet
def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """ResNet's projection shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = _shortcut(cin, cout, stride)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = _shortcut(cin, cout, stride)

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + idt)


class ResNet(nn.Module):
    def __init__(self, block, layers, widths, classes=10, stem=16, in_ch=3, small_stem=True):
        super().__init__()
        if small_stem:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_ch, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        stages, cin = [], stem
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blk = block(cin, w, 2 if (j == 0 and i > 0) else 1)
                blocks.append(blk)
                cin = w * getattr(block, "expansion", 1)
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@register("small_resnet", (1, 3, 32, 32), "ResNet with basic blocks and projection shortcuts")
def small_resnet():
    return ResNet(BasicBlock, [1, 1, 1], [16, 32, 64])


@register("resnet18", (1, 3, 224, 224), "ResNet-18 (11.7 M parameters, ImageNet layout)")
def resnet18():
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], classes=1000, stem=64, small_stem=False)


@register("resnet50", (1, 3, 224, 224), "ResNet-50 (25.6 M parameters, ImageNet layout)")
def resnet50():
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], classes=1000, stem=64, small_stem=False)


# ------------------------------------------------------------------------------------------------ MobileNet / EfficientNet
class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, se=False):
        super().__init__()
        hid = cin * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn(cin, hid, 1))
        layers.append(conv_bn(hid, hid, 3, stride, groups=hid))  # depthwise
        self.body = nn.Sequential(*layers)
        self.se = None
        if se:
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hid, max(1, hid // 4), 1), nn.SiLU(),
                                    nn.Conv2d(max(1, hid // 4), hid, 1), nn.Sigmoid())
        self.project = conv_bn(hid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        if self.se is not None:
            y = y * self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


@register("mobilenet", (1, 3, 32, 32), "MobileNet-V2-style: depthwise separable convs and inverted residuals")
def mobilenet(se=False):
    return nn.Sequential(conv_bn(3, 16, 3, 2), InvertedResidual(16, 16, 1, 1, se), InvertedResidual(16, 24, 2, 4, se),
                         InvertedResidual(24, 24, 1, 4, se), conv_bn(24, 64, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


@register("efficientnet", (1, 3, 32, 32), "EfficientNet-style: MBConv with squeeze-excitation and SiLU")
def efficientnet():
    return mobilenet(se=True)


# ------------------------------------------------------------------------------------------------ DenseNet / Inception
class DenseLayer(nn.Module):
    """DenseNet's BN-ReLU-Conv1x1-BN-ReLU-Conv3x3: the first BN follows a concat (not foldable)."""

    def __init__(self, cin, growth):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(torch.relu(self.bn2(y)))], 1)


@register("densenet", (1, 3, 32, 32), "DenseNet-style dense block (pre-activation BN after concat)", unfoldable_bn=3)
def densenet():
    return nn.Sequential(conv_bn(3, 16), DenseLayer(16, 8), DenseLayer(24, 8), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class InceptionBlock(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b1 = conv_bn(cin, 16, 1)
        self.b2 = nn.Sequential(conv_bn(cin, 12, 1), conv_bn(12, 16, 3))
        self.b3 = nn.Sequential(conv_bn(cin, 8, 1), conv_bn(8, 12, 3), conv_bn(12, 12, 3))
        self.b4 = nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(cin, 8, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


@register("inception", (1, 3, 32, 32), "BN-Inception-style network (the paper's ImageNet architecture, small)")
def inception():
    return nn.Sequential(conv_bn(3, 32, 3, 2), InceptionBlock(32), InceptionBlock(52), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(52, 10))


# ------------------------------------------------------------------------------------------------ U-Net, 1-D, 3-D
class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = conv_bn(3, 8)
        self.enc2 = conv_bn(8, 16, 3, 2)
        self.up = nn.ConvTranspose2d(16, 8, 2, 2, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.up_g = nn.ConvTranspose2d(8, 8, 3, 1, 1, groups=2)  # grouped ConvTranspose with bias
        self.up_g_bn = nn.BatchNorm2d(8)
        self.dec = conv_bn(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        u = torch.relu(self.up_g_bn(self.up_g(torch.relu(self.up_bn(self.up(self.enc2(e1)))))))
        return self.out(self.dec(torch.cat([e1, u], 1)))


@register("unet", (1, 3, 32, 32), "U-Net-style decoder with ConvTranspose+BN (grouped too)")
def unet():
    return UNet()


@register("conv1d", (1, 4, 64), "1-D conv net (audio/time series) with BatchNorm1d on (N, C, L)")
def conv1d():
    return nn.Sequential(conv_bn(4, 16, 5, dims=1), conv_bn(16, 32, 3, 2, dims=1), conv_bn(32, 32, 3, groups=32, dims=1),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 5))


@register("conv3d", (1, 2, 8, 16, 16), "3-D conv net (video/volumes) with BatchNorm3d")
def conv3d():
    return nn.Sequential(conv_bn(2, 8, 3, dims=3), conv_bn(8, 16, 3, 2, dims=3), nn.AdaptiveAvgPool3d(1),
                         nn.Flatten(), nn.Linear(16, 4))


# ------------------------------------------------------------------------------------------------ pre-activation, heads
class PreActBlock(nn.Module):
    """BN-ReLU-Conv (He et al. 2016): the BN follows a residual add, the conv follows a ReLU: not foldable."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(y)))


@register("preact_resnet", (1, 3, 32, 32), "pre-activation (BN-ReLU-Conv) residual net", unfoldable_bn=3)
def preact_resnet():
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), PreActBlock(16), PreActBlock(16), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


@register("bn_head", (1, 3, 16, 16), "BN before a Linear head (forward fold) and BN before an unpadded conv")
def bn_head():
    return nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 10))


@register("mlp_bn", (2, 32), "MLP with Linear+BatchNorm1d (backward) and BatchNorm1d+Linear (forward)")
def mlp_bn():
    return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 10))
