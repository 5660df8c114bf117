"""The training loop: framework-free, resumable, one report per epoch.

`fit()` is a generator: each epoch it trains, evaluates every exit on the validation split and yields an
`EpochReport` (metrics plus a `state()` to checkpoint). The last epoch also evaluates the test split (reported
only), caches per-exit softmax outputs of both splits and computes the trial's frontier and operating point.
It knows nothing of Ray or MLflow: `tune_adapter.py` reports and checkpoints, `study/tracking.py` logs.
A gated network's per-sample gate decisions come with the softmax outputs: they give each sample's MACs and
the execution rate of every gated layer (per class too). A network with train-only side heads (DHM) has every
head's accuracy logged; its exits, frontier and cost are head 0's.

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
    compile: bool = False  # train through torch.compile(model); state_dict, cost and evaluation use the module

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
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # method-specific (gate rates, heads)
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)  # logged as <name>.parquet
    notes: list[str] = dataclasses.field(default_factory=list)  # findings worth a user's eye (tag + printed)
    weights: dict[str, Any] | None = None  # the trained model's state_dict, on the CPU


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
    warm = o.warmup_steps or int(round(o.warmup_epochs * steps_per_epoch))

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


@dataclasses.dataclass
class SplitOutputs:
    """What a network says over one split: softmax outputs of every exit, float32 [exits, samples, classes]; the
    gate decisions [samples, gates] of a gated network; the softmax outputs of train-only side heads
    [heads, samples, classes] (DHM); None where the network has none."""

    probs: np.ndarray
    gates: np.ndarray | None = None
    side: np.ndarray | None = None


@torch.no_grad()
def exit_probs(model: torch.nn.Module, batches: Batches, device: torch.device) -> SplitOutputs:
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {"probs": [], "gates": [], "side": []}
    for xb, _ in batches.epoch():
        with _autocast(device):
            out = model(xb)
        chunks["probs"].append(torch.stack([z.float().softmax(-1) for z in out.logits]).cpu())
        if "gates" in out.aux:
            chunks["gates"].append(out.aux["gates"].float().cpu())
        if "side_logits" in out.aux:
            chunks["side"].append(out.aux["side_logits"].float().softmax(-1).cpu())
    return SplitOutputs(torch.cat(chunks["probs"], dim=1).numpy(),
                        torch.cat(chunks["gates"]).numpy() if chunks["gates"] else None,
                        torch.cat(chunks["side"], dim=1).numpy() if chunks["side"] else None)


def exit_cache(model: torch.nn.Module, batches: Batches, labels: np.ndarray, cost: cost_lib.CostModel,
               device: torch.device) -> tuple[policies.ExitCache, SplitOutputs]:
    outs = exit_probs(model, batches, device)
    macs = cost.per_sample(outs.gates, len(labels)) if outs.gates is not None else None
    return policies.ExitCache(outs.probs, labels, macs), outs


def side_head_ids(model: torch.nn.Module, count: int) -> list[int]:
    return list(getattr(model, "side_heads", range(1, count + 1)))


def head_accuracy(model: torch.nn.Module, outs: SplitOutputs, labels: np.ndarray, split: str) -> dict[str, float]:
    """Accuracy of every head of a network with side heads (metrics <split>_acc_head_<i>; head 0 is the last
    exit), else nothing."""
    if outs.side is None:
        return {}
    acc = {f"{split}_acc_head_0": float((outs.probs[-1].argmax(-1) == labels).mean())}
    for h, p in zip(side_head_ids(model, len(outs.side)), outs.side):
        acc[f"{split}_acc_head_{h}"] = float((p.argmax(-1) == labels).mean())
    return acc


def head_report(model: torch.nn.Module, cost: cost_lib.CostModel, val: dict[str, float],
                test: dict[str, float]) -> tuple[pd.DataFrame, list[str]]:
    """Per head: validation and test accuracy and the MACs of its path (a table), and a note for every side
    head that beats head 0 on validation (inference runs head 0 alone)."""
    path = {0: cost.exits[-1], **dict(cost.side_heads)}
    rows = [{"head": int(k.rsplit("_", 1)[1]), "val_acc": v, "test_acc": test[k.replace("val_", "test_", 1)]}
            for k, v in val.items()]
    for r in rows:
        r["macs"] = path.get(r["head"])
    notes = [f"side head {r['head']} beats head 0 on validation ({r['val_acc']:.4f} vs {val['val_acc_head_0']:.4f}; "
             f"test {r['test_acc']:.4f} vs {test['test_acc_head_0']:.4f}) at {r['macs'] / 1e6:.1f}M MACs vs "
             f"{path[0] / 1e6:.1f}M; inference runs head 0 alone"
             for r in rows if r["head"] != 0 and r["val_acc"] > val["val_acc_head_0"]]
    return pd.DataFrame(rows, columns=["head", "val_acc", "test_acc", "macs"]), notes


def gate_names(cost: cost_lib.CostModel) -> list[str]:
    """The block each gate switches, by gate index."""
    names = {g: name.split(".")[0] for (name, _), g in zip(cost.blocks, cost.gates) if g is not None}
    return [names[g] for g in range(len(names))]


def gate_rates(gates: np.ndarray, labels: np.ndarray, names: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Execution rate of every gated layer (metrics gate_rate_<l>, gate_rate_mean) and per class (a table)."""
    rates = gates.mean(axis=0)
    metrics = {f"gate_rate_{l}": float(r) for l, r in enumerate(rates)}
    metrics["gate_rate_mean"] = float(rates.mean())
    rows = []
    for c in np.unique(labels):
        mask = labels == c
        for l, r in enumerate(gates[mask].mean(axis=0)):
            rows.append({"layer": l, "block": names[l], "class": int(c), "rate": float(r), "count": int(mask.sum())})
    return metrics, pd.DataFrame(rows, columns=["layer", "block", "class", "rate", "count"])


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def eval_batches(splits: Splits, which: str, device: torch.device, channels_last: bool = True) -> Batches:
    """The validation or test split, normalised with the training split's channel statistics (as in `fit`)."""
    mean, std = channel_stats(splits.train_x)
    x, y = (splits.val_x, splits.val_y) if which == "val" else (splits.test_x, splits.test_y)
    return Batches(x, y, EVAL_BATCH, device, mean, std, channels_last=channels_last)


def final_exit_error(model: torch.nn.Module, batches: Batches, labels: np.ndarray, device: torch.device) -> float:
    probs = exit_probs(model, batches, device).probs
    return float((probs[-1].argmax(-1) != labels).mean())


def _frontier(cfg: TrialConfig, method, model, cost, val: Batches, test: Batches, splits: Splits,
              device: torch.device, own: pd.DataFrame) -> pd.DataFrame:
    """The trial's frontier under its own settings, plus one under each evaluation-only variant of the method
    (e.g. other AIG cut-offs), each row naming its variant in `overrides`."""
    frames = [own]
    variants = getattr(method, "eval_variants", lambda hp: [])(cfg.model)
    for overrides in variants:
        model.apply_eval(cfg.replace(**overrides).model)
        v, _ = exit_cache(model, val, splits.val_y, cost, device)
        t, _ = exit_cache(model, test, splits.test_y, cost, device)
        frames.append(policies.frontier(v, t, cost.exits, policies.frontier_families(cfg.policy),
                                        overrides=overrides))
    if variants:
        model.apply_eval(cfg.model)
    return pd.concat(frames, ignore_index=True)


def make_optimizer(cfg: TrialConfig, model: torch.nn.Module, steps_per_epoch: int, start_step: int = 0):
    """SGD (no weight decay on BatchNorm and biases) and the learning-rate schedule, positioned at `start_step`."""
    o = cfg.optim
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    factor = _lr_lambda(cfg, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factor(step + start_step))
    return opt, sched


def training_module(model: torch.nn.Module, ctx: RunContext) -> torch.nn.Module:
    """What `train_epoch` runs: `model` itself, or with `ctx.compile` torch.compile(model), which shares its
    parameters and buffers. Checkpoints, state_dicts (no `_orig_mod.` prefix), cost and evaluation keep `model`."""
    return torch.compile(model) if ctx.compile else model


def train_batches(cfg: TrialConfig, splits: Splits, device: torch.device, channels_last: bool) -> Batches:
    mean, std = channel_stats(splits.train_x)
    return Batches(splits.train_x, splits.train_y, cfg.optim.batch_size, device, mean, std, augment=cfg.data.augment,
                   shuffle=True, channels_last=channels_last)


def train_epoch(cfg: TrialConfig, method, model: torch.nn.Module, train: Batches, opt, sched, device: torch.device,
                epoch: int, skip: int = 0, after_step: Callable[[int], None] | None = None) -> tuple[float, int, float]:
    """One epoch (0-based `epoch`); the first `skip` batches are drawn but not trained on, so a run that starts
    mid-epoch sees the same data order as one that did not. `after_step(global_step)` runs after every
    optimiser step (global_step counts steps done). Returns mean training loss, samples seen, seconds."""
    # The data order and dropout depend on (seed, epoch) only, so a resumed trial retraces its steps.
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    torch.manual_seed(cfg.seed * 100003 + epoch)
    total_steps = cfg.optim.epochs * len(train)
    set_progress = getattr(model, "set_progress", None)
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    for step, (xb, yb) in enumerate(train.epoch(gen)):
        if step < skip:
            continue
        global_step = epoch * len(train) + step
        if set_progress is not None:
            set_progress(global_step / total_steps)
        with _autocast(device):
            out = model(xb)
            loss = method.loss(out, yb, cfg.model, cfg.optim.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if after_step is not None:
            after_step(global_step + 1)
        loss_sum += loss.detach().float() * len(yb)
        seen += len(yb)
        if (step + 1) % SYNC_EVERY == 0 and not torch.isfinite(loss_sum):
            raise Diverged(f"training loss is {loss_sum.item()} at epoch {epoch + 1} step {step + 1}")
    train_loss = loss_sum.item() / max(seen, 1)
    if not math.isfinite(train_loss):
        raise Diverged(f"training loss is {train_loss} at epoch {epoch + 1}")
    return train_loss, seen, time.perf_counter() - t0


def fit(cfg: TrialConfig, splits: Splits, ctx: RunContext = RunContext(),
        state: dict[str, Any] | None = None) -> Iterator[EpochReport]:
    """Train `cfg` on `splits`, resuming from `state` (a previous report's `state()`) when given. A method with
    its own schedule of reports (lottery tickets: one per pruning level) provides `fit` and is run by it."""
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    method = get_method(cfg.method)
    if hasattr(method, "fit"):
        yield from method.fit(cfg, splits, ctx, state)
        return
    device = ctx.torch_device()
    torch.manual_seed(cfg.seed)
    model = method.build(cfg.model, splits.num_classes).to(device)
    cost = cost_lib.measure(model, splits.train_x.shape[1], device)  # per image, before channels_last
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)

    o = cfg.optim
    train = train_batches(cfg, splits, device, ctx.channels_last)
    val = eval_batches(splits, "val", device, ctx.channels_last)
    opt, sched = make_optimizer(cfg, model, len(train))
    trainee = training_module(model, ctx)
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
        t0 = time.perf_counter()
        train_loss, seen, train_time = train_epoch(cfg, method, trainee, train, opt, sched, device, epoch)

        val_cache, val_outs = exit_cache(model, val, splits.val_y, cost, device)
        point = policies.operating_point(cfg.policy, val_cache, cost.exits)
        exit_acc = val_cache.correct.mean(axis=1) if len(splits.val_y) else np.full(val_cache.num_exits, np.nan)
        metrics = {"train_loss": train_loss, "val_acc": point.acc, "macs": point.macs,
                   "train_macs": cost.train_total, "epoch_time_s": time.perf_counter() - t0,
                   "images_per_s": seen / train_time, "lr": opt.param_groups[0]["lr"]}
        metrics.update({f"val_acc_exit_{k}": float(a) for k, a in enumerate(exit_acc)})
        gate_metrics, gate_table = ({}, None) if val_outs.gates is None \
            else gate_rates(val_outs.gates, splits.val_y, gate_names(cost))
        val_heads = head_accuracy(model, val_outs, splits.val_y, "val")
        metrics.update(gate_metrics)
        metrics.update(val_heads)
        final = None
        if epoch + 1 == o.epochs:
            test = eval_batches(splits, "test", device, ctx.channels_last)
            test_cache, test_outs = exit_cache(model, test, splits.test_y, cost, device)
            # thresholds the policy derives (budgeted) come from validation, never from the test split
            test_point = policies.operating_point(cfg.policy, test_cache, cost.exits, calib=val_cache)
            tables = {"gate_rates": gate_table} if gate_table is not None else {}
            final_metrics, notes = dict(gate_metrics), list(getattr(model, "notes", ()))
            if val_heads:
                test_heads = head_accuracy(model, test_outs, splits.test_y, "test")
                tables["heads"], head_notes = head_report(model, cost, val_heads, test_heads)
                notes += head_notes
                final_metrics.update({**val_heads, **test_heads})
            final = FinalResult(
                val_acc=point.acc, test_acc=test_point.acc, macs=point.macs, test_macs=test_point.macs,
                exit_val_acc=[float(a) for a in exit_acc],
                exit_test_acc=[float(a) for a in test_cache.correct.mean(axis=1)],
                cost=cost, frontier=_frontier(cfg, method, model, cost, val, test, splits, device,
                                              policies.frontier(val_cache, test_cache, cost.exits,
                                                                policies.frontier_families(cfg.policy),
                                                                operating=cfg.policy)),
                val_exit_fractions=point.exit_fractions, metrics=final_metrics, tables=tables, notes=notes,
                weights={k: v.detach().cpu() for k, v in model.state_dict().items()})
        yield EpochReport(epoch + 1, o.epochs, metrics, snapshot(epoch + 1), final)
