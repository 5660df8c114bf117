"""`resnet`: the plain CIFAR ResNet (He et al., CVPR 2016), a single-exit baseline for every dynamic method."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment
from trainables.hparams import Hparams as _Hparams, hp
from trainables.models.cifar_resnet import DEPTHS, CifarResNet
from trainables.outputs import MultiExitOutput

NAME = "resnet"
PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016."


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    depth: int = hp(20, "CIFAR ResNet depth (6n+2)", choices=DEPTHS)


def num_exits(hp: Hparams) -> int:
    return 1


class ResNet(nn.Module):
    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        self.net = CifarResNet(hp.depth, num_classes)

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        return MultiExitOutput([self.net(x)])

    def segments(self) -> list[Segment]:
        return ([Segment("stem", self.net.stem)]
                + [Segment(f"block{i}", b) for i, b in enumerate(self.net.blocks)]
                + [Segment("head", self.net.head, exit=0)])


def build(hp: Hparams, num_classes: int) -> ResNet:
    return ResNet(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.final, y, label_smoothing=label_smoothing)
