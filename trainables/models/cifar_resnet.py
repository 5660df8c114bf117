"""The CIFAR ResNet family (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

6n+2 layers: a 3x3 stem at 16 channels, three stages of n BasicBlocks at widths 16/32/64 (stride 2 at the start
of stages 2 and 3), global average pooling and a linear classifier. Where the shape changes, the shortcut is a
1x1 convolution + BatchNorm (option B, as in ConvNet-AIG's and open_lth's CIFAR ResNets) or parameter-free
(option A as DHM's code builds it: 2x2 average pooling, then zero channels appended).
The blocks are kept in one flat list so that methods can attach exits, gates or lesions per block.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment

DEPTHS = (20, 32, 56, 110)
WIDTHS = (16, 32, 64)
SHORTCUTS = ("B", "A")  # He et al.'s options: B = 1x1 conv + BN projection, A = parameter-free


def blocks_per_stage(depth: int) -> int:
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return (depth - 2) // 6


class ZeroPadShortcut(nn.Module):
    """Option A: 2x2 average pooling (stride 2), then `cout - cin` zero channels appended after the input's.
    No parameters and no MACs; the zeros are made on the input's device (DHM's code hard-codes .cuda())."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.extra = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    """relu(shortcut(x) + residual(x)), with the switches the residual-block studies need:

    gate            (forward argument) a 0/1 decision per sample (ConvNet-AIG): `execution="skip"` runs the
                    branch on the open samples only and scatters the result back, "mask" computes it for all
                    and multiplies by the gate (the only way gradients reach the gate in training).
    lesioned        the residual branch is deleted (test time, Veit et al. 2016): relu(shortcut(x)) only.
    survival        stochastic depth (Huang et al. 2016): in training the branch runs with probability
                    `survival`, per minibatch (`drop_mode="batch"`, the paper) or per sample ("sample"); a
                    dropped branch is not computed (per sample: the branch runs on the kept sub-batch only).
                    At test time the branch is scaled by `survival`, as in the paper.
    """

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "B") -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                      nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if shortcut == "A":
                if stride != 2 or cout < cin:
                    raise ValueError(f"the option-A shortcut needs stride 2 and cout >= cin, got {stride}, {cin}->{cout}")
                self.shortcut = ZeroPadShortcut(cin, cout)
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.cin, self.cout, self.stride = cin, cout, stride
        self.lesioned = False
        self.survival = 1.0
        self.drop_mode = "batch"

    @property
    def downsamples(self) -> bool:
        return not isinstance(self.shortcut, nn.Identity)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None, execution: str = "skip") -> torch.Tensor:
        if self.lesioned:
            return F.relu(self.shortcut(x))
        if gate is not None:
            if execution == "mask":
                return F.relu(self.shortcut(x) + gate.view(-1, 1, 1, 1) * self.residual(x))
            open_ = gate.nonzero().squeeze(1)
            if len(open_) == len(gate):
                return F.relu(self.shortcut(x) + self.residual(x))
            out = self.shortcut(x)
            if len(open_):
                out = out.index_add(0, open_, self.residual(x.index_select(0, open_)))
            return F.relu(out)
        if self.survival < 1.0:
            if not self.training:
                return F.relu(self.shortcut(x) + self.survival * self.residual(x))
            if self.drop_mode == "batch":
                if torch.rand(()) >= self.survival:
                    return F.relu(self.shortcut(x))
            else:
                keep = (torch.rand(x.shape[0], device=x.device) < self.survival).nonzero().squeeze(1)
                return F.relu(self.shortcut(x).index_add(0, keep, self.residual(x.index_select(0, keep))))
        return F.relu(self.shortcut(x) + self.residual(x))


def make_stage(cin: int, width: int, blocks: int, stride: int, shortcut: str = "B") -> list[BasicBlock]:
    """`blocks` BasicBlocks at `width`, the first with `stride`."""
    return [BasicBlock(cin if i == 0 else width, width, stride if i == 0 else 1, shortcut) for i in range(blocks)]


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, BatchNorm at identity; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def block_segments(name: str, block: nn.Module, **residual_kw) -> list[Segment]:
    """Cost segments of one residual block: its projection shortcut (when it has one) and its residual branch,
    apart, because gating, stochastic depth and lesions act on the branch alone."""
    segs = [Segment(f"{name}.shortcut", block.shortcut)] if block.downsamples else []
    return segs + [Segment(f"{name}.residual", block.residual, **residual_kw)]


def linear_survival(num_blocks: int, survival_last: float) -> list[float]:
    """Stochastic depth's linear decay: p_l = 1 - (l / L)(1 - p_L) for blocks l = 1..L."""
    return [1.0 - (l / num_blocks) * (1.0 - survival_last) for l in range(1, num_blocks + 1)]


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
    def __init__(self, depth: int, num_classes: int, widths: tuple[int, ...] = WIDTHS, shortcut: str = "B") -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        self.blocks_per_stage = n
        self.stem = Stem(widths[0])
        blocks, cin = [], widths[0]
        for stage, width in enumerate(widths):
            blocks += make_stage(cin, width, n, 2 if stage > 0 else 1, shortcut)
            cin = width
        self.blocks = nn.ModuleList(blocks)
        self.block_widths = [b.cout for b in blocks]
        self.head = PoolLinear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def lesion_units(self) -> "LesionUnits":
        return residual_lesion_units(self.blocks)


@dataclasses.dataclass(frozen=True)
class LesionUnits:
    """What a lesion study may act on (trainables/lesion.py): `container` lists the units in execution order;
    `deletable` are the positions whose unit has a `lesioned` switch; `swap_groups` are groups of positions
    whose units take and give tensors of one shape, so any two of a group may trade places."""

    container: nn.ModuleList
    deletable: tuple[int, ...]
    swap_groups: tuple[tuple[int, ...], ...]


def residual_lesion_units(blocks: nn.ModuleList) -> LesionUnits:
    """Every block can lose its branch (a downsampling block keeps its projection); blocks of one stage with an
    identity shortcut can be reordered."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(blocks):
        if not b.downsamples:
            groups.setdefault(b.cout, []).append(i)
    return LesionUnits(blocks, tuple(range(len(blocks))), tuple(tuple(g) for g in groups.values() if len(g) > 1))
