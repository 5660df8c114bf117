"""`resnet`: the plain CIFAR ResNet (He et al., CVPR 2016), the single-exit baseline of every dynamic method, with
optional stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016).

Stochastic depth: block l's residual branch survives training with probability p_l = 1 - (l/L)(1 - p_L) (linear
decay to `survival_last` = p_L; 1 turns it off), drawn per minibatch as in the paper or per sample
(`drop_mode`; torchvision's "row" mode), and is scaled by p_l at test time. A dropped branch is not computed,
so the expected training MACs (logged as `train_macs`) are the executed fraction; the test-time cost is the
full network.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment
from trainables.hparams import Hparams as _Hparams, hp
from trainables.models.cifar_resnet import DEPTHS, SHORTCUTS, CifarResNet, block_segments, linear_survival
from trainables.outputs import MultiExitOutput

NAME = "resnet"
PAPER = ("He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016. Stochastic depth: Huang, "
         "Sun, Liu, Sedra, Weinberger. Deep Networks with Stochastic Depth. ECCV 2016.")
DROP_MODES = ("batch", "sample")


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    depth: int = hp(20, "CIFAR ResNet depth (6n+2)", choices=DEPTHS)
    survival_last: float = hp(1.0, "stochastic depth: survival probability p_L of the last block, decaying "
                                    "linearly from 1 (1 = no stochastic depth; the paper uses 0.5)",
                              low=0.05, high=1.0)
    drop_mode: str = hp("batch", "stochastic depth: drop a branch per minibatch (the paper) or per sample",
                        choices=DROP_MODES)
    shortcut: str = hp("B", "downsampling shortcut: B = 1x1 conv + BatchNorm, A = parameter-free (average pooling "
                            "+ zero channels, as dhm and dsl use by default)", choices=SHORTCUTS)


def num_exits(hp: Hparams) -> int:
    return 1


class ResNet(nn.Module):
    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        self.net = CifarResNet(hp.depth, num_classes, shortcut=hp.shortcut)
        for block, p in zip(self.net.blocks, linear_survival(len(self.net.blocks), hp.survival_last)):
            block.survival, block.drop_mode = p, hp.drop_mode

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        return MultiExitOutput([self.net(x)])

    def segments(self) -> list[Segment]:
        segs = [Segment("stem", self.net.stem)]
        for i, b in enumerate(self.net.blocks):
            segs += block_segments(f"block{i}", b, train_fraction=b.survival)
        return segs + [Segment("head", self.net.head, exit=0)]

    def lesion_units(self):
        return self.net.lesion_units()


def build(hp: Hparams, num_classes: int) -> ResNet:
    return ResNet(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.final, y, label_smoothing=label_smoothing)
