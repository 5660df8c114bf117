"""`elastic`: Elastic neural networks (Zhou, Bai, Bhattacharyya, Huttunen, "Elastic Neural Networks for
Classification", AICAS 2019, arXiv 1810.00589) on the CIFAR ResNet.

An intermediate classifier (global average pool -> dropout -> linear) after every residual block but the last,
whose place the network's own classifier takes; the loss is sum_i w_i * CE_i over all exits. Any exit can answer
at inference, statically or through an early-exit policy (trainables/policies.py). Unlike the official code the
heads use adaptive pooling (theirs was hard-coded for 224-px inputs) and one forward pass feeds one summed loss.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.models.cifar_resnet import DEPTHS, CifarResNet, PoolLinear, block_segments, blocks_per_stage
from trainables.outputs import MultiExitOutput

NAME = "elastic"
PAPER = "Zhou, Bai, Bhattacharyya, Huttunen. Elastic Neural Networks for Classification. AICAS 2019."
WEIGHT_SCHEMES = ("uniform", "linear", "independent")


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    depth: int = hp(20, "CIFAR ResNet depth (6n+2)", choices=DEPTHS)
    weights: str = hp("uniform", "loss weights: uniform (all 1, the paper), linear in depth ((k+1)/K), "
                      "or independent (exit_weights)", choices=WEIGHT_SCHEMES)
    exit_weights: tuple[float, ...] = hp((), "independent scheme: one loss weight per exit, shallow to deep",
                                         low=0.0, high=100.0)
    head_dropout: float = hp(0.2, "dropout before each intermediate classifier", low=0.0, high=0.9)

    def validate(self) -> None:
        k = num_exits(self)
        if self.weights == "independent" and len(self.exit_weights) != k:
            raise ConfigError(f"exit_weights has {len(self.exit_weights)} values; depth {self.depth} has {k} exits "
                              "(give one weight per exit with weights=independent)")
        if self.weights != "independent" and self.exit_weights:
            raise ConfigError(f"exit_weights is only used with weights=independent (got weights={self.weights})")


def num_exits(hp: Hparams) -> int:
    return 3 * blocks_per_stage(hp.depth)


def exit_weights(hp: Hparams) -> list[float]:
    k = num_exits(hp)
    if hp.weights == "uniform":
        return [1.0] * k
    if hp.weights == "linear":
        return [(i + 1) / k for i in range(k)]
    return list(hp.exit_weights)


class Elastic(nn.Module):
    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        self.net = CifarResNet(hp.depth, num_classes)
        self.heads = nn.ModuleList(PoolLinear(w, num_classes, hp.head_dropout) for w in self.net.block_widths[:-1])

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        x = self.net.stem(x)
        logits = []
        for i, block in enumerate(self.net.blocks):
            x = block(x)
            logits.append(self.heads[i](x) if i < len(self.heads) else self.net.head(x))
        return MultiExitOutput(logits)

    def segments(self) -> list[Segment]:
        segs = [Segment("stem", self.net.stem)]
        for i, block in enumerate(self.net.blocks):
            segs += block_segments(f"block{i}", block)
            head = self.heads[i] if i < len(self.heads) else self.net.head
            segs.append(Segment(f"head{i}", head, exit=i))
        return segs

    def lesion_units(self):
        return self.net.lesion_units()


def build(hp: Hparams, num_classes: int) -> Elastic:
    return Elastic(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return sum(w * F.cross_entropy(z, y, label_smoothing=label_smoothing)
               for w, z in zip(exit_weights(hp), out.logits))
