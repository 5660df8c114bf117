"""One training epoch of the platform's trainable against a minimal hand-written PyTorch loop (the floor).

For each network (resnet depth 20, resnet depth 56, elastic at its default config) and each torch.compile setting
this times ONE training epoch, two ways, on the same training tensors:

  platform  exactly what a trial runs: `trainables.loop.train_epoch` over the platform's `Batches`
            (`loop.train_batches`), optimiser and schedule (`loop.make_optimizer`), the model built as `fit()`
            builds it (`channels_last`) and wrapped as `fit()` wraps it (`loop.training_module`: torch.compile
            when `RunContext.compile`);
  floor     a minimal loop written here: the same network (built by the same method module, same seed), the
            same uint8 images resident on the device, the same batch size, the same augmentation (4-px reflect-pad
            random crop + horizontal flip, per sample, done in batches on the device; written independently
            here), the same normalisation, SGD (same parameter groups, momentum, Nesterov, weight decay; the same
            per-step learning rates, set directly), the method's own loss, channels_last, the loss summed on
            the device and read once at the end of the epoch (no per-step host sync), bf16 autocast on CUDA.

Only training is timed (what `train_epoch` does: batches, forward, loss, backward, optimiser and schedule steps,
the loss read back at the end of the epoch); the validation pass `fit()` runs after each epoch is part of neither
side (with compile on, `fit()` evaluates with the uncompiled module anyway).

All sides of one network (platform and floor, with and without compile) are built together and each first
trains one warm-up epoch (with compile on this includes compilation, for the full batch and for the last partial
batch; reported as warm-up s). Then every repetition trains one epoch of every side, interleaved so that load from
other processes hits all sides alike:
  --interleave step   (default on CPU) the sides advance in lockstep, one optimiser step each in turn (every side
                      runs in its own thread, only one thread ever runs; the platform pauses in train_epoch's
                      `after_step` hook), each side's seconds summed over its own steps (the sides then draw
                      dropout masks from torch's one global generator in turn, so elastic's losses differ from
                      an epoch-interleaved run's; the work timed is the same);
  --interleave epoch  whole epochs, in an order that rotates (and reverses) from one repetition to the next
                      (the only choice on an accelerator, where timing single steps would need a sync per step);
                      every side then reports the same training losses as its counterpart, to the bit (the JSON
                      has them: a check that the floor does the platform's computation).
The table gives medians: images/s from each side's median epoch seconds, `ratio` = median(platform s) /
median(floor s) (> 1: the platform is slower), `pair ratio` = the median over repetitions of the ratio within one
repetition, `min ratio` = that of the fastest epochs, and the compile speed-up = median over repetitions of
eager s / compiled s, per side.

  python benchmarks/trial_speed.py --data-dir ../shared/data [--subset 5000] [--threads 2] [--reps 5] \\
      [--cases resnet20,resnet56,elastic] [--compile both|off|on] [--interleave epoch|step] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as platform_lib
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import data as data_lib  # noqa: E402
from trainables import loop  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.methods import get_method  # noqa: E402

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

CASES = {
    "resnet20": {"method": "resnet", "model.depth": 20},
    "resnet56": {"method": "resnet", "model.depth": 56},
    "elastic": {"method": "elastic"},
}


def _build(cfg: TrialConfig, num_classes: int, device: torch.device, channels_last: bool):
    """The network as `fit()` builds it (before the optional compile)."""
    torch.manual_seed(cfg.seed)
    model = get_method(cfg.method).build(cfg.model, num_classes).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


Pause = Callable[..., None] | None


class Platform:
    """`loop.train_epoch` with the platform's Batches, optimiser and schedule."""

    def __init__(self, cfg: TrialConfig, splits: data_lib.Splits, ctx: loop.RunContext) -> None:
        self.cfg, self.device = cfg, ctx.torch_device()
        self.method = get_method(cfg.method)
        self.model = _build(cfg, splits.num_classes, self.device, ctx.channels_last)
        self.train = loop.train_batches(cfg, splits, self.device, ctx.channels_last)
        self.opt, self.sched = loop.make_optimizer(cfg, self.model, len(self.train))
        self.trainee = loop.training_module(self.model, ctx)
        self.epoch = 0

    def run_epoch(self, pause: Pause = None) -> float:
        """One epoch; `pause` (lockstep timing only) runs in the `after_step` hook. Returns the mean loss."""
        train_loss, _, _ = loop.train_epoch(self.cfg, self.method, self.trainee, self.train, self.opt, self.sched,
                                            self.device, self.epoch, after_step=pause)
        self.epoch += 1
        return train_loss


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Reflect-pad by `pad`, take a random crop of the original size and flip half the images, per sample, as two
    gathers over the whole batch (float NCHW in and out)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class Floor:
    """The minimal hand-written loop."""

    def __init__(self, cfg: TrialConfig, splits: data_lib.Splits, ctx: loop.RunContext) -> None:
        self.cfg, self.device = cfg, ctx.torch_device()
        self.method = get_method(cfg.method)
        self.model = _build(cfg, splits.num_classes, self.device, ctx.channels_last)
        self.fwd = torch.compile(self.model) if ctx.compile else self.model
        self.x = torch.from_numpy(splits.train_x).permute(0, 3, 1, 2).contiguous().to(self.device)  # uint8 NCHW
        self.y = torch.from_numpy(splits.train_y).to(self.device)
        mean, std = data_lib.channel_stats(splits.train_x)
        self.mean, self.std = mean.to(self.device).view(1, 3, 1, 1), std.to(self.device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if ctx.channels_last else torch.contiguous_format
        o = cfg.optim
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay},
                                    {"params": no_decay, "weight_decay": 0}],
                                   lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
        self.steps_per_epoch = (len(self.y) + o.batch_size - 1) // o.batch_size
        factor = loop._lr_lambda(cfg, self.steps_per_epoch)  # the same schedule values, set directly each step
        self.lrs = [o.lr * factor(s) for s in range(o.epochs * self.steps_per_epoch + 1)]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        self.epoch = 0

    def run_epoch(self, pause: Pause = None) -> float:
        cfg, bs, n = self.cfg, self.cfg.optim.batch_size, len(self.y)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + self.epoch)
        torch.manual_seed(cfg.seed * 100003 + self.epoch)  # dropout (elastic's heads), as a trial seeds it
        order = torch.randperm(n, generator=gen).to(self.device)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for i, start in enumerate(range(0, n, bs)):
            idx = order[start:start + bs]
            xb = crop_flip(self.x[idx].float().div_(255), gen)
            xb = ((xb - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            yb = self.y[idx]
            lr = self.lrs[min(self.epoch * self.steps_per_epoch + i, len(self.lrs) - 1)]
            for g in self.opt.param_groups:
                g["lr"] = lr
            with self.autocast:
                loss = self.method.loss(self.fwd(xb), yb, cfg.model, cfg.optim.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_sum += loss.detach().float() * len(yb)
            if pause is not None:
                pause()
        train_loss = loss_sum.item() / n  # the one host sync of the epoch
        self.epoch += 1
        return train_loss


class Lockstep:
    """One epoch of a side in a worker thread that runs only while `advance()` waits on it: up to its next step
    boundary (`pause`), or to the end. Only one thread ever runs at a time, so the sides never overlap."""

    def __init__(self, side) -> None:
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self.done, self.loss, self.error, self.seconds = False, math.nan, None, 0.0

        def body() -> None:
            self._go.acquire()
            try:
                self.loss = side.run_epoch(self._pause)
            except BaseException as e:  # re-raised in the main thread
                self.error = e
            self.done = True
            self._back.release()

        threading.Thread(target=body, daemon=True).start()

    def _pause(self, *_) -> None:
        self._back.release()
        self._go.acquire()

    def advance(self) -> None:
        t = time.perf_counter()
        self._go.release()
        self._back.acquire()
        self.seconds += time.perf_counter() - t
        if self.error is not None:
            raise self.error


def timed_epochs(sides: dict[str, Any], rep: int, interleave: str) -> dict[str, tuple[float, float]]:
    """One epoch of every side, alternating whole epochs (the order rotating with `rep`) or single steps.
    Returns side -> (seconds, mean training loss)."""
    names = list(sides)
    k = rep % len(names)
    order = names[k:] + names[:k]
    if rep % 2:
        order.reverse()
    out = {}
    if interleave == "epoch":
        for name in order:
            t = time.perf_counter()
            loss = sides[name].run_epoch()
            out[name] = (time.perf_counter() - t, loss)
        return out
    runs = {name: Lockstep(sides[name]) for name in order}
    while not all(r.done for r in runs.values()):
        for r in runs.values():
            if not r.done:
                r.advance()
    return {name: (r.seconds, r.loss) for name, r in runs.items()}


def measure(name: str, cfg: TrialConfig, splits: data_lib.Splits, device: str, threads: int,
            compiles: tuple[bool, ...], reps: int, interleave: str) -> list[dict]:
    """Every side of one network (platform and floor, at each compile setting) timed together, interleaved."""
    sides: dict[str, Any] = {}
    for comp in compiles:
        ctx = loop.RunContext(device=device, threads=threads, compile=comp)
        sides[f"platform/{comp}"] = Platform(cfg, splits, ctx)
        sides[f"floor/{comp}"] = Floor(cfg, splits, ctx)
    warmup = {}
    for side_name, side in sides.items():  # one epoch each first (compilation, allocator warm-up)
        t = time.perf_counter()
        side.run_epoch()
        warmup[side_name] = time.perf_counter() - t
    times: dict[str, list[float]] = {s: [] for s in sides}
    losses: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(reps):
        for side_name, (secs, loss) in timed_epochs(sides, r, interleave).items():
            times[side_name].append(secs)
            losses[side_name].append(loss)
    images = len(splits.train_y)
    rows = []
    for comp in compiles:
        p, f = times[f"platform/{comp}"], times[f"floor/{comp}"]
        row = {"case": name, "compile": comp, "interleave": interleave, "images": images,
               "batch_size": cfg.optim.batch_size,
               "platform_images_per_s": images / statistics.median(p),
               "floor_images_per_s": images / statistics.median(f),
               "ratio": statistics.median(p) / statistics.median(f),
               "pair_ratio": statistics.median(a / b for a, b in zip(p, f)),
               "min_ratio": min(p) / min(f),
               "platform_s": p, "floor_s": f,
               "warmup_platform_s": warmup[f"platform/{comp}"], "warmup_floor_s": warmup[f"floor/{comp}"],
               "train_loss_platform": losses[f"platform/{comp}"], "train_loss_floor": losses[f"floor/{comp}"]}
        if comp and False in compiles:  # eager seconds / compiled seconds, paired per repetition
            for side in ("platform", "floor"):
                row[f"compile_speedup_{side}"] = statistics.median(
                    a / b for a, b in zip(times[f"{side}/False"], times[f"{side}/True"]))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| network | compile | platform img/s | floor img/s | ratio platform/floor | pair ratio | min ratio | "
             "compile speed-up (platform / floor) | warm-up s (platform / floor) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        speedup = (f"{r['compile_speedup_platform']:.2f} / {r['compile_speedup_floor']:.2f}"
                   if "compile_speedup_platform" in r else "")
        lines.append(f"| {r['case']} | {'on' if r['compile'] else 'off'} | {r['platform_images_per_s']:.1f} | "
                     f"{r['floor_images_per_s']:.1f} | {r['ratio']:.3f} | {r['pair_ratio']:.3f} | "
                     f"{r['min_ratio']:.3f} | {speedup} | "
                     f"{r['warmup_platform_s']:.1f} / {r['warmup_floor_s']:.1f} |")
    return "\n".join(lines)




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DYNASTUDY_DATA"), help="folder holding CIFAR-10")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--cache-dir", default=os.environ.get("DYNASTUDY_CACHE",
                                                         str(Path(tempfile.gettempdir()) / "dynastudy-cache")),
                   help="where decoded images are cached (never the data folder)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--subset", type=int, default=5000, help="training images (0 = all 45,000)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5, help="timed epochs per side, alternating")
    p.add_argument("--compile", choices=("both", "off", "on"), default="both")
    p.add_argument("--interleave", choices=("epoch", "step"), default=None,
                   help="alternate single steps (lockstep, CPU only; the default there) or whole epochs, in a "
                        "rotating order (the default on an accelerator)")
    p.add_argument("--json", help="write the rows and the machine here")
    args = p.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    bad = [c for c in names if c not in CASES]
    if bad:
        p.error(f"--cases {','.join(bad)}: valid cases are {', '.join(CASES)}")
    if args.interleave is None:
        args.interleave = "step" if args.device.startswith("cpu") else "epoch"
    if args.interleave == "step" and not args.device.startswith("cpu"):
        p.error("--interleave step times single steps, which needs a host sync per step on an accelerator: "
                "use --interleave epoch there")
    torch.set_num_threads(args.threads)
    arrays = data_lib.load_dataset(args.dataset, args.data_dir, args.cache_dir)
    compiles = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "device": args.device,
               "torch": torch.__version__, "python": platform_lib.python_version(),
               "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "subset": args.subset, "reps": args.reps, "interleave": args.interleave}
    rows = []
    for name in names:
        flat = {**CASES[name], "data.dataset": args.dataset, "data.subset": args.subset,
                "optim.epochs": args.reps + 1}  # warm-up + timed epochs: the schedule covers every epoch run
        if args.batch_size:
            flat["optim.batch_size"] = args.batch_size
        cfg = TrialConfig.from_flat(flat)
        splits = data_lib.make_splits(arrays, cfg.data)
        for row in measure(name, cfg, splits, args.device, args.threads, compiles, args.reps, args.interleave):
            rows.append(row)
            print(f"{name} compile={'on' if row['compile'] else 'off'}: platform {row['platform_images_per_s']:.1f} "
                  f"img/s, floor {row['floor_images_per_s']:.1f} img/s, ratio {row['ratio']:.3f}, pair ratio "
                  f"{row['pair_ratio']:.3f} (platform s {[round(t, 2) for t in row['platform_s']]}, "
                  f"floor s {[round(t, 2) for t in row['floor_s']]})", flush=True)
        if args.json:  # after every network, so that an interrupted run keeps what it measured
            machine["load_average"] = os.getloadavg()
            Path(args.json).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print()
    print(f"{machine['cpu']}, {machine['cores']} cores, {args.threads} threads, torch {torch.__version__}, "
          f"device {args.device}, {args.subset or 'all'} training images, {args.reps} timed epochs per side, "
          f"interleaved by {args.interleave}, load average at the end {os.getloadavg()[0]:.1f}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
