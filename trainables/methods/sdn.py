"""`sdn`: Shallow-Deep Networks (Kaya, Hong, Dumitras, "Shallow-Deep Networks: Understanding and Mitigating
Network Overthinking", ICML 2019; code yigitcankaya/Shallow-Deep-Networks), trained from scratch.

Internal classifiers (ICs) are attached to a CIFAR ResNet (6n+2, ResNet-56 in the paper) or the CIFAR VGG with
BatchNorm (VGG-16-BN); the backbone's own classifier is the final exit, so exits = ICs + 1 (methods.md section 6).

Placement  IC i sits after the backbone unit (a residual block; a VGG conv unit together with the max-pooling
           that follows it, as the official VGG_SDN attaches its ICs after the pooling) whose cumulative MACs are
           nearest to fraction f_i of the backbone's feature-extractor MACs (stem + units, measured with
           trainables/cost.py on one 32-px image; the final classifier is left out, so placements do not
           depend on the number of classes; the fractions hold for any input side divisible by 32, since every
           layer's MACs scale with its map area). "nearest" reproduces the official `add_ic` masks of ResNet-56
           and VGG-16-BN exactly; `placement="reach"` takes the first unit whose cumulative MACs reach f_i
           instead (3 of 6 ResNet-56 ICs one block later). Two ICs on one unit, or an IC on the last unit (where
           the final classifier already is), are configuration errors, not silently merged: the number of
           exits and the loss weights then always mean what the config says.
IC head    alpha * maxpool + (1 - alpha) * avgpool to a 4x4 grid (the official kernel = side/4 pooling), alpha a
           learned scalar drawn U(0, 1) from torch's RNG, then a linear layer. A map narrower than 4 at 32 px
           (VGG's 2x2 maps) is not pooled and has no alpha, as in the official code. Unlike the official
           ResNet, whose ICs read the block's sum before its last ReLU, ours read the block output.
Loss       L = sum_i tau_i CE_i + CE_final, tau_i = min(C_i, 0.01 + p C_i) with p = e/E the fraction of training
           done; C_i = the IC's fraction f_i (the paper's 0.15 ... 0.9) or `ic_weights`, times `ic_weight_scale`.
           The loop reports p through `model.set_progress` every step; a training forward puts the current
           tau_i in `out.aux["ic_weights"]` (a CPU tensor), which the loss reads. The official code steps tau
           once per epoch with e = 1..E (the value at the epoch's end); ours ramps within the epoch, by at most
           C_i/E lower.
           An eval forward is independent of p and carries no weights: the loss then uses the end-of-schedule
           weights C_i.
Early exit (the first IC whose max-softmax reaches q) is an exit policy (trainables/policies.py), not part of
this module.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from trainables import cost as cost_lib
from trainables.cost import Segment
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.methods import vgg
from trainables.models.cifar_resnet import DEPTHS, CifarResNet, block_segments
from trainables.outputs import MultiExitOutput, weighted_ce

NAME = "sdn"
PAPER = ("Kaya, Hong, Dumitras. Shallow-Deep Networks: Understanding and Mitigating Network Overthinking. "
         "ICML 2019.")
BACKBONES = ("resnet", "vgg")
BACKBONE_DEPTHS = {"resnet": DEPTHS, "vgg": tuple(vgg.CONFIGS)}
# IC positions as fractions of the backbone's MACs; "sdn" is the paper's.
LAYOUTS = {"sdn": (0.15, 0.3, 0.45, 0.6, 0.75, 0.9),
           "sparse": (0.25, 0.5, 0.75),
           "early": (0.1, 0.25, 0.4, 0.55),
           "late": (0.45, 0.6, 0.75, 0.9)}
PLACEMENTS = ("nearest", "reach")
TAU_START = 0.01  # every tau_i at the start of training (official)
GRID = 4  # the IC's pooled map side
# SDN's own early exit (trainables/policies.py): first confident exit, else the most confident one at full cost.
POLICY_DEFAULTS = {"name": "sdn"}


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    backbone: str = hp("resnet", "backbone: the CIFAR ResNet or the CIFAR VGG with BatchNorm", choices=BACKBONES)
    depth: int = hp(56, "backbone depth: ResNet 20, 32, 56, 110 (6n+2; the paper: 56) or VGG 11, 16 (the paper: 16)",
                    choices=tuple(sorted({d for ds in BACKBONE_DEPTHS.values() for d in ds})))
    ic_layout: str = hp("sdn", "IC positions by name, as fractions of the backbone's MACs: sdn (0.15, 0.3, ..., "
                               "0.9; the paper), sparse (0.25, 0.5, 0.75), early (0.1, 0.25, 0.4, 0.55), late "
                               "(0.45, 0.6, 0.75, 0.9)", choices=tuple(LAYOUTS))
    ic_fractions: tuple[float, ...] = hp((), "IC positions as increasing fractions of the backbone's MACs "
                                             "(overrides ic_layout)", low=0.01, high=0.99)
    placement: str = hp("nearest", "IC i goes after the unit whose cumulative MACs are nearest to its fraction "
                                   "(reproduces the official masks) or the first that reaches it", choices=PLACEMENTS)
    ic_weights: tuple[float, ...] = hp((), "maximum loss weight C_i of each IC (empty: C_i = the IC's fraction, "
                                           "as in the paper)", low=0.0, high=10.0)
    ic_weight_scale: float = hp(1.0, "multiplies every C_i", low=0.0, high=10.0)

    def validate(self) -> None:
        depths = BACKBONE_DEPTHS[self.backbone]
        if self.depth not in depths:
            raise ConfigError(f"depth={self.depth} is not a {self.backbone} depth; {self.backbone} depths: "
                              + ", ".join(map(str, depths)))
        f = fractions(self)
        if any(b <= a for a, b in zip(f, f[1:])):
            raise ConfigError(f"ic_fractions={list(f)} must be strictly increasing")
        if self.ic_weights and len(self.ic_weights) != len(f):
            raise ConfigError(f"ic_weights={list(self.ic_weights)} has {len(self.ic_weights)} values; there are "
                              f"{len(f)} ICs (at fractions {list(f)}), one weight each")
        ic_positions(self)  # raises on two ICs on one unit or an IC on the last unit


def fractions(hp: Hparams) -> tuple[float, ...]:
    return hp.ic_fractions or LAYOUTS[hp.ic_layout]


def num_exits(hp: Hparams) -> int:
    return len(fractions(hp)) + 1


def _backbone(backbone: str, depth: int, num_classes: int) -> nn.Module:
    if backbone == "resnet":
        return CifarResNet(depth, num_classes)
    return vgg.VGG(vgg.Hparams(depth=depth), num_classes)


def _stem_and_units(net: nn.Module) -> tuple[nn.Module | None, nn.ModuleList]:
    if isinstance(net, CifarResNet):
        return net.stem, net.blocks
    return None, net.units


@dataclasses.dataclass(frozen=True)
class Profile:
    """Where ICs can go in a backbone: the units an IC may follow (`points`, indices into the unit list: every
    residual block; every VGG unit not followed by a pooling), the backbone's cumulative MACs after each as a
    fraction of its feature-extractor MACs, and the (channels, side) of the map there at 32 px."""

    points: tuple[int, ...]
    fractions: tuple[float, ...]
    shapes: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=None)
def backbone_profile(backbone: str, depth: int) -> Profile:
    """Measured once per backbone (a pure function of its architecture, hence cached)."""
    with torch.random.fork_rng(devices=[]):  # building a throwaway backbone must not move the caller's RNG
        net = _backbone(backbone, depth, 10)
    stem, units = _stem_and_units(net)
    shapes: dict[int, tuple[int, int]] = {}

    def record(i: int):
        def hook(_m, _a, out: torch.Tensor) -> None:
            shapes[i] = (out.shape[1], out.shape[3])
        return hook

    hooks = [u.register_forward_hook(record(i)) for i, u in enumerate(units)]  # read in module_macs' forward pass
    try:
        macs = cost_lib.module_macs(net, ([stem] if stem is not None else []) + list(units), 32)
    finally:
        for h in hooks:
            h.remove()
    base, unit_macs = (macs[0], macs[1:]) if stem is not None else (0, macs)
    points = [i for i in range(len(units)) if i + 1 == len(units) or not isinstance(units[i + 1], nn.MaxPool2d)]
    cumulative = base + np.cumsum(unit_macs)
    total = int(cumulative[-1])
    return Profile(points=tuple(points), fractions=tuple(float(cumulative[i]) / total for i in points),
                   shapes=tuple(shapes[i] for i in points))


def ic_points(hp: Hparams) -> list[int]:
    """For each IC, its index into the backbone profile's `points`."""
    prof = backbone_profile(hp.backbone, hp.depth)
    at = np.asarray(prof.fractions)
    chosen = []
    for f in fractions(hp):
        if hp.placement == "nearest":
            chosen.append(int(np.argmin(np.abs(at - f))))  # a tie goes to the earlier unit
        else:
            chosen.append(int(np.argmax(at >= f)))
    source = f"ic_fractions={list(hp.ic_fractions)}" if hp.ic_fractions else f"ic_layout={hp.ic_layout}"
    net = f"{hp.backbone}-{hp.depth}"
    for a in range(len(chosen) - 1):
        if chosen[a] == chosen[a + 1]:
            p = chosen[a]
            raise ConfigError(f"{source}: fractions {fractions(hp)[a]} and {fractions(hp)[a + 1]} both place an IC "
                              f"after unit {prof.points[p]} of {net} ({at[p]:.1%} of its MACs, "
                              f"placement={hp.placement}); "
                              "use fractions further apart, another layout or a deeper backbone")
    if chosen and chosen[-1] == len(prof.points) - 1:
        raise ConfigError(f"{source}: fraction {fractions(hp)[-1]} places an IC after the last unit of {net}, where "
                          f"the final classifier already is (placement={hp.placement}); use a smaller fraction")
    return chosen


def ic_positions(hp: Hparams) -> list[int]:
    """For each IC, the index of the backbone unit it follows."""
    prof = backbone_profile(hp.backbone, hp.depth)
    return [prof.points[p] for p in ic_points(hp)]


def max_weights(hp: Hparams) -> list[float]:
    """C_i of every IC, scaled."""
    return [hp.ic_weight_scale * c for c in (hp.ic_weights or fractions(hp))]


def ic_weights(hp: Hparams, progress: float) -> list[float]:
    """tau_i = min(C_i, 0.01 + p C_i) at p = e/E, the fraction of training done."""
    p = min(max(progress, 0.0), 1.0)
    return [min(c, TAU_START + p * c) for c in max_weights(hp)]


class InternalClassifier(nn.Module):
    """Mixed max/average pooling to a 4x4 grid, then a linear classifier (SDN's IC). `side` is the input map's
    side at 32 px: narrower than 4, the map is classified whole (no pooling, no alpha)."""

    def __init__(self, channels: int, side: int, num_classes: int) -> None:
        super().__init__()
        self.grid = GRID if side >= GRID else side
        # Adaptive pooling equals the official kernel-side/4 pooling when the side is a multiple of 4, and keeps
        # the classifier's input size at other image sizes.
        self.alpha = nn.Parameter(torch.rand(1)) if side >= GRID else None
        self.linear = nn.Linear(channels * self.grid * self.grid, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            z = F.adaptive_avg_pool2d(x, self.grid)
        else:
            z = self.alpha * F.adaptive_max_pool2d(x, self.grid) \
                + (1 - self.alpha) * F.adaptive_avg_pool2d(x, self.grid)
        return self.linear(torch.flatten(z, 1))


class SDN(nn.Module):
    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        self.hp = hp
        self.net = _backbone(hp.backbone, hp.depth, num_classes)
        prof = backbone_profile(hp.backbone, hp.depth)
        points = ic_points(hp)
        self.positions = [prof.points[p] for p in points]
        self.ics = nn.ModuleList(InternalClassifier(*prof.shapes[p], num_classes) for p in points)
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Called by the training loop every step with the fraction of training done (the tau schedule)."""
        self.progress = progress

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        stem, units = _stem_and_units(self.net)
        if stem is not None:
            x = stem(x)
        logits, k = [], 0
        for i, unit in enumerate(units):
            x = unit(x)
            if k < len(self.positions) and self.positions[k] == i:
                logits.append(self.ics[k](x))
                k += 1
        logits.append(self.net.head(x))
        aux = {}
        if self.training:  # on the CPU: the loss reads them as numbers, with no device transfer per step
            aux["ic_weights"] = torch.tensor(ic_weights(self.hp, self.progress), dtype=torch.float64)
        return MultiExitOutput(logits, aux)

    def segments(self) -> list[Segment]:
        stem, units = _stem_and_units(self.net)
        segs = [Segment("stem", stem)] if stem is not None else []
        k = 0
        for i, unit in enumerate(units):
            segs += block_segments(f"block{i}", unit) if stem is not None else [Segment(f"unit{i}", unit)]
            if k < len(self.positions) and self.positions[k] == i:
                segs.append(Segment(f"ic{k}", self.ics[k], exit=k))
                k += 1
        return segs + [Segment("head", self.net.head, exit=len(self.ics))]


def build(hp: Hparams, num_classes: int) -> SDN:
    return SDN(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    weights = out.aux.get("ic_weights")
    taus = weights.tolist() if weights is not None else max_weights(hp)
    return weighted_ce(out.logits, y, list(taus) + [1.0], label_smoothing)  # the final exit's weight is 1
