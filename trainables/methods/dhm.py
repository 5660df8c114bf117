"""`dhm`: Dynamic Hierarchical Mimicking (Li and Chen, "Dynamic Hierarchical Mimicking Towards Consistent
Optimization Objectives", CVPR 2020, arXiv 2003.10739; code d-li14/DHM) on the CIFAR ResNet.

Side branches fork from the main network during training only (methods.md section 3):
  head 0  the main network (option-A shortcuts by default, as in the paper's code);
  head 1  forks after stage 2 and owns a fresh, wider stage 3 (`branch_width` x 64 channels, 2x by default);
  head 2  forks after stage 1 and owns fresh copies of stages 2 and 3;
each branch ends in global average pooling and a linear classifier. Head numbering follows the paper's code, and
`branches` keeps either fork alone. The loss is sum_i w_i CE_i + alpha sum_{i != j} T^2 KL(p_j^T || p_i^T), the
teacher p_j detached and both sides epsilon-smoothed; `dsl` (trainables/methods/dsl.py) is the same network with
alpha = 0, plain deep supervision.

Inference runs head 0 alone: the branches are train-only cost segments (they count in the training MACs, in no
exit's cost), and `drop_branches()` removes them, leaving a plain `resnet` whose state_dict loads as is.
Every head's accuracy is still evaluated (the branches are kept until the end of the trial) and logged as
val_acc_head_<i>/test_acc_head_<i>.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.models.cifar_resnet import (DEPTHS, SHORTCUTS, WIDTHS, CifarResNet, PoolLinear, block_segments,
                                            blocks_per_stage, init_weights, make_stage)
from trainables.outputs import MultiExitOutput

NAME = "dhm"
PAPER = ("Li, Chen. Dynamic Hierarchical Mimicking Towards Consistent Optimization Objectives. CVPR 2020, "
         "arXiv 2003.10739.")
FORKS = ("both", "stage2", "stage1")  # which branches exist: head 1 forks after stage 2, head 2 after stage 1
EPS = 1e-8  # the official probability smoothing
# The official branch depths [[stage-1 fork: stage 2, stage 3], [stage-2 fork: stage 3]] per backbone depth.
OFFICIAL_BRANCH_BLOCKS = {32: (5, 3, 5), 110: (9, 9, 18)}


@dataclasses.dataclass(frozen=True)
class BranchHparams(_Hparams):
    """The network shared by `dhm` and `dsl`, and the cross-entropy weights of its heads."""

    depth: int = hp(32, "CIFAR ResNet depth (6n+2); the paper's CIFAR runs use 32 and 110", choices=DEPTHS)
    shortcut: str = hp("A", "downsampling shortcut: A = parameter-free (the paper's code), B = 1x1 conv + BatchNorm",
                       choices=SHORTCUTS)
    branches: str = hp("both", "side branches: both (the paper), stage2 (head 1 only: a wide stage 3 after stage 2) "
                               "or stage1 (head 2 only: stages 2 and 3 after stage 1)", choices=FORKS)
    branch_blocks: tuple[int, ...] = hp((), "blocks of [head 2's stage 2, head 2's stage 3, head 1's stage 3]; "
                                            "empty = the official ones for depth 32/110 (5,3,5 / 9,9,18), "
                                            "else (ceil(n/2), ceil(n/2), n)", low=1, high=400)
    branch_width: float = hp(2.0, "width of head 1's stage 3 as a multiple of the main stage 3 (64 channels)",
                             low=0.25, high=4.0)
    aux_weights: tuple[float, ...] = hp((), "cross-entropy weights of head 1 and head 2 (an absent head's is "
                                            "ignored); empty = 1 each (the paper); head 0's weight is 1",
                                        low=0.0, high=10.0)

    def validate(self) -> None:
        if self.branch_blocks and len(self.branch_blocks) != 3:
            raise ConfigError(f"branch_blocks={list(self.branch_blocks)} must have 3 values: head 2's stage 2, "
                              "head 2's stage 3, head 1's stage 3 (or be empty for the default)")
        if self.shortcut == "A" and 1 in side_heads(self) and head1_width(self) < WIDTHS[1]:
            raise ConfigError(f"branch_width={self.branch_width} gives head 1 {head1_width(self)} channels, fewer than "
                              f"its input's {WIDTHS[1]}, which the option-A shortcut cannot do (use >= 0.5)")
        if self.aux_weights and len(self.aux_weights) != 2:
            raise ConfigError(f"aux_weights={list(self.aux_weights)} must have 2 values, the weights of head 1 and "
                              "head 2 (or be empty for 1 each)")


@dataclasses.dataclass(frozen=True)
class Hparams(BranchHparams):
    alpha: float = hp(1.0, "weight alpha of the mimicking (KL) terms; 0 makes it dsl", low=0.0, high=100.0)
    temperature: float = hp(1.0, "softmax temperature T of the mimicking terms (they are scaled by T^2)",
                            low=0.05, high=100.0)


def num_exits(hp: BranchHparams) -> int:
    return 1


def side_heads(hp: BranchHparams) -> list[int]:
    return {"both": [1, 2], "stage2": [1], "stage1": [2]}[hp.branches]


def head1_width(hp: BranchHparams) -> int:
    return max(1, round(WIDTHS[2] * hp.branch_width))


def branch_blocks(hp: BranchHparams) -> tuple[int, int, int]:
    if hp.branch_blocks:
        return tuple(hp.branch_blocks)  # type: ignore[return-value]
    if hp.depth in OFFICIAL_BRANCH_BLOCKS:
        return OFFICIAL_BRANCH_BLOCKS[hp.depth]
    n = blocks_per_stage(hp.depth)
    return (math.ceil(n / 2), math.ceil(n / 2), n)


def head_weights(hp: BranchHparams) -> list[float]:
    """CE weight per head, in the order of the logits the loss sees: head 0, then the side heads."""
    weights = hp.aux_weights or (1.0, 1.0)
    return [1.0] + [weights[h - 1] for h in side_heads(hp)]


class Branch(nn.Module):
    """Fresh residual stages grown from a fork point of the main network, then pooling and a classifier."""

    def __init__(self, cin: int, stages: list[tuple[int, int]], num_classes: int, shortcut: str) -> None:
        super().__init__()
        blocks = []
        for width, n in stages:
            blocks += make_stage(cin, width, n, 2, shortcut)
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = PoolLinear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class DeeplySupervisedResNet(nn.Module):
    def __init__(self, hp: BranchHparams, num_classes: int) -> None:
        super().__init__()
        self.net = CifarResNet(hp.depth, num_classes, shortcut=hp.shortcut)
        n = self.net.blocks_per_stage
        b2_stage2, b2_stage3, b1_stage3 = branch_blocks(hp)
        branches = {}
        if 1 in side_heads(hp):
            branches["1"] = Branch(WIDTHS[1], [(head1_width(hp), b1_stage3)], num_classes, hp.shortcut)
        if 2 in side_heads(hp):
            branches["2"] = Branch(WIDTHS[0], [(WIDTHS[1], b2_stage2), (WIDTHS[2], b2_stage3)], num_classes,
                                   hp.shortcut)
        self.branches = nn.ModuleDict(branches)
        self.fork_after = {"1": 2 * n - 1, "2": n - 1}  # the main block whose output each branch reads

    @property
    def side_heads(self) -> list[int]:
        """Ids of the side heads present, in the order of `aux["side_logits"]`."""
        return sorted(int(h) for h in self.branches)

    def drop_branches(self) -> None:
        """Discard the side branches: what is left is the plain network (head 0) that inference runs."""
        self.branches = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        x = self.net.stem(x)
        side = {}
        for i, block in enumerate(self.net.blocks):
            x = block(x)
            for h, branch in self.branches.items():
                if self.fork_after[h] == i:
                    side[int(h)] = branch(x)
        out = MultiExitOutput([self.net.head(x)])
        if side:
            out.aux["side_logits"] = torch.stack([side[h] for h in sorted(side)])
        return out

    def segments(self) -> list[Segment]:
        segs = [Segment("stem", self.net.stem)]
        for i, block in enumerate(self.net.blocks):
            segs += block_segments(f"block{i}", block)
            for h, branch in self.branches.items():
                if self.fork_after[h] == i:
                    segs.append(Segment(f"branch{h}", branch, train_only=True, side=int(h)))
        return segs + [Segment("head", self.net.head, exit=0)]

    def lesion_units(self):
        return self.net.lesion_units()


def build(hp: BranchHparams, num_classes: int) -> DeeplySupervisedResNet:
    return DeeplySupervisedResNet(hp, num_classes)


def mimic_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * batch mean of KL(p_teacher^T || p_student^T) with epsilon-smoothed probabilities (the official
    `KLDivLoss`). The caller detaches the teacher."""
    c = student.shape[-1]
    p = (F.softmax(teacher.float() / temperature, -1) + EPS) / (1 + c * EPS)
    q = (F.softmax(student.float() / temperature, -1) + EPS) / (1 + c * EPS)
    return temperature ** 2 * (p * (p.log() - q.log())).sum(-1).mean()


def supervised_loss(logits: list[torch.Tensor], y: torch.Tensor, weights: list[float], alpha: float,
                    temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """sum_i w_i CE(z_i, y) + alpha * sum_{i != j} mimic_kl(student z_i, teacher z_j detached)."""
    loss = sum(w * F.cross_entropy(z, y, label_smoothing=label_smoothing) for w, z in zip(weights, logits))
    if alpha > 0:
        loss = loss + alpha * sum(mimic_kl(zi, zj.detach(), temperature)
                                  for i, zi in enumerate(logits) for j, zj in enumerate(logits) if i != j)
    return loss


def head_logits(out: MultiExitOutput) -> list[torch.Tensor]:
    """Head 0's logits, then every side head's."""
    side = out.aux.get("side_logits")
    return [out.final] + (list(side.unbind(0)) if side is not None else [])


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return supervised_loss(head_logits(out), y, head_weights(hp), hp.alpha, hp.temperature, label_smoothing)
