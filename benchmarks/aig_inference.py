"""Inference speed of ConvNet-AIG with real skipping vs masking vs the plain ResNet of the same depth (issue 4).

Trains an AIG model briefly on CIFAR-10 (or loads a trained `aig` trial from MLflow with --run-id), then times
batches of real test images (batch 256, CPU, eval mode, no autograd) through:
  skip    per block, the branch runs on the sub-batch whose gate is open (the platform's inference path);
  mask    every branch runs on the whole batch and is multiplied by its 0/1 gate (the official code's way);
  resnet  the plain ResNet of the same depth (no gates).
each in both memory formats (channels_last and NCHW), and prints images/s with the MAC ratio beside the time
ratio, both against the faster ResNet. MACs per image are counted, not estimated: the
expected MACs of the skip path come from the measured gate decisions on the very images timed.

  python benchmarks/aig_inference.py --data-dir ../shared/data [--depth 56] [--epochs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study import paths  # noqa: E402
from trainables import cost as cost_lib  # noqa: E402
from trainables import data as data_lib  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402
from trainables.loop import RunContext, eval_batches, fit  # noqa: E402
from trainables.methods import get_method  # noqa: E402


def trained_aig(args, arrays, cache: Path):
    """The AIG model timed: a trial from MLflow, else one trained here (kept in the cache for reruns)."""
    if args.run_id:
        from study.tracking import Tracker

        _, flat, weights = Tracker(args.tracking_uri).load_trial(args.run_id)
        cfg = TrialConfig.from_flat(flat)
        if cfg.method != "aig":
            sys.exit(f"run {args.run_id} is a {cfg.method} trial, not aig")
    else:
        cfg = TrialConfig.from_flat({
            "method": "aig", "model.depth": args.depth, "model.target": args.target, "model.lam": args.lam,
            "data.dataset": "cifar10", "data.subset": args.subset, "optim.epochs": args.epochs,
            "optim.batch_size": 128, "optim.lr": 0.1, "optim.warmup_epochs": 0.5, "policy.name": "static"})
        saved = cache / f"aig-benchmark-{cfg.config_hash()}.pt"
        if saved.is_file():
            weights = torch.load(saved, weights_only=True)
            print(f"  using the model trained earlier: {saved}")
        else:
            t0 = time.perf_counter()
            for report in fit(cfg, data_lib.make_splits(arrays, cfg.data), RunContext(threads=args.threads)):
                print(f"  training epoch {report.epoch}/{report.epochs}: val_acc {report.metrics['val_acc']:.3f}, "
                      f"mean gate rate {report.metrics['gate_rate_mean']:.3f}", flush=True)
                weights = report.final.weights if report.final else None
            print(f"  trained in {time.perf_counter() - t0:.0f}s", flush=True)
            torch.save(weights, saved)
    model = get_method("aig").build(cfg.model, 10)
    model.load_state_dict(weights)
    return cfg, model.eval()


def images_per_s(model, batches: list[torch.Tensor], repeats: int) -> float:
    with torch.inference_mode():
        model(batches[0])  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for xb in batches:
                model(xb)
            times.append(time.perf_counter() - t0)
    return sum(len(xb) for xb in batches) / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DYNASTUDY_DATA"), help="folder with CIFAR-10")
    p.add_argument("--run-id", help="use this trained aig trial instead of training one")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--lam", type=float, default=4.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=4, help="batches timed per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--results-dir", help="where the decoded dataset is cached (as for dynastudy)")
    args = p.parse_args()
    if not args.data_dir:
        sys.exit("pass --data-dir (or set DYNASTUDY_DATA) to the folder holding CIFAR-10")
    torch.set_num_threads(args.threads)

    cache = paths.cache_dir(paths.results_dir(args.results_dir))
    arrays = data_lib.load_dataset("cifar10", args.data_dir, cache, 32)
    cfg, aig = trained_aig(args, arrays, cache)
    n = args.batch * args.batches
    splits = data_lib.make_splits(arrays, dataclasses.replace(cfg.data, test_subset=n))
    test_x = torch.cat([xb for xb, _ in eval_batches(splits, "test", torch.device("cpu")).epoch()])[:n]
    batches = list(test_x.split(args.batch))
    resnet = get_method("resnet").build(get_method("resnet").Hparams(depth=cfg.model.depth), 10).eval()
    card = cost_lib.measure(aig, 32)
    plain_macs = cost_lib.measure(resnet, 32).total
    with torch.inference_mode():
        gates = torch.cat([aig(xb).aux["gates"] for xb in batches]).numpy()
    skip_macs = float(card.per_sample(gates, len(gates))[0].mean())

    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
               "threads": args.threads, "torch": torch.__version__, "depth": cfg.model.depth,
               "target": cfg.model.target, "batch": args.batch, "images": int(len(gates)),
               "mean_gate_rate": float(gates.mean()),
               "gate_rate_per_layer": [round(float(r), 3) for r in gates.mean(0)]}
    rows = []
    for fmt_name, fmt in (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format)):
        xs = [b.contiguous(memory_format=fmt) for b in batches]
        for name, model, macs in (("resnet", resnet, plain_macs), ("aig-mask", aig, card.total),
                                  ("aig-skip", aig, skip_macs)):
            model.to(memory_format=fmt)
            if name.startswith("aig"):
                model.execution = name.split("-")[1]
            rows.append({"mode": name, "format": fmt_name, "images_per_s": images_per_s(model, xs, args.repeats),
                         "macs": macs})
    base = max((r for r in rows if r["mode"] == "resnet"), key=lambda r: r["images_per_s"])  # resnet's best
    for r in rows:
        r["mac_ratio"] = r["macs"] / base["macs"]
        r["time_ratio"] = base["images_per_s"] / r["images_per_s"]
    results["rows"] = rows
    print(f"AIG-{cfg.model.depth} (mean gate rate {results['mean_gate_rate']:.3f}) vs ResNet-{cfg.model.depth}, "
          f"batch {args.batch}, {args.threads} threads, {results['images']} CIFAR-10 test images; ratios against "
          f"the faster ResNet ({base['format']})")
    print(f"{'mode':<9} {'format':<14} {'images/s':>9} {'MMACs/img':>10} {'MAC ratio':>10} {'time ratio':>11}")
    for r in rows:
        print(f"{r['mode']:<9} {r['format']:<14} {r['images_per_s']:>9.1f} {r['macs'] / 1e6:>10.2f} "
              f"{r['mac_ratio']:>10.3f} {r['time_ratio']:>11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
