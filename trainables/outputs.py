"""The one output type every method returns, so metrics, exit policies and plots are written once."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class MultiExitOutput:
    """Exit logits ordered shallow to deep (a single-exit network has one), plus auxiliary tensors
    (gate activations, masks, mimicking targets) keyed by name."""

    logits: list[torch.Tensor]
    aux: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def num_exits(self) -> int:
        return len(self.logits)

    @property
    def final(self) -> torch.Tensor:
        return self.logits[-1]


def weighted_ce(logits: list[torch.Tensor], y: torch.Tensor, weights: list[float],
                label_smoothing: float = 0.0) -> torch.Tensor:
    """sum_k w_k * CE(logits_k, y): the joint loss of multi-exit training (Elastic, MSDNet, BranchyNet)."""
    return sum(w * F.cross_entropy(z, y, label_smoothing=label_smoothing) for w, z in zip(weights, logits))
