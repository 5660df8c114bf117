"""What one training epoch of a configuration costs on this machine (issue 5: the MSDNet presets).

Trains each configuration for one epoch on the full CIFAR-10 training part (45,000 images; 5,000 held out for
validation) through `dynastudy run` into one study, then reads back from MLflow: training images/s, the epoch's
seconds (training plus the validation pass), the whole run's wall time (data load, cost measurement, the final
validation and test passes), MACs per image at inference and per training image. A configuration already
finished in the study at the same config hash is not trained again.

  python benchmarks/epoch_cost.py --data-dir ../shared/data --results-dir /tmp/epoch-cost \\
      [--configs msdnet-anytime,msdnet-budgeted] [--threads 2] [--subset 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from study.tracking import TAG_HASH, TAG_KIND, Tracker  # noqa: E402
from trainables.config import TrialConfig  # noqa: E402

# name -> config keys; the MSDNet presets at the official batch size, lr and weight decay (methods.md section 5).
CONFIGS = {
    "msdnet-anytime": {"method": "msdnet", "model.preset": "anytime", "optim.batch_size": 64,
                       "optim.weight_decay": 1e-4},
    "msdnet-budgeted": {"method": "msdnet", "model.preset": "budgeted", "optim.batch_size": 64,
                        "optim.weight_decay": 1e-4},
    "sdn-resnet56": {"method": "sdn", "model.depth": 56},
    "elastic-resnet20": {"method": "elastic", "model.depth": 20},
    "elastic-mobilenet_v2": {"method": "elastic", "model.backbone": "mobilenet_v2"},
    "elastic-resnet18": {"method": "elastic", "model.backbone": "resnet18"},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DYNASTUDY_DATA"))
    p.add_argument("--results-dir", required=True)
    p.add_argument("--study", default="epoch-cost")
    p.add_argument("--configs", default="msdnet-anytime,msdnet-budgeted")
    p.add_argument("--subset", type=int, default=0, help="training images (0 = all 45,000)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        p.error(f"--configs {','.join(bad)}: valid configs are {', '.join(CONFIGS)}")
    root = Path(args.results_dir).resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    rows = []
    for name in names:
        keys = {**CONFIGS[name], "optim.epochs": 1, "data.subset": args.subset}
        config_hash = TrialConfig.from_flat(keys).config_hash()
        run = _finished(uri, args.study, config_hash) if (root / "mlflow.db").exists() else None
        wall = None
        if run is None:
            cmd = [sys.executable, "-m", "study.cli", "run", "--method", keys["method"], "--study", args.study,
                   "--results-dir", str(root), "--threads", str(args.threads)]
            cmd += [a for k, v in keys.items() if k != "method" for a in ("--set", f"{k}={v}")]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            print(f"{name}: training one epoch", flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
            wall = time.perf_counter() - t0
            run = _finished(uri, args.study, config_hash)
        m = run.data.metrics
        rows.append({"config": name, "run_id": run.info.run_id, "images_per_s": m["images_per_s"],
                     "epoch_time_s": m["epoch_time_s"], "run_wall_s": wall, "macs": m["macs_full"],
                     "train_macs": m["train_macs"], "val_acc": m["val_acc"], "test_acc": m["test_acc"],
                     "batch_size": int(run.data.params["optim.batch_size"])})
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
               "threads": args.threads, "subset": args.subset, "rows": rows}
    print(f"\n{'config':<22} {'batch':>5} {'img/s':>7} {'epoch s':>8} {'run s':>7} {'MMACs':>7} {'train MMACs':>11} "
          f"{'val_acc':>7}")
    for r in rows:
        wall = f"{r['run_wall_s']:.0f}" if r["run_wall_s"] else "-"
        print(f"{r['config']:<22} {r['batch_size']:>5} {r['images_per_s']:>7.1f} {r['epoch_time_s']:>8.0f} "
              f"{wall:>7} {r['macs'] / 1e6:>7.2f} {r['train_macs'] / 1e6:>11.2f} {r['val_acc']:>7.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def _finished(uri: str, study: str, config_hash: str):
    tracker = Tracker(uri)
    exp = tracker.experiment_id(study)
    if exp is None:
        return None
    runs = tracker.client.search_runs(
        [exp], f"tags.`{TAG_KIND}` = 'run' and tags.`{TAG_HASH}` = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1)
    return runs[0] if runs else None


if __name__ == "__main__":
    sys.exit(main())
