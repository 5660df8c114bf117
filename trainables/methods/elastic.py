"""`elastic`: Elastic neural networks (Zhou, Bai, Bhattacharyya, Huttunen, "Elastic Neural Networks for
Classification", AICAS 2019, arXiv 1810.00589) on the CIFAR ResNet or a torchvision backbone.

An intermediate classifier (global average pool -> dropout -> linear) after every block but the last, whose
place the network's own classifier takes; the loss is sum_i w_i * CE_i over all exits. Any exit can answer at
inference, statically or through an early-exit policy (trainables/policies.py). Unlike the official code the
heads use adaptive pooling (theirs was hard-coded for 224-px inputs) and one forward pass feeds one summed loss.

Backbones (`model.backbone`): the CIFAR ResNet (6n+2, `model.depth`; a head after every residual block), or
torchvision's ResNet-18 (a head after each of its 8 BasicBlocks), MobileNetV2 (17 inverted-residual blocks),
DenseNet-121 (4 dense blocks, each with its transition) or VGG16-BN (5 conv groups), adapted to 32x32 inputs
as trainables/models/torchvision_backbones.py describes. The paper fine-tunes ImageNet-pretrained backbones:
`model.pretrained` names a local torchvision state_dict file to start from (nothing is ever downloaded);
without one the backbone trains from scratch, and the trial's notes say so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from trainables.cost import Segment
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.models import torchvision_backbones as tvb
from trainables.models.cifar_resnet import DEPTHS, CifarResNet, PoolLinear, block_segments, blocks_per_stage
from trainables.outputs import MultiExitOutput, weighted_ce

NAME = "elastic"
PAPER = "Zhou, Bai, Bhattacharyya, Huttunen. Elastic Neural Networks for Classification. AICAS 2019."
WEIGHT_SCHEMES = ("uniform", "linear", "independent")
BACKBONES = ("cifar_resnet",) + tvb.BACKBONES


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    backbone: str = hp("cifar_resnet", "the network the exits attach to: the CIFAR ResNet (model.depth) or a "
                       "torchvision model adapted to 32x32 inputs", choices=BACKBONES)
    depth: int = hp(20, "CIFAR ResNet depth (6n+2); backbone=cifar_resnet only", choices=DEPTHS)
    weights: str = hp("uniform", "loss weights: uniform (all 1, the paper), linear in depth ((k+1)/K), "
                      "or independent (exit_weights)", choices=WEIGHT_SCHEMES)
    exit_weights: tuple[float, ...] = hp((), "independent scheme: one loss weight per exit, shallow to deep",
                                         low=0.0, high=100.0)
    head_dropout: float = hp(0.2, "dropout before each intermediate classifier", low=0.0, high=0.9)
    width: float = hp(1.0, "width multiplier of a torchvision backbone that can scale (mobilenet_v2, densenet121, "
                      "vgg16_bn), for small test sizes; 1 = the standard model", low=0.05, high=4.0)
    pretrained: str = hp("", "absolute path of a local torchvision ImageNet state_dict for the backbone (its "
                         "classifier is not loaded); empty = train from scratch")

    def validate(self) -> None:
        if self.backbone != "cifar_resnet" and self.depth != 20:
            raise ConfigError(f"depth={self.depth} applies only to backbone=cifar_resnet (got backbone="
                              f"{self.backbone}, whose depth is fixed)")
        if self.width != 1.0 and self.backbone not in tvb.SCALABLE:
            raise ConfigError(f"width={self.width} is not supported by backbone={self.backbone}; backbones with "
                              f"a width: {', '.join(tvb.SCALABLE)}")
        if self.pretrained:
            # Whether the file exists is checked when the model is built, on the machine that trains it: a
            # stored configuration stays readable where the file is not.
            if self.backbone == "cifar_resnet":
                raise ConfigError(f"pretrained={self.pretrained!r} needs a torchvision backbone (one of: "
                                  f"{', '.join(tvb.BACKBONES)}); cifar_resnet has no ImageNet weights")
            if not Path(self.pretrained).is_absolute():
                raise ConfigError(f"pretrained={self.pretrained!r} is not an absolute path")
            if self.width != 1.0:
                raise ConfigError(f"pretrained={self.pretrained!r} needs width=1.0 (got {self.width}): ImageNet "
                                  "weights have the standard model's shapes")
        k = num_exits(self)
        if self.weights == "independent" and len(self.exit_weights) != k:
            size = f"depth {self.depth}" if self.backbone == "cifar_resnet" else f"backbone {self.backbone}"
            raise ConfigError(f"exit_weights has {len(self.exit_weights)} values; {size} has {k} exits "
                              "(give one weight per exit with weights=independent)")
        if self.weights != "independent" and self.exit_weights:
            raise ConfigError(f"exit_weights is only used with weights=independent (got weights={self.weights})")


def num_exits(hp: Hparams) -> int:
    if hp.backbone == "cifar_resnet":
        return 3 * blocks_per_stage(hp.depth)
    return tvb.NUM_BLOCKS[hp.backbone]


def exit_weights(hp: Hparams) -> list[float]:
    k = num_exits(hp)
    if hp.weights == "uniform":
        return [1.0] * k
    if hp.weights == "linear":
        return [(i + 1) / k for i in range(k)]
    return list(hp.exit_weights)


class Elastic(nn.Module):
    """On the CIFAR ResNet."""

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


class TorchvisionElastic(nn.Module):
    """On a torchvision backbone: `net` is the torchvision model itself (its state_dict keys are torchvision's,
    under `net.`), run block by block so that a head can read every block's output; `net(x)` alone gives the
    last exit's logits."""

    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        cut = tvb.build(hp.backbone, num_classes, hp.width, hp.pretrained)
        self.net = cut.net
        self.heads = nn.ModuleList(PoolLinear(w, num_classes, hp.head_dropout) for w in cut.widths[:-1])
        self.pool = tvb.GlobalPool(cut.relu_before_pool)
        # The execution plan refers to modules registered under `net`; plain lists keep them out of the
        # module tree (registered twice, they would appear twice in the state_dict).
        self._stem, self._blocks, self._pre_pool = cut.stem, cut.blocks, cut.pre_pool
        self._classifier = cut.classifier
        self.backbone = hp.backbone
        if hp.pretrained:
            self.notes = [f"{hp.backbone}: pretrained weights from {hp.pretrained} (all but the classifier, "
                          f"which starts from scratch for {num_classes} classes)"]
        else:
            self.notes = [f"{hp.backbone}: trained from scratch (no model.pretrained file given; the paper "
                          "fine-tunes ImageNet weights)"]

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        for _, m in self._stem:
            x = m(x)
        logits = []
        for i, block in enumerate(self._blocks):
            for _, m in block:
                x = m(x)
            if i < len(self.heads):
                logits.append(self.heads[i](x))
        for _, m in self._pre_pool:
            x = m(x)
        logits.append(self._classifier[1](self.pool(x)))
        return MultiExitOutput(logits)

    def segments(self) -> list[Segment]:
        segs = [Segment(n, m) for n, m in self._stem]
        for i, block in enumerate(self._blocks):
            segs += [Segment(n, m) for n, m in block]
            if i < len(self.heads):
                segs.append(Segment(f"head{i}", self.heads[i], exit=i))
        segs += [Segment(n, m) for n, m in self._pre_pool]
        segs.append(Segment("pool", self.pool))
        segs.append(Segment(self._classifier[0], self._classifier[1], exit=len(self._blocks) - 1))
        return segs

    def lesion_units(self):
        raise ConfigError(f"the lesion study needs model.backbone=cifar_resnet; the {self.backbone} backbone "
                          "offers no units to delete")


def build(hp: Hparams, num_classes: int) -> nn.Module:
    if hp.backbone == "cifar_resnet":
        return Elastic(hp, num_classes)
    return TorchvisionElastic(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return weighted_ce(out.logits, y, exit_weights(hp), label_smoothing)
