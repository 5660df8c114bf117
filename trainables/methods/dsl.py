"""`dsl`: deep supervision with DHM's side branches and cross-entropy only (Lee, Xie, Gallagher, Zhang, Tu,
"Deeply-Supervised Nets", AISTATS 2015, in the form DHM's paper compares against: Li and Chen, CVPR 2020).

The network, the heads and what is logged are `dhm`'s (trainables/methods/dhm.py); the loss is sum_i w_i CE_i,
i.e. DHM with alpha = 0. Inference runs head 0 alone, at the plain backbone's cost.
"""

from __future__ import annotations

import torch

from trainables.methods import dhm
from trainables.outputs import MultiExitOutput

NAME = "dsl"
PAPER = ("Lee, Xie, Gallagher, Zhang, Tu. Deeply-Supervised Nets. AISTATS 2015; as the DSL baseline of Li, Chen. "
         "Dynamic Hierarchical Mimicking Towards Consistent Optimization Objectives. CVPR 2020.")

Hparams = dhm.BranchHparams
num_exits = dhm.num_exits
build = dhm.build


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return dhm.supervised_loss(dhm.head_logits(out), y, dhm.head_weights(hp), 0.0, 1.0, label_smoothing)
