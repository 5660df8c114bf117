"""Cost accounting in MACs (one multiply-accumulate; FLOPs = 2 x MACs).

A method's model lists its segments in execution order (`model.segments()`): every module that runs once per
forward pass, each head tagged with the exit it produces. Each segment's MACs are measured once, with
`torch.utils.flop_counter.FlopCounterMode` on a one-image forward pass (MACs = its count / 2, so convolutions
and matrix products are counted; BatchNorm, activations, pooling and element-wise ops count 0), and the
cumulative cost of exit k is everything that runs before it, every earlier head included: a sample that
leaves at exit k paid for heads 0..k (methods.md section 7).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclasses.dataclass(frozen=True)
class Segment:
    name: str
    module: nn.Module
    exit: int | None = None  # the exit this head produces, None for a backbone part


@dataclasses.dataclass(frozen=True)
class CostModel:
    """MACs per image of every segment and the cumulative MACs to reach and evaluate every exit."""

    blocks: tuple[tuple[str, int], ...]
    exits: tuple[int, ...]

    @property
    def total(self) -> int:
        """The whole network, every head included."""
        return sum(m for _, m in self.blocks)

    def to_dict(self) -> dict:
        return {"macs": self.total,
                "exits": [{"exit": k, "macs": m} for k, m in enumerate(self.exits)],
                "blocks": [{"name": n, "macs": m} for n, m in self.blocks]}


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward pass of `model` on `x`, as FlopCounterMode counts them, halved."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure(model: nn.Module, image_size: int, device: str | torch.device = "cpu") -> CostModel:
    """Measure the segments of `model` with one forward pass of a single image in eval mode.

    Raises if the segments do not account for every MAC of the pass (a module left out of `segments()`)."""
    segments: list[Segment] = model.segments()
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    macs: dict[int, int] = {}
    handles = []
    with FlopCounterMode(display=False) as counter:
        for i, seg in enumerate(segments):
            def pre(_m, _a, i=i):
                macs[i] = -counter.get_total_flops()

            def post(_m, _a, _o, i=i):
                macs[i] += counter.get_total_flops()

            handles += [seg.module.register_forward_pre_hook(pre), seg.module.register_forward_hook(post)]
        try:
            model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    total = counter.get_total_flops()
    if sorted(macs) != list(range(len(segments))):
        missing = [segments[i].name for i in range(len(segments)) if i not in macs]
        raise RuntimeError(f"segments never ran in the forward pass: {missing}")
    if sum(macs.values()) != total:
        raise RuntimeError(f"segments account for {sum(macs.values()) // 2} of {total // 2} MACs: "
                           "a module that computes is missing from segments()")
    blocks, exits, running = [], {}, 0
    for i, seg in enumerate(segments):
        running += macs[i] // 2
        blocks.append((seg.name, macs[i] // 2))
        if seg.exit is not None:
            exits[seg.exit] = running
    if sorted(exits) != list(range(len(exits))):
        raise RuntimeError(f"exit indices {sorted(exits)} are not 0..K-1")
    return CostModel(blocks=tuple(blocks), exits=tuple(exits[k] for k in range(len(exits))))
