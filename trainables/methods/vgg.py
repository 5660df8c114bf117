"""`vgg`: the plain (non-residual) CIFAR VGG with BatchNorm (Simonyan & Zisserman, ICLR 2015; the CIFAR variant
with BN and a single linear classifier), the control of the lesion study: residual networks degrade smoothly
when blocks are deleted, a plain network collapses (Veit, Wilber, Belongie, NeurIPS 2016).

Each 3x3 conv -> BN -> ReLU is one unit; a unit whose input and output widths agree can be deleted (it becomes
the identity) or swapped with another unit of the same width between the same poolings.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment
from trainables.hparams import Hparams as _Hparams, hp
from trainables.models.cifar_resnet import LesionUnits, PoolLinear
from trainables.outputs import MultiExitOutput

NAME = "vgg"
PAPER = ("Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image Recognition. ICLR 2015 "
         "(CIFAR variant with BatchNorm).")
CONFIGS = {11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
           16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")}


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    depth: int = hp(16, "VGG depth (weight layers)", choices=tuple(CONFIGS))


def num_exits(hp: Hparams) -> int:
    return 1


class ConvUnit(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.cin, self.cout = cin, cout
        self.lesioned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lesioned:
            return x
        return F.relu(self.bn(self.conv(x)))


class VGG(nn.Module):
    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        units, cin = [], 3
        for v in CONFIGS[hp.depth]:
            if v == "M":
                units.append(nn.MaxPool2d(2))
            else:
                units.append(ConvUnit(cin, v))
                cin = v
        self.units = nn.ModuleList(units)
        self.head = PoolLinear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        for unit in self.units:
            x = unit(x)
        return MultiExitOutput([self.head(x)])

    def segments(self) -> list[Segment]:
        return [Segment(f"unit{i}", u) for i, u in enumerate(self.units)] + [Segment("head", self.head, exit=0)]

    def lesion_units(self) -> LesionUnits:
        deletable = [i for i, u in enumerate(self.units) if isinstance(u, ConvUnit) and u.cin == u.cout]
        groups, current = [], []
        for i, u in enumerate(self.units):
            if isinstance(u, nn.MaxPool2d):
                groups.append(current)
                current = []
            elif i in deletable:
                current.append(i)
        groups.append(current)
        return LesionUnits(self.units, tuple(deletable), tuple(tuple(g) for g in groups if len(g) > 1))


def build(hp: Hparams, num_classes: int) -> VGG:
    return VGG(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.final, y, label_smoothing=label_smoothing)
