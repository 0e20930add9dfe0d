"""Small reusable layers (MMSegmentation's ConvModule conventions: no conv bias when a norm follows)."""
from __future__ import annotations

from torch import nn


class ConvBNReLU(nn.Sequential):
    """Conv -> BatchNorm -> ReLU, 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, dilation: int = 1,
                 groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise k×k conv + BN + ReLU, then pointwise 1×1 conv + BN + ReLU (DeepLabV3+)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, dilation: int = 1):
        super().__init__()
        self.depthwise = ConvBNReLU(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels)
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1)


