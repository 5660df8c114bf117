"""Cost accounting in MACs (one multiply-accumulate; FLOPs = 2 x MACs).

A method's model lists its segments in execution order (`model.segments()`): every module that runs once per
forward pass, each head tagged with the exit it produces. Each segment's MACs are measured once, with
`torch.utils.flop_counter.FlopCounterMode` on a one-image forward pass (MACs = its count / 2, so convolutions
and matrix products are counted; BatchNorm, activations, pooling and element-wise ops count 0), and the
cumulative cost of exit k is everything that runs before it, every earlier head included: a sample that
leaves at exit k paid for heads 0..k (methods.md section 7).

Dynamic parts: a segment tagged with `gate=l` runs only for the samples whose gate l is open (ConvNet-AIG), so
a sample's cost is the static cost minus the gated segments it skipped (`CostModel.per_sample`); a segment's
`train_fraction` is the expected fraction of training samples that run it (stochastic depth), which gives the
expected training MACs. A `train_only` segment runs in training but is discarded for inference (DHM's mimicking
branches): it counts in the training MACs and not in any exit's cost; a train-only segment that ends in a
classifier is a side head (`side=<head id>`), whose cost is the inference parts before it plus its own branch.
A model whose parts do not all run on every input provides `full_compute()`, a context
manager under which they do, for the one measuring pass.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str
    module: nn.Module
    exit: int | None = None  # the exit this head produces, None for a backbone part
    gate: int | None = None  # runs only for samples whose gate `gate` is open
    train_fraction: float = 1.0  # expected fraction of training samples that run it
    train_only: bool = False  # discarded after training: no exit pays for it
    side: int | None = None  # a train-only branch ending in a classifier: the id of its head


@dataclasses.dataclass(frozen=True)
class CostModel:
    """MACs per image of every segment and the cumulative MACs to reach and evaluate every exit."""

    blocks: tuple[tuple[str, int], ...]
    exits: tuple[int, ...]
    gates: tuple[int | None, ...] = ()  # per block: the gate it depends on
    exit_blocks: tuple[int, ...] = ()  # per exit: the index of its head in `blocks`
    train_fractions: tuple[float, ...] = ()  # per block
    train_only: tuple[bool, ...] = ()  # per block
    side_heads: tuple[tuple[int, int], ...] = ()  # (head id, MACs of the path to it) per train-only side head

    def _train_only(self, i: int) -> bool:
        return bool(self.train_only) and self.train_only[i]

    @property
    def total(self) -> int:
        """The whole inference network, every exit head included (train-only branches are not)."""
        return sum(m for i, (_, m) in enumerate(self.blocks) if not self._train_only(i))

    @property
    def num_gates(self) -> int:
        return len({g for g in self.gates if g is not None})

    @property
    def train_total(self) -> float:
        """Expected forward MACs of one training image: train-only branches included, stochastic depth's dropped
        branches not."""
        fractions = self.train_fractions or (1.0,) * len(self.blocks)
        return float(sum(f * m for f, (_, m) in zip(fractions, self.blocks)))

    def per_sample(self, gates: np.ndarray | None, n: int) -> np.ndarray:
        """Cumulative MACs to reach every exit, per sample: float64 [exits, n]. `gates` [n, num_gates] holds the
        0/1 decisions of a gated network (None for a static one)."""
        static = np.broadcast_to(np.asarray(self.exits, dtype=np.float64)[:, None], (len(self.exits), n))
        if gates is None or self.num_gates == 0:
            return static.copy()
        gates = np.asarray(gates, dtype=np.float64)
        if gates.shape != (n, self.num_gates):
            raise ValueError(f"gates of shape {gates.shape}; this network has {self.num_gates} gates for {n} samples")
        saved = np.zeros((len(self.blocks), n))
        for i, g in enumerate(self.gates):
            if g is not None:
                saved[i] = (1.0 - gates[:, g]) * self.blocks[i][1]
        saved_before = np.cumsum(saved, axis=0)[list(self.exit_blocks)]
        return static - saved_before

    def to_dict(self) -> dict:
        blocks = []
        for i, (n, m) in enumerate(self.blocks):
            b = {"name": n, "macs": m}
            if self.gates and self.gates[i] is not None:
                b["gate"] = self.gates[i]
            if self.train_fractions and self.train_fractions[i] != 1.0:
                b["train_fraction"] = self.train_fractions[i]
            if self._train_only(i):
                b["train_only"] = True
            blocks.append(b)
        out = {"macs": self.total, "train_macs": self.train_total,
               "exits": [{"exit": k, "macs": m} for k, m in enumerate(self.exits)], "blocks": blocks}
        if self.side_heads:
            out["side_heads"] = [{"head": h, "macs": m} for h, m in self.side_heads]
        return out


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward pass of `model` on `x`, as FlopCounterMode counts them, halved."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@torch.no_grad()
def _module_macs(model: nn.Module, modules: list[nn.Module], image_size: int,
                 device: str | torch.device) -> tuple[dict[int, int], int]:
    """FLOPs (FlopCounterMode's count, 2 per MAC) of each of `modules` and of the whole model, in one eval-mode
    forward pass of a single image; a module that never ran is missing from the dict."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    flops: dict[int, int] = {}
    handles = []
    with FlopCounterMode(display=False) as counter:
        for i, module in enumerate(modules):
            def pre(_m, _a, i=i):
                flops[i] = -counter.get_total_flops()

            def post(_m, _a, _o, i=i):
                flops[i] += counter.get_total_flops()

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        try:
            with getattr(model, "full_compute", contextlib.nullcontext)():
                model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    return flops, counter.get_total_flops()


def module_macs(model: nn.Module, modules: list[nn.Module], image_size: int,
                device: str | torch.device = "cpu") -> list[int]:
    """MACs per image of each of `modules` (e.g. every prunable layer), measured as in `measure`."""
    flops, _ = _module_macs(model, modules, image_size, device)
    missing = [i for i in range(len(modules)) if i not in flops]
    if missing:
        raise RuntimeError(f"modules {missing} never ran in the forward pass")
    return [flops[i] // 2 for i in range(len(modules))]


def measure(model: nn.Module, image_size: int, device: str | torch.device = "cpu") -> CostModel:
    """Measure the segments of `model` with one forward pass of a single image in eval mode.

    Raises if the segments do not account for every MAC of the pass (a module left out of `segments()`)."""
    segments: list[Segment] = model.segments()
    macs, total = _module_macs(model, [seg.module for seg in segments], image_size, device)
    if sorted(macs) != list(range(len(segments))):
        missing = [segments[i].name for i in range(len(segments)) if i not in macs]
        raise RuntimeError(f"segments never ran in the forward pass: {missing}")
    if sum(macs.values()) != total:
        raise RuntimeError(f"segments account for {sum(macs.values()) // 2} of {total // 2} MACs: "
                           "a module that computes is missing from segments()")
    blocks, exits, exit_blocks, sides, running = [], {}, {}, [], 0
    for i, seg in enumerate(segments):
        if seg.train_only and seg.exit is not None:
            raise RuntimeError(f"segment {seg.name} is train-only and cannot produce exit {seg.exit}")
        if seg.side is not None and not seg.train_only:
            raise RuntimeError(f"segment {seg.name} is a side head and must be train-only")
        blocks.append((seg.name, macs[i] // 2))
        if seg.train_only:
            if seg.side is not None:
                sides.append((seg.side, running + macs[i] // 2))
            continue
        running += macs[i] // 2
        if seg.exit is not None:
            exits[seg.exit], exit_blocks[seg.exit] = running, i
    if sorted(exits) != list(range(len(exits))):
        raise RuntimeError(f"exit indices {sorted(exits)} are not 0..K-1")
    gates = tuple(seg.gate for seg in segments)
    if {g for g in gates if g is not None} != set(range(len({g for g in gates if g is not None}))):
        raise RuntimeError(f"gate indices {sorted({g for g in gates if g is not None})} are not 0..L-1")
    return CostModel(blocks=tuple(blocks), exits=tuple(exits[k] for k in range(len(exits))), gates=gates,
                     exit_blocks=tuple(exit_blocks[k] for k in range(len(exits))),
                     train_fractions=tuple(seg.train_fraction for seg in segments),
                     train_only=tuple(seg.train_only for seg in segments), side_heads=tuple(sides))
