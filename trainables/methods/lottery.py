"""`lottery`: iterative magnitude pruning with rewinding (Frankle and Carbin, "The Lottery Ticket Hypothesis",
ICLR 2019; rewinding: Frankle, Dziugaite, Roy, Carbin, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis", ICML 2020), after open_lth's procedure (methods.md section 4c), on the CIFAR ResNet or VGG.

Level 0 trains the dense network and keeps its weights at step `rewind_step` = k. Level L >= 1 removes
ceil(f x remaining) of the remaining prunable weights with the smallest magnitudes (pooled over all layers, or
per layer) from level L-1's trained weights, restores every weight and buffer to its step-k value, re-applies
the mask and trains from step k to the end with the same schedule and data order (the momentum starts afresh).
Prunable: every Conv2d and Linear weight (biases and BatchNorm never), less `exclude`. Pruned weights are
re-zeroed after every optimiser step, so they stay exactly zero.

Controls, trained at every level L >= 1 with the ticket's mask density when `controls` asks: `reinit` (the
ticket's mask on a fresh random initialisation) and `random_mask` (a random mask with the ticket's per-layer
density, on the step-k weights), both from step k like the ticket. `dynastudy lottery-compare` puts them side
by side.

Each level is one report (a step for Tune: a scheduler may stop a trial between levels), with its checkpoint
(masks, step-k weights, the last level's weights): a resumed trial continues at the next level. Per level:
density, val/test accuracy, dense MACs and sparse MACs = dense - sum_l (1 - density_l) x MACs_l. The frontier
holds the (accuracy, sparse MACs) point of every level; a point's `overrides` (model.levels) re-runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Iterator

import pandas as pd
import torch
from torch import nn
import torch.nn.functional as F

from trainables import cost as cost_lib
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.methods import resnet, vgg
from trainables.models.cifar_resnet import DEPTHS
from trainables.outputs import MultiExitOutput

NAME = "lottery"
PAPER = ("Frankle, Carbin. The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks. ICLR 2019. "
         "Rewinding: Frankle, Dziugaite, Roy, Carbin. Linear Mode Connectivity and the Lottery Ticket Hypothesis. "
         "ICML 2020.")
BACKBONES = {"resnet": DEPTHS, "vgg": tuple(vgg.CONFIGS)}
SCOPES = ("global", "layerwise")
EXCLUDABLE = ("first_conv", "last_linear")
CONTROLS = ("none", "reinit", "random_mask", "both")


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    backbone: str = hp("resnet", "network pruned: the CIFAR ResNet or VGG with BatchNorm", choices=tuple(BACKBONES))
    depth: int = hp(20, "backbone depth: resnet 20/32/56/110, vgg 11/16",
                    choices=tuple(sorted(set(DEPTHS) | set(vgg.CONFIGS))))
    prune_fraction: float = hp(0.2, "fraction f of the remaining prunable weights removed per level",
                               low=0.01, high=0.95)
    levels: int = hp(5, "pruning levels after the dense level 0 (density (1-f)^levels)", low=0, high=100)
    target_density: float = hp(0.0, "instead of levels: prune until the density is at most this (0 = use levels)",
                               low=0.0, high=0.999)
    scope: str = hp("global", "magnitude ranking pooled over all prunable layers, or per layer", choices=SCOPES)
    rewind_step: int = hp(0, "training step k whose weights every level restarts from (0 = the original "
                             "lottery-ticket reset to the initialisation)", low=0, high=10_000_000)
    exclude: tuple[str, ...] = hp((), "layers never pruned (open_lth's ResNet-20 prunes all; the LTH paper keeps "
                                      "the classifier dense)", choices=EXCLUDABLE)
    controls: str = hp("none", "also train, at every level, the ticket's mask on a random re-initialisation "
                                "and/or a random mask of the same per-layer density", choices=CONTROLS)

    def validate(self) -> None:
        if self.depth not in BACKBONES[self.backbone]:
            raise ConfigError(f"depth={self.depth} is not a {self.backbone} depth; valid: "
                              + ", ".join(map(str, BACKBONES[self.backbone])))


def num_exits(hp: Hparams) -> int:
    return 1


def num_levels(hp: Hparams) -> int:
    """Pruning levels after level 0: `levels`, or the fewest that bring the density to `target_density`."""
    if hp.target_density > 0:
        return max(0, math.ceil(math.log(hp.target_density) / math.log(1 - hp.prune_fraction) - 1e-9))
    return hp.levels


def build(hp: Hparams, num_classes: int) -> nn.Module:
    if hp.backbone == "resnet":
        return resnet.build(resnet.Hparams(depth=hp.depth), num_classes)
    return vgg.build(vgg.Hparams(depth=hp.depth), num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.final, y, label_smoothing=label_smoothing)


# --- masks -------------------------------------------------------------------------------------------------------

Masks = dict[str, torch.Tensor]  # prunable layer name -> bool tensor of its weight's shape


def prunable(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The layers whose weights are pruned, in module order: every Conv2d and Linear, less the excluded."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if "first_conv" in exclude:
        first = next(i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Conv2d))
        layers.pop(first)
    if "last_linear" in exclude:
        last = max(i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear))
        layers.pop(last)
    return layers


def dense_masks(layers: list[tuple[str, nn.Module]]) -> Masks:
    return {n: torch.ones_like(m.weight, dtype=torch.bool, device="cpu") for n, m in layers}


def _drop_smallest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A bool keep-vector over `scores` that removes exactly ceil(fraction x n) of the smallest (ties broken by
    position, so the count is exact and the choice deterministic)."""
    n_prune = math.ceil(fraction * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:n_prune]] = False
    return keep


def prune(masks: Masks, weights: dict[str, torch.Tensor], fraction: float, scope: str) -> Masks:
    """The next level's masks: remove `fraction` of the remaining weights by magnitude, globally or per layer.
    The new masks are subsets of the old ones."""
    remaining = {n: masks[n].flatten().nonzero().squeeze(1) for n in masks}
    scores = {n: weights[n].detach().float().cpu().abs().flatten()[remaining[n]] for n in masks}
    if scope == "global":
        keep_all = _drop_smallest(torch.cat([scores[n] for n in masks]), fraction)
        keep = dict(zip(masks, keep_all.split([len(remaining[n]) for n in masks])))
    else:
        keep = {n: _drop_smallest(scores[n], fraction) for n in masks}
    out = {}
    for n, mask in masks.items():
        new = torch.zeros(mask.numel(), dtype=torch.bool)
        new[remaining[n][keep[n]]] = True
        out[n] = new.view_as(mask)
    return out


def random_masks(masks: Masks, generator: torch.Generator) -> Masks:
    """Masks with the same number of kept weights per layer as `masks`, at random positions."""
    out = {}
    for n, mask in masks.items():
        new = torch.zeros(mask.numel(), dtype=torch.bool)
        new[torch.randperm(mask.numel(), generator=generator)[:int(mask.sum())]] = True
        out[n] = new.view_as(mask)
    return out


@torch.no_grad()
def apply_masks(layers: list[tuple[str, nn.Module]], masks: Masks) -> None:
    for n, m in layers:
        m.weight.mul_(masks[n].to(m.weight.device))


def density(masks: Masks) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def sparse_macs(dense: int, layer_macs: dict[str, int], masks: Masks) -> float:
    """MACs per image when every pruned weight is skipped: dense - sum_l (1 - density_l) x MACs_l."""
    return float(dense - sum((1 - float(masks[n].float().mean())) * layer_macs[n] for n in masks))


# --- training, one report per level -------------------------------------------------------------------------------

def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def fit(cfg, splits, ctx, state: dict[str, Any] | None = None) -> Iterator:
    """Level 0 (dense), then one pruning level per report; resumes after the last level in `state`."""
    from trainables import loop
    from trainables.methods import get_method

    hp: Hparams = cfg.model
    method = get_method(cfg.method)  # this module: train_epoch calls method.loss
    device = ctx.torch_device()
    torch.manual_seed(cfg.seed)
    model = build(hp, splits.num_classes).to(device)
    image_size = splits.train_x.shape[1]
    cost = cost_lib.measure(model, image_size, device)
    layers = prunable(model, hp.exclude)
    layer_macs = dict(zip([n for n, _ in layers], cost_lib.module_macs(model, [m for _, m in layers], image_size,
                                                                        device)))
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    init = _clone(model.state_dict())
    train = loop.train_batches(cfg, splits, device, ctx.channels_last)
    val = loop.eval_batches(splits, "val", device, ctx.channels_last)
    test = loop.eval_batches(splits, "test", device, ctx.channels_last)
    steps_per_epoch, k = len(train), hp.rewind_step
    total_steps = cfg.optim.epochs * steps_per_epoch
    if k > total_steps:
        raise ConfigError(f"model.rewind_step={k} is past the end of training ({total_steps} steps: "
                          f"{cfg.optim.epochs} epochs of {steps_per_epoch})")
    n_levels = num_levels(hp)

    def accuracy(batches, labels) -> float:
        probs = loop.exit_probs(model, batches, device).probs
        return float((probs[-1].argmax(-1) == labels).mean())

    def train_from(start_step: int, masks: Masks | None, capture: int | None = None):
        """Train the current weights from `start_step` to the end under `masks`; returns (loss, images/s, the
        weights after `capture` steps if asked)."""
        captured = {}
        if masks is not None:
            apply_masks(layers, masks)
        if capture == start_step:
            captured["state"] = _clone(model.state_dict())
        opt, sched = loop.make_optimizer(cfg, model, steps_per_epoch, start_step)

        def after_step(step: int) -> None:
            if masks is not None:
                apply_masks(layers, masks)
            if step == capture:
                captured["state"] = _clone(model.state_dict())

        first, skip = divmod(start_step, steps_per_epoch)
        train_loss, seen, seconds = float("nan"), 0, 0.0
        for epoch in range(first, cfg.optim.epochs):
            train_loss, n, t = loop.train_epoch(cfg, method, model, train, opt, sched, device, epoch,
                                                skip if epoch == first else 0, after_step)
            seen, seconds = seen + n, seconds + t
        return train_loss, seen / max(seconds, 1e-9), captured.get("state")

    if state is not None:
        masks, rewind, weights, history = state["masks"], state["rewind"], state["weights"], state["history"]
        start = state["level"] + 1
    else:
        masks, rewind, weights, history, start = dense_masks(layers), None, None, [], 0

    for level in range(start, n_levels + 1):
        t0 = time.perf_counter()
        if level == 0:
            model.load_state_dict(init)
            train_loss, speed, rewind = train_from(0, None, capture=k)
        else:
            masks = prune(masks, {n: weights[f"{n}.weight"] for n in masks}, hp.prune_fraction, hp.scope)
            model.load_state_dict(rewind)
            train_loss, speed, _ = train_from(k, masks)
        weights = _clone(model.state_dict())
        row = {"level": level, "density": density(masks), "val_acc": accuracy(val, splits.val_y),
               "test_acc": accuracy(test, splits.test_y), "sparse_macs": sparse_macs(cost.total, layer_macs, masks),
               "dense_macs": float(cost.total), "train_loss": train_loss}
        if level > 0 and hp.controls in ("reinit", "both"):
            torch.manual_seed(cfg.seed * 7919 + level)
            fresh = build(hp, splits.num_classes).state_dict()
            model.load_state_dict(fresh)
            train_from(k, masks)
            row.update(reinit_val_acc=accuracy(val, splits.val_y), reinit_test_acc=accuracy(test, splits.test_y))
        if level > 0 and hp.controls in ("random_mask", "both"):
            random = random_masks(masks, torch.Generator().manual_seed(cfg.seed * 7919 + level))
            model.load_state_dict(rewind)
            train_from(k, random)
            row.update(random_mask_val_acc=accuracy(val, splits.val_y),
                       random_mask_test_acc=accuracy(test, splits.test_y))
        model.load_state_dict(weights)
        history.append(row)
        metrics = {**row, "macs": row["sparse_macs"], "level_time_s": time.perf_counter() - t0,
                   "images_per_s": speed, "train_macs": float(cost.total)}
        snapshot = {"masks": {n: m.clone() for n, m in masks.items()}, "rewind": rewind, "weights": weights,
                    "history": list(history), "level": level, "epoch": level + 1, "config": cfg.to_flat()}
        final = _final(cost, history, masks, layers, layer_macs, weights) if level == n_levels else None
        yield loop.EpochReport(level + 1, n_levels + 1, metrics, lambda s=snapshot: s, final)


def _final(cost, history, masks, layers, layer_macs, weights):
    from trainables.loop import FinalResult

    last = history[-1]
    table = pd.DataFrame(history)
    frontier = pd.DataFrame([{
        "policy": "static", "param": float("nan"), "threshold": float("nan"), "thresholds": "[]", "exit": 0,
        "operating": r["level"] == last["level"],
        "overrides": "{}" if r["level"] == last["level"]
        else json.dumps({"model.levels": r["level"], "model.target_density": 0.0}, sort_keys=True),
        "exit_fractions": "[1.0]", "val_acc": r["val_acc"], "macs": r["sparse_macs"], "test_acc": r["test_acc"],
        "test_macs": r["sparse_macs"],
        "level": r["level"], "density": r["density"]} for r in history])
    per_layer = pd.DataFrame([{"layer": n, "weights": int(masks[n].numel()), "kept": int(masks[n].sum()),
                               "density": float(masks[n].float().mean()), "dense_macs": layer_macs[n]}
                              for n, _ in layers])
    return FinalResult(
        val_acc=last["val_acc"], test_acc=last["test_acc"], macs=last["sparse_macs"], test_macs=last["sparse_macs"],
        exit_val_acc=[last["val_acc"]], exit_test_acc=[last["test_acc"]], cost=cost, frontier=frontier,
        val_exit_fractions=(1.0,), metrics={"density": last["density"], "sparse_macs": last["sparse_macs"]},
        tables={"lottery": table, "lottery_layers": per_layer}, weights=weights)
