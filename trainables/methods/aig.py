"""`aig`: Convolutional networks with adaptive inference graphs (Veit & Belongie, ECCV 2018; IJCV 2020).

A CIFAR ResNet in which every residual block has a gate that reads the block input and decides, per sample,
whether the block's residual branch runs; the shortcut always runs (methods.md section 2):

  gate       global average pool -> 1x1 conv C->d (bias) -> BatchNorm -> ReLU -> 1x1 conv d->2 (bias)
             [off, on] logits; the last conv starts at N(0, 0.001) weights and a bias giving `init_open`.
  training   Gumbel-softmax straight-through: the forward value is exactly the one-hot argmax of
             (logits + Gumbel noise) / tau, the backward pass takes the soft sample's gradient. Unlike the
             official code, tau is really used and may be annealed (`anneal`, `tau_final`).
  loss       CE + lam * mean over gated layers l of (t_l - z_l)^2, z_l the batch mean of layer l's hard gates.
  test       a deterministic gate: open iff p_on >= `cutoff` (0.5: the "on" logit wins; the official code
             kept sampling noise at test time). The cut-off needs no retraining, so after training every cut-off
             of `cutoff_grid` is evaluated too and adds a point to the trial's frontier.
  inference  real conditional compute: per block the open samples are gathered, the branch runs on that
             sub-batch only and the result is scattered back, so a skipped block costs nothing. (`execution =
             "mask"` computes every branch and multiplies by the gate, for the benchmark and the tests.)

Cost: the gate and shortcut segments always run, each residual segment is tagged with its gate, so a sample's
MACs are always-run parts + sum over the open branches (trainables/cost.py). `pin_open` takes the first and/or
the downsampling blocks out of gating (always run, no gate), as the ImageNet schedules of the paper do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn
import torch.nn.functional as F

from trainables.cost import Segment
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.models.cifar_resnet import DEPTHS, CifarResNet, block_segments, blocks_per_stage
from trainables.outputs import MultiExitOutput

NAME = "aig"
PAPER = "Veit, Belongie. Convolutional Networks with Adaptive Inference Graphs. ECCV 2018 (IJCV 2020)."
ANNEALING = ("none", "exponential", "linear")
PINNING = ("none", "first", "downsampling", "first+downsampling")


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    depth: int = hp(110, "CIFAR ResNet depth (6n+2)", choices=DEPTHS)
    target: float = hp(0.6, "target execution rate t of every gated layer", low=0.0, high=1.0)
    targets: tuple[float, ...] = hp((), "one target rate per gated layer, shallow to deep (overrides target)",
                                    low=0.0, high=1.0)
    lam: float = hp(2.0, "weight lambda of the target-rate loss", low=0.0, high=1000.0)
    tau: float = hp(1.0, "Gumbel-softmax temperature (at the start of training when annealed)", low=0.01, high=100.0)
    anneal: str = hp("none", "temperature schedule over training, from tau to tau_final", choices=ANNEALING)
    tau_final: float = hp(1.0, "temperature at the end of training (with anneal != none)", low=0.01, high=100.0)
    gate_width: int = hp(16, "hidden width d of every gate", low=1, high=1024)
    init_open: float = hp(0.87, "initial probability that a gate opens (through the last gate bias)",
                          low=0.01, high=0.99)
    cutoff: float = hp(0.5, "test time: a gate opens iff p_on >= cutoff", low=0.0, high=1.0)
    cutoff_grid: tuple[float, ...] = hp((0.3, 0.4, 0.5, 0.6, 0.7), "other cut-offs evaluated after training, each "
                                        "one more frontier point (evaluation only: no retraining)",
                                        low=0.0, high=1.0)
    pin_open: str = hp("none", "blocks kept out of gating (always run)", choices=PINNING)

    def validate(self) -> None:
        if self.anneal == "none" and self.tau_final != 1.0:
            raise ConfigError(f"tau_final={self.tau_final} is only used with anneal=exponential or linear "
                              "(anneal is none)")
        n = len(gated_blocks(self))
        if self.targets and len(self.targets) != n:
            raise ConfigError(f"targets has {len(self.targets)} values; depth {self.depth} with pin_open="
                              f"{self.pin_open} has {n} gated layers")


def num_exits(hp: Hparams) -> int:
    return 1


def gated_blocks(hp: Hparams) -> list[int]:
    """Indices of the blocks that have a gate."""
    n = blocks_per_stage(hp.depth)
    pinned = set()
    if "first" in hp.pin_open:
        pinned.add(0)
    if "downsampling" in hp.pin_open:
        pinned |= {n, 2 * n}
    return [i for i in range(3 * n) if i not in pinned]


def eval_variants(hp: Hparams) -> list[dict]:
    """Evaluation-only settings the loop adds to the trial's frontier: the other test-time cut-offs."""
    return [{"model.cutoff": c} for c in hp.cutoff_grid if abs(c - hp.cutoff) > 1e-9]


def layer_targets(hp: Hparams) -> list[float]:
    return list(hp.targets) if hp.targets else [hp.target] * len(gated_blocks(hp))


def temperature(hp: Hparams, progress: float) -> float:
    """tau at a fraction `progress` of training."""
    p = min(max(progress, 0.0), 1.0)
    if hp.anneal == "exponential":
        return hp.tau * (hp.tau_final / hp.tau) ** p
    if hp.anneal == "linear":
        return hp.tau + (hp.tau_final - hp.tau) * p
    return hp.tau


class _StraightThrough(torch.autograd.Function):
    """Forward: the one-hot argmax of the soft sample, exactly 0/1 (y_hard - y_soft.detach() + y_soft is not
    exact in floating point). Backward: the gradient passes to the soft sample unchanged."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def gumbel_noise(shape, device, dtype=torch.float32, eps: float = 1e-10) -> torch.Tensor:
    u = torch.rand(shape, device=device, dtype=dtype)
    return -torch.log(-torch.log(u + eps) + eps)


def gumbel_st(logits: torch.Tensor, tau: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax over the last dimension: exact one-hot forward, soft-sample gradient."""
    if noise is None:
        noise = gumbel_noise(logits.shape, logits.device, logits.dtype)
    soft = F.softmax((logits + noise) / tau, dim=-1)
    return _StraightThrough.apply(soft)


def rate_loss(gates: torch.Tensor, targets: torch.Tensor | list[float], lam: float) -> torch.Tensor:
    """lam * mean_l (t_l - z_l)^2, z_l the batch execution rate of gated layer l; gates [N, L]."""
    t = torch.as_tensor(targets, dtype=gates.dtype, device=gates.device)
    return lam * ((t - gates.mean(0)) ** 2).mean()


class Gate(nn.Module):
    def __init__(self, cin: int, width: int, init_open: float) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(cin, width, 1, bias=True)
        self.bn = nn.BatchNorm2d(width)
        self.fc2 = nn.Conv2d(width, 2, 1, bias=True)
        nn.init.normal_(self.fc2.weight, 0.0, 0.001)
        with torch.no_grad():  # p_on = sigmoid(b_on - b_off) at the start
            self.fc2.bias.copy_(torch.tensor([0.0, math.log(init_open / (1 - init_open))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.adaptive_avg_pool2d(x, 1)
        return torch.flatten(self.fc2(F.relu(self.bn(self.fc1(z)))), 1)  # [N, 2] = [off, on]


class AIG(nn.Module):
    def __init__(self, hp: Hparams, num_classes: int) -> None:
        super().__init__()
        self.hp = hp
        self.net = CifarResNet(hp.depth, num_classes)
        self.gated = gated_blocks(hp)
        self.gates = nn.ModuleDict({str(i): Gate(self.net.blocks[i].cin, hp.gate_width, hp.init_open)
                                    for i in self.gated})
        self.tau = temperature(hp, 0.0)
        self.cutoff = hp.cutoff
        self.execution = "skip"
        self._force_open = False

    def apply_eval(self, hp: Hparams) -> None:
        """Take the evaluation-only settings of `hp` (the cut-off) without retraining."""
        self.cutoff = hp.cutoff

    def set_progress(self, progress: float) -> None:
        """Called by the training loop with the fraction of training done (temperature annealing)."""
        self.tau = temperature(self.hp, progress)

    @contextlib.contextmanager
    def full_compute(self):
        """Every gate open: the cost model measures every branch once."""
        self._force_open = True
        try:
            yield
        finally:
            self._force_open = False

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """The gate's 0/1 decision per sample (training: straight-through Gumbel sample; test: p_on >= cutoff)."""
        if self._force_open:
            return torch.ones(logits.shape[0], device=logits.device, dtype=logits.dtype)
        if self.training:
            return gumbel_st(logits.float(), self.tau)[:, 1].to(logits.dtype)
        return (logits.float().softmax(-1)[:, 1] >= self.cutoff).to(logits.dtype)

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        x = self.net.stem(x)
        decisions = []
        for i, block in enumerate(self.net.blocks):
            if str(i) in self.gates:
                g = self.decide(self.gates[str(i)](x))
                decisions.append(g)
                x = block(x, g, "mask" if self.training else self.execution)
            else:
                x = block(x)
        return MultiExitOutput([self.net.head(x)], {"gates": torch.stack(decisions, 1)})

    def segments(self) -> list[Segment]:
        segs = [Segment("stem", self.net.stem)]
        for i, block in enumerate(self.net.blocks):
            if str(i) in self.gates:
                l = self.gated.index(i)
                segs.append(Segment(f"block{i}.gate", self.gates[str(i)]))
                segs += block_segments(f"block{i}", block, gate=l)
            else:
                segs += block_segments(f"block{i}", block)
        return segs + [Segment("head", self.net.head, exit=0)]

    def lesion_units(self):
        return self.net.lesion_units()


def build(hp: Hparams, num_classes: int) -> AIG:
    return AIG(hp, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.final, y, label_smoothing=label_smoothing) \
        + rate_loss(out.aux["gates"].float(), layer_targets(hp), hp.lam)
