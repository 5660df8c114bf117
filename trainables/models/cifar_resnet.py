"""The CIFAR ResNet family (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

6n+2 layers: a 3x3 stem at 16 channels, three stages of n BasicBlocks at widths 16/32/64 (stride 2 at the start
of stages 2 and 3), global average pooling and a linear classifier. Where the shape changes, the shortcut is a
1x1 convolution + BatchNorm (option B, as in ConvNet-AIG's and open_lth's CIFAR ResNets).
The blocks are kept in one flat list so that methods can attach exits, gates or lesions per block.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

DEPTHS = (20, 32, 56, 110)
WIDTHS = (16, 32, 64)


def blocks_per_stage(depth: int) -> int:
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return (depth - 2) // 6


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.residual(x))


class Stem(nn.Sequential):
    def __init__(self, cout: int) -> None:
        super().__init__(nn.Conv2d(3, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PoolLinear(nn.Module):
    """Global average pool, optional dropout, linear classifier: the final head and Elastic's exit heads."""

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        self.stem = Stem(widths[0])
        blocks, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(n):
                blocks.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.blocks = nn.ModuleList(blocks)
        self.block_widths = [b.conv2.out_channels for b in blocks]
        self.head = PoolLinear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
