"""The one output type every method returns, so metrics, exit policies and plots are written once."""

from __future__ import annotations

import dataclasses

import torch


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
