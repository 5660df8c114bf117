"""The training loop: framework-free, resumable, one report per epoch.

`fit()` is a generator: each epoch it trains, evaluates every exit on the validation split and yields an
`EpochReport` (metrics plus a `state()` to checkpoint). The last epoch also evaluates the test split (reported
only), caches per-exit softmax outputs of both splits and computes the trial's frontier and operating point.
It knows nothing of Ray or MLflow: `tune_adapter.py` reports and checkpoints, `study/tracking.py` logs.

Speed habits from fast CIFAR trainers that do not change the method: the data stays on the device as uint8,
augmentation runs on whole batches, `channels_last`, bf16 autocast on GPU, and the loss is accumulated on the
device (one host sync every `SYNC_EVERY` steps to catch divergence early).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from trainables import cost as cost_lib
from trainables import policies
from trainables.config import TrialConfig
from trainables.data import Batches, Splits, channel_stats
from trainables.methods import get_method

SYNC_EVERY = 50
EVAL_BATCH = 512


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; the trial ends as failed with this reason."""


@dataclasses.dataclass(frozen=True)
class RunContext:
    """How a trial runs (not what it is: nothing here enters the config hash)."""

    device: str = "cpu"
    channels_last: bool = True
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclasses.dataclass
class FinalResult:
    val_acc: float
    test_acc: float
    macs: float
    test_macs: float
    exit_val_acc: list[float]
    exit_test_acc: list[float]
    cost: cost_lib.CostModel
    frontier: pd.DataFrame
    val_exit_fractions: tuple[float, ...]


@dataclasses.dataclass
class EpochReport:
    epoch: int  # 1-based
    epochs: int
    metrics: dict[str, float]
    state: Callable[[], dict[str, Any]]
    final: FinalResult | None = None


def _lr_lambda(cfg: TrialConfig, steps_per_epoch: int) -> Callable[[int], float]:
    o = cfg.optim
    total = o.epochs * steps_per_epoch
    warm = int(round(o.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if o.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if o.schedule == "step":  # x0.1 at 50% and 75% of training (the CIFAR ResNet recipe)
            return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
        return 1.0

    return factor


@torch.no_grad()
def exit_probs(model: torch.nn.Module, batches: Batches, device: torch.device) -> np.ndarray:
    """Softmax outputs of every exit over a split: float32 [exits, samples, classes]."""
    model.eval()
    chunks = []
    for xb, _ in batches.epoch():
        with _autocast(device):
            out = model(xb)
        chunks.append(torch.stack([z.float().softmax(-1) for z in out.logits]).cpu())
    return torch.cat(chunks, dim=1).numpy()


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def operating_point(cfg: TrialConfig, cache: policies.ExitCache, cum_macs) -> policies.Outcome:
    return policies.evaluate(cache, policies.exits_for(cfg.policy, cache), cum_macs)


def fit(cfg: TrialConfig, splits: Splits, ctx: RunContext = RunContext(),
        state: dict[str, Any] | None = None) -> Iterator[EpochReport]:
    """Train `cfg` on `splits`, resuming from `state` (a previous report's `state()`) when given."""
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    device = ctx.torch_device()
    method = get_method(cfg.method)
    torch.manual_seed(cfg.seed)
    model = method.build(cfg.model, splits.num_classes).to(device)
    cost = cost_lib.measure(model, splits.train_x.shape[1], device)  # per image, before channels_last
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)

    mean, std = channel_stats(splits.train_x)
    o = cfg.optim
    train = Batches(splits.train_x, splits.train_y, o.batch_size, device, mean, std, augment=cfg.data.augment,
                    shuffle=True, channels_last=ctx.channels_last)
    val = Batches(splits.val_x, splits.val_y, EVAL_BATCH, device, mean, std, channels_last=ctx.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():  # no weight decay on BatchNorm and biases
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(train)))
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"]

    def snapshot(epoch: int) -> Callable[[], dict[str, Any]]:
        return lambda: {"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch, "config": cfg.to_flat()}

    for epoch in range(start, o.epochs):
        # The data order and dropout depend on (seed, epoch) only, so a resumed trial retraces its steps.
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        torch.manual_seed(cfg.seed * 100003 + epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for step, (xb, yb) in enumerate(train.epoch(gen)):
            with _autocast(device):
                out = model(xb)
                loss = method.loss(out, yb, cfg.model, o.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach().float() * len(yb)
            seen += len(yb)
            if (step + 1) % SYNC_EVERY == 0 and not torch.isfinite(loss_sum):
                raise Diverged(f"training loss is {loss_sum.item()} at epoch {epoch + 1} step {step + 1}")
        train_loss = loss_sum.item() / max(seen, 1)
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss is {train_loss} at epoch {epoch + 1}")
        train_time = time.perf_counter() - t0

        val_cache = policies.ExitCache(exit_probs(model, val, device), splits.val_y)
        point = operating_point(cfg, val_cache, cost.exits)
        exit_acc = val_cache.correct.mean(axis=1) if len(splits.val_y) else np.full(val_cache.num_exits, np.nan)
        metrics = {"train_loss": train_loss, "val_acc": point.acc, "macs": point.macs,
                   "epoch_time_s": time.perf_counter() - t0, "images_per_s": seen / train_time,
                   "lr": opt.param_groups[0]["lr"]}
        metrics.update({f"val_acc_exit_{k}": float(a) for k, a in enumerate(exit_acc)})
        final = None
        if epoch + 1 == o.epochs:
            test = Batches(splits.test_x, splits.test_y, EVAL_BATCH, device, mean, std,
                           channels_last=ctx.channels_last)
            test_cache = policies.ExitCache(exit_probs(model, test, device), splits.test_y)
            test_point = operating_point(cfg, test_cache, cost.exits)
            final = FinalResult(
                val_acc=point.acc, test_acc=test_point.acc, macs=point.macs, test_macs=test_point.macs,
                exit_val_acc=[float(a) for a in exit_acc],
                exit_test_acc=[float(a) for a in test_cache.correct.mean(axis=1)],
                cost=cost, frontier=policies.frontier(val_cache, test_cache, cost.exits, operating=cfg.policy),
                val_exit_fractions=point.exit_fractions)
        yield EpochReport(epoch + 1, o.epochs, metrics, snapshot(epoch + 1), final)
