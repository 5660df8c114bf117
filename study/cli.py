"""The `dynastudy` command line: sweep, resume, run, pareto, best, describe, lesion, studies, dashboard, report.

Bad input (unknown method, dataset, sampler or key, a value out of range, malformed YAML, an unreachable
tracking URI or storage, an unknown study) ends with one line `dynastudy: error: ...` and exit code 2, before
anything is started or written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from trainables.hparams import ConfigError

EXIT_USAGE = 2
EXIT_UNDELIVERED = 3  # the sweep ended, but MLflow writes wait on disk for the tracking server (`resume` sends them)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "synthetic": 10}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise ConfigError(message.replace("\n", " "))


# ------------------------------------------------------------------------------------------------ config input

def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML (or JSON) mapping, nested or with flat dotted keys; a `config:` key (from `best`) is unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    if set(data) == {"config"} or ("config" in data and "val_acc" in data):
        data = data["config"]
    return flatten(data)


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def parse_choices(items: Sequence[str]) -> dict[str, tuple]:
    """`--choice KEY=V1,V2,...` (or KEY=[V1, V2]): a key searched as a categorical over these values."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--choice {item!r} is not key=value1,value2,...")
        try:
            values = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        except yaml.YAMLError:
            raise ConfigError(f"--choice {item!r}: the values are not valid YAML") from None
        if key.strip() in out:
            raise ConfigError(f"--choice {key.strip()} is given twice; give all its values in one --choice")
        out[key.strip()] = tuple(values) if isinstance(values, list) else (values,)
    return out


def fixed_keys(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, then the shortcut flags, then --set: later wins."""
    fixed = load_config_file(args.config) if getattr(args, "config", None) else {}
    for flag, key in (("dataset", "data.dataset"), ("epochs", "optim.epochs"), ("subset", "data.subset"),
                      ("image_size", "data.image_size")):
        if getattr(args, flag, None) is not None:
            fixed[key] = getattr(args, flag)
    fixed.update(parse_sets(getattr(args, "set", None)))
    return fixed


# ------------------------------------------------------------------------------------------------ commands

def _common_tracking(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                          "sqlite:///<results-dir>/mlflow.db)")
    p.add_argument("--results-dir", help="results root (default: DYNASTUDY_HOME, else ./dynastudy-results)")


def _uri(args: argparse.Namespace) -> tuple[Path, str]:
    from study import paths
    from study.tracking import default_tracking_uri

    root = paths.results_dir(args.results_dir)
    return root, args.tracking_uri or default_tracking_uri(root)


def _abs(path: str | None) -> str | None:
    """A folder as an absolute path: the sweep records it for `resume`, which may run from elsewhere."""
    return str(Path(path).expanduser().resolve()) if path else None


def cmd_sweep(args: argparse.Namespace) -> int:
    from study import paths
    from study.runner import SweepSpec, run_sweep

    fixed = fixed_keys(args)
    if args.seed is not None and "seed" not in fixed:
        fixed["seed"] = args.seed
    methods = tuple(dict.fromkeys(args.method or ([fixed["method"]] if "method" in fixed else [])))
    if not methods:
        raise ConfigError("no method: pass --method M (repeat it to search over several) or set method in --config")
    if len(methods) == 1:
        fixed["method"] = methods[0]
    root, uri = _uri(args)
    spec = SweepSpec(
        study=args.study, methods=methods, trials=args.trials, fixed=fixed, results_dir=root, tracking_uri=uri,
        storage=args.storage or paths.default_storage(root),
        data_dir=_abs(args.data_dir or os.environ.get("DYNASTUDY_DATA")), concurrency=args.concurrency,
        sampler=args.sampler, scheduler=args.scheduler, seed=args.seed or 0, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"), choices=parse_choices(args.choice),
        storage_path=args.storage_path or os.environ.get("DYNASTUDY_STORAGE_PATH"),
        tracking_timeout_s=args.tracking_timeout, objective=args.objective, compile=args.compile,
        ask_ahead=args.ask_ahead, population=args.population)
    population = f" (population {spec.summary()['population']})" if spec.sampler == "nsga2" else ""
    print(f"study {spec.study}: {spec.trials} trials of {', '.join(methods)}, {spec.concurrency} at a time, "
          f"sampler {spec.sampler}{population}, scheduler {spec.scheduler}")
    return _sweep_outcome(args, run_sweep(spec), spec.study, uri)


def _sweep_outcome(args: argparse.Namespace, result, study: str, uri: str) -> int:
    """The end of `sweep` and `resume`: the summary line, then the Pareto front; 130 when interrupted, 3 when
    tracking data is still waiting on disk for the server."""
    from study.tracking import redact

    if result.interrupted:
        print(f"sweep interrupted after {result.seconds:.0f}s: {len(result.outcomes)} of {result.trials} trials "
              f"finished; unfinished trials are KILLED in MLflow and FAIL in Optuna (`dynastudy resume --study "
              f"{study}` continues the sweep)", file=sys.stderr)
        return 130
    print(f"sweep done in {result.seconds:.0f}s: {result.count('complete')} complete, "
          f"{result.count('stopped')} stopped early, {result.count('diverged') + result.count('error')} failed")
    print(f"tracking: {redact(uri)}  (experiment {study!r}, sweep run {result.parent_run_id})")
    if result.undelivered:
        return EXIT_UNDELIVERED
    if result.count("complete"):
        args.study, args.method, args.format, args.out, args.ref_macs = study, None, "table", None, None
        args.by_method = args.all = False
        cmd_pareto(args)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from study import paths
    from study.runner import resume_sweep

    root, uri = _uri(args)
    result = resume_sweep(args.study, uri, args.storage or paths.default_storage(root), root,
                          ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"),
                          data_dir=_abs(args.data_dir))
    if result is None:
        print(f"study {args.study}: every sweep had finished; the saved tracking data is delivered")
        return 0
    return _sweep_outcome(args, result, args.study, uri)


def cmd_run(args: argparse.Namespace) -> int:
    """One configuration, trained once in this process (no Ray, no Optuna), logged to MLflow."""
    from study import paths
    from study.runner import check_study_name
    from study.tracking import Tracker, check_reachable
    from trainables import data as data_lib
    from trainables.config import TrialConfig
    from trainables.loop import RunContext, fit
    from trainables.methods import get_method

    fixed = fixed_keys(args)
    if args.method:
        fixed["method"] = args.method
    cfg = TrialConfig.from_flat(fixed)
    check_study_name(args.study)
    root, uri = _uri(args)
    data_dir = args.data_dir or os.environ.get("DYNASTUDY_DATA")
    tabular = getattr(get_method(cfg.method), "TABULAR", False)  # looks its results up: no data
    if not tabular:
        data_lib.check_source(cfg.data.dataset, data_dir)
    check_reachable(uri)
    splits = None
    if not tabular:
        arrays = data_lib.load_dataset(cfg.data.dataset, data_dir, paths.cache_dir(root), cfg.data.image_size)
        splits = data_lib.make_splits(arrays, cfg.data)  # a size that does not fit fails before any run exists
    tracker = Tracker(uri)
    exp_id = tracker.ensure_experiment(args.study, paths.artifacts_dir(root))
    run_id = tracker.start_trial(exp_id, None, args.study, cfg, f"run-{time.strftime('%Y%m%d-%H%M%S')}", kind="run")
    ctx = RunContext(device=args.device, threads=args.threads, compile=args.compile)
    try:
        for report in fit(cfg, splits, ctx):
            tracker.log_metrics(run_id, report.metrics, step=report.epoch)
            m = report.metrics
            if "level" in m:  # lottery tickets report once per pruning level
                print(f"level {int(m['level'])}/{report.epochs - 1} density={m['density']:.4f} "
                      f"val_acc={m['val_acc']:.4f} sparse_macs={m['sparse_macs'] / 1e6:.2f}M "
                      f"({m['level_time_s']:.0f}s)", flush=True)
            elif "train_loss" in m:
                print(f"epoch {report.epoch}/{report.epochs} train_loss={m['train_loss']:.4f} "
                      f"val_acc={m['val_acc']:.4f} ({m['epoch_time_s']:.0f}s)", flush=True)
            if report.final is not None:
                tracker.log_final(run_id, report.final, step=report.epoch)
                f = report.final
                print(f"val_acc={f.val_acc:.4f} test_acc={f.test_acc:.4f} macs={f.macs / 1e6:.2f}M "
                      f"(full network {f.cost.total / 1e6:.2f}M)  run {run_id}")
                for k in sorted(k for k in f.metrics if k.startswith("val_acc_head_")):
                    h = k.rsplit("_", 1)[1]
                    print(f"  head {h}: val_acc={f.metrics[k]:.4f} test_acc={f.metrics[f'test_acc_head_{h}']:.4f}")
                for note in f.notes:
                    print(f"note: {note}")
    except BaseException as e:
        tracker.fail(run_id, f"{type(e).__name__}: {e}")
        raise
    tracker.finish(run_id)
    return 0


def _point_records(df) -> list[dict[str, Any]]:
    cols = ["method", "run_id", "trial", "policy", "param", "threshold", "exit", "val_acc", "test_acc", "macs",
            "test_macs", "params"]
    from study.queries import point_overrides

    records = []
    for (_, point), row in zip(df.iterrows(), df[cols].to_dict(orient="records")):
        for key in ("param", "threshold"):
            row[key] = None if row[key] != row[key] else row[key]  # NaN -> null
        row["exit"] = int(row["exit"])
        row["overrides"] = point_overrides(point)
        records.append(row)
    return records


def cmd_pareto(args: argparse.Namespace) -> int:
    from study import paths, queries
    from study.tracking import Tracker, check_readable

    if args.format == "parquet" and not args.out:
        raise ConfigError("--format parquet needs --out FILE")
    _check_out(args.out)
    root, uri = _uri(args)
    check_readable(uri)
    tracker = Tracker(uri)
    points = queries.frontier_points(tracker, args.study, args.method, paths.cache_dir(root) / "frontiers")
    res = queries.pareto(points, ref_macs=args.ref_macs)

    def summary(r, who: str = "") -> str:
        return (f"{who}hypervolume {r.hypervolume / 1e6:.4f} (accuracy x MMACs) against reference point "
                f"(val_acc={r.ref_acc}, macs={r.ref_macs / 1e6:.2f}M); {len(r.front)} non-dominated of "
                f"{r.points} points from {r.trials} trials")

    hv = summary(res)
    if args.all:  # every point of every trial (each lottery level, each exit policy)
        res = dataclasses.replace(res, front=points.sort_values(["method", "macs"]).reset_index(drop=True))
        hv += f"; listing all {len(points)} points"
    elif args.by_method:  # each method's own front, every hypervolume against the one reference point
        import pandas as pd

        fronts = {m: queries.pareto(points[points["method"] == m], ref_macs=res.ref_macs)
                  for m in sorted(points["method"].unique())}
        res = dataclasses.replace(res, front=pd.concat([r.front for r in fronts.values()], ignore_index=True))
        hv = "\n".join(summary(r, f"{m}: ") for m, r in fronts.items())
    fmt = args.format
    if fmt == "table":
        text = _front_table(res.front, args.study, every=args.all) + "\n" + hv
        _emit(text, args.out)
        return 0
    print(hv, file=sys.stderr)
    if fmt == "json":
        _emit(json.dumps(_point_records(res.front), indent=1, default=float), args.out)
    elif fmt == "csv":
        df = res.front.copy()
        df["params"] = df["params"].map(lambda p: json.dumps(p, sort_keys=True))
        _emit(df.to_csv(index=False), args.out)
    elif fmt == "parquet":
        df = res.front.copy()
        df["params"] = df["params"].map(lambda p: json.dumps(p, sort_keys=True))
        df.to_parquet(args.out, index=False)
    return 0


_POLICY_PARAM = {"budgeted": "q=", "entropy": "H<"}


def _front_table(front, study: str, every: bool = False) -> str:
    lines = [f"{'Every point' if every else 'Pareto front'} of study {study!r} (validation accuracy vs expected MACs "
             "per image)",
             f"{'method':<9} {'trial':<9} {'policy':<11} {'param':>16} {'val_acc':>8} {'test_acc':>8} "
             f"{'MMACs':>9}  run"]
    for r in front.itertuples():
        param = f"exit {r.exit}" if r.policy == "static" else f"{_POLICY_PARAM.get(r.policy, '')}{r.param:.4g}"
        overrides = json.loads(r.overrides) if isinstance(getattr(r, "overrides", None), str) else {}
        param += "".join(f" {k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f" {k.split('.')[-1]}={v}"
                         for k, v in overrides.items())
        lines.append(f"{r.method:<9} {r.trial:<9} {r.policy:<11} {param:>16} {r.val_acc:>8.4f} {r.test_acc:>8.4f} "
                     f"{r.macs / 1e6:>9.3f}  {r.run_id[:12]}")
    return "\n".join(lines)


def _check_out(out: str | None) -> None:
    if out and not Path(out).resolve().parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {Path(out).resolve().parent} does not exist")


def _emit(text: str, out: str | None) -> None:
    if out:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        tmp.replace(out)
    else:
        print(text)


def cmd_best(args: argparse.Namespace) -> int:
    from study import paths, queries
    from study.tracking import Tracker, check_readable

    root, uri = _uri(args)
    check_readable(uri)
    points = queries.frontier_points(Tracker(uri), args.study, args.method, paths.cache_dir(root) / "frontiers")
    point = queries.best_point(points, max_macs=args.max_macs, min_acc=args.min_acc)
    config = queries.point_config(point)
    summary = {"val_acc": float(point["val_acc"]), "test_acc": float(point["test_acc"]),
               "macs": float(point["macs"]), "run_id": point["run_id"], "trial": point["trial"]}
    if args.format == "json":
        print(json.dumps({"config": config, **summary}, indent=1))
    else:
        bound = f"max-macs {args.max_macs:.4g}" if args.max_macs is not None else f"min-acc {args.min_acc}"
        print(f"# best point of study {args.study!r} under {bound}: val_acc={summary['val_acc']:.4f} "
              f"test_acc={summary['test_acc']:.4f} macs={summary['macs'] / 1e6:.3f}M (run {summary['run_id']})")
        print(f"# reproduce: dynastudy run --config FILE --study {args.study}   "
              "(or dynastudy sweep --config FILE --trials 1)")
        print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from trainables import cost as cost_lib
    from trainables.config import TrialConfig
    from trainables.methods import get_method

    fixed = fixed_keys(args)
    fixed["method"] = args.method
    cfg = TrialConfig.from_flat(fixed)
    dataset = cfg.data.dataset
    if dataset == "imagefolder":
        data_dir = args.data_dir or os.environ.get("DYNASTUDY_DATA")
        if not data_dir or not (Path(data_dir) / "train").is_dir():
            raise ConfigError("describe --dataset imagefolder needs --data-dir DIR with train/<class>/ folders")
        num_classes = sum(1 for p in (Path(data_dir) / "train").iterdir() if p.is_dir())
    else:
        num_classes = NUM_CLASSES[dataset]
    method = get_method(cfg.method)
    image_size = cfg.data.image_size
    if hasattr(method, "input_shape"):  # a method tied to its own data (nb201: the table's)
        dataset, num_classes, image_size = method.input_shape(cfg.model)
    model = method.build(cfg.model, num_classes)
    cost = cost_lib.measure(model, image_size)
    params = sum(p.numel() for p in model.parameters())
    train_only = sum(p.numel() for s in model.segments() if s.train_only for p in s.module.parameters())
    card = {"method": cfg.method, "paper": method.PAPER, "dataset": dataset, "num_classes": num_classes,
            "image_size": image_size, "params": params - train_only, "train_params": params,
            **cost.to_dict(), "config": {k: v for k, v in cfg.to_flat().items() if k.startswith("model.")}}
    paper = method.paper_macs(model, image_size) if hasattr(method, "paper_macs") else None
    for e, m in zip(card["exits"], paper or []):
        e["paper_macs"] = m  # the paper's own counting rules, for comparison with its figures
    if getattr(model, "notes", None):
        card["notes"] = list(model.notes)
    if args.format == "json":
        print(json.dumps(card, indent=1))
        return 0
    print(f"{card['method']}: {card['paper']}")
    print(f"dataset {dataset} ({num_classes} classes, {image_size}px); {card['params']:,} parameters; "
          f"{card['macs']:,} MACs per image for the whole network, every head included (FLOPs = 2 x MACs)")
    for note in card.get("notes", []):
        print(f"note: {note}")
    print(f"{'exit':>4} {'cumulative MACs':>16}" + (f" {'paper rules':>16}" if paper else ""))
    for e in card["exits"]:
        print(f"{e['exit']:>4} {e['macs']:>16,}" + (f" {e['paper_macs']:>16,}" if paper else ""))
    if paper:
        print("paper rules: the paper's own counter (conv MACs + ReLU elements + pooled elements + linear weights and "
              "biases); the first column (conv + linear MACs) is the platform's unit")
    if train_only:
        print(f"training only: side branches with {train_only:,} more parameters, discarded for inference")
        for h in card["side_heads"]:
            print(f"  side head {h['head']}: {h['macs']:,} MACs on its path (fork + its branch)")
    if card["train_macs"] != card["macs"]:
        why = "side branches included" if train_only else "stochastic depth skips branches"
        print(f"expected forward MACs of one training image: {card['train_macs']:,.0f} ({why})")
    gated = any("gate" in b for b in card["blocks"])
    print(f"{'block':<18} {'MACs':>12}" + ("  gate (the MACs are paid only when it opens)" if gated else ""))
    for b in card["blocks"]:
        print(f"{b['name']:<18} {b['macs']:>12,}" + (f"  {b['gate']}" if "gate" in b else "")
              + ("  training only" if b.get("train_only") else ""))
    return 0


def _parse_units(text: str, deletable: Sequence[int]) -> list[int] | None:
    if text == "all":
        return None
    try:
        chosen = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--blocks {text!r} is not 'all' or a comma-separated list of unit positions") from None
    bad = [c for c in chosen if c not in deletable]
    if bad or not chosen:
        raise ConfigError(f"--blocks {text!r}: {bad or 'nothing'} cannot be deleted; deletable units: "
                          f"{','.join(map(str, deletable))}")
    return chosen


def cmd_lesion(args: argparse.Namespace) -> int:
    """Veit et al.'s lesion study on a trained trial: delete or reorder units at test time, log the result."""
    import torch

    from study import paths
    from study.tracking import Tracker, check_readable
    from trainables import data as data_lib
    from trainables import lesion
    from trainables.config import TrialConfig
    from trainables.loop import eval_batches, final_exit_error
    from trainables.methods import get_method

    for flag, low in (("random_k", 0), ("repeats", 1), ("reorder_swaps", 0)):
        if getattr(args, flag) < low:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be {low} or more")
    root, uri = _uri(args)
    check_readable(uri)
    tracker = Tracker(uri)
    run, flat, weights = tracker.load_trial(args.run_id)
    cfg = TrialConfig.from_flat(flat)
    if args.test_subset is not None:
        cfg = cfg.replace(**{"data.test_subset": args.test_subset})
    method = get_method(cfg.method)
    probe = method.build(cfg.model, 10)  # checks the arguments before any data is loaded
    if not hasattr(probe, "lesion_units"):
        raise ConfigError(f"method {cfg.method!r} has no units to delete; the lesion study works on "
                          "resnet, elastic, aig and vgg trials")
    blocks = _parse_units(args.blocks, probe.lesion_units().deletable)
    if args.reorder_swaps and not probe.lesion_units().swap_groups:
        raise ConfigError(f"--reorder-swaps: no two units of this {cfg.method} network can trade places")
    data_dir = args.data_dir or os.environ.get("DYNASTUDY_DATA")
    data_lib.check_source(cfg.data.dataset, data_dir)
    arrays = data_lib.load_dataset(cfg.data.dataset, data_dir, paths.cache_dir(root), cfg.data.image_size)
    splits = data_lib.make_splits(arrays, cfg.data)
    model = method.build(cfg.model, splits.num_classes)
    model.load_state_dict(weights)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = model.to(device).to(memory_format=torch.channels_last)  # as in training, for identical results
    batches = eval_batches(splits, "test", device)
    df = lesion.study(model, lambda m: final_exit_error(m, batches, splits.test_y, device), blocks=blocks,
                      random_k=args.random_k, repeats=args.repeats, reorder_swaps=args.reorder_swaps, seed=args.seed,
                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    result = {"run_id": args.run_id, "method": cfg.method, "test_images": int(len(splits.test_y)),
              **lesion.summary(df)}
    k = method.num_exits(cfg.model)
    logged = run.data.metrics.get(f"test_acc_exit_{k - 1}")
    result["logged_test_error"] = None if logged is None else 1.0 - logged
    result["reproduced"] = None if logged is None or args.test_subset is not None \
        else abs((1.0 - logged) - result["baseline_error"]) < 0.5 / len(splits.test_y)
    if not args.no_log:
        title = f"lesion study: {cfg.method} run {args.run_id[:12]} ({len(splits.test_y)} test images)"
        tracker.log_artifacts(args.run_id, {"lesion.parquet": df, "lesion.png": lesion.plot(df, title),
                                            "lesion.json": json.dumps(result, indent=1)})
    if args.format == "json":
        print(json.dumps(result, indent=1))
        return 0
    print(f"lesion study of {cfg.method} run {args.run_id} on {result['test_images']} test images")
    print(f"intact: error {result['baseline_error']:.4f}" + (
        "" if logged is None else f" (logged at training: {1 - logged:.4f})"))
    for r in result["single"]:
        print(f"  unit {r['unit']:>3} deleted: error {r['error']:.4f}")
    for r in result["random"]:
        print(f"  {r['k']:>3} random units deleted: error {r['mean_error']:.4f} +- {r['std_error']:.4f} "
              f"(n={r['n']})")
    for r in result["reorder"]:
        print(f"  {r['k']:>3} swaps: Kendall tau {r['mean_kendall_tau']:.3f}, error {r['mean_error']:.4f} +- "
              f"{r['std_error']:.4f} (n={r['n']})")
    if not args.no_log:
        print(f"logged to run {args.run_id}: lesion.parquet, lesion.png, lesion.json")
    return 0


def cmd_lottery_compare(args: argparse.Namespace) -> int:
    """A lottery trial's ticket against its controls at every level (the same density): read from its run."""
    import tempfile

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from study.tracking import LOTTERY_TABLE, Tracker, check_readable

    _, uri = _uri(args)
    check_readable(uri)
    tracker = Tracker(uri)
    run = tracker.get_run(args.run_id)
    with tempfile.TemporaryDirectory() as d:
        try:
            table = pd.read_parquet(tracker.client.download_artifacts(args.run_id, LOTTERY_TABLE, d))
        except (MlflowException, OSError):
            method = run.data.tags.get("dynastudy.method", "?")
            raise ConfigError(f"run {args.run_id} has no {LOTTERY_TABLE}: it is not a finished lottery trial "
                              f"(method {method}, status {run.info.status})") from None
    cols = ["level", "density", "sparse_macs", "val_acc", "test_acc", "reinit_val_acc", "reinit_test_acc",
            "random_mask_val_acc", "random_mask_test_acc"]
    table = table.reindex(columns=cols)
    missing = [c.rsplit("_val_acc", 1)[0] for c in ("reinit_val_acc", "random_mask_val_acc")
               if table[c].iloc[1:].isna().all()]
    hint = (f"this trial trained no {' or '.join(missing)} control (model.controls="
            f"{run.data.params.get('model.controls', 'none')}); train one with the same settings: dynastudy run "
            f"--config CONFIG --set model.controls=both, CONFIG being this run's config.yaml artifact") \
        if missing and len(table) > 1 else ""
    if args.format == "json":
        records = json.loads(table.to_json(orient="records"))
        print(json.dumps({"run_id": args.run_id, "levels": records, "note": hint}, indent=1))
        return 0

    def fmt(v: float) -> str:
        return "-" if v != v else f"{v:.4f}"

    print(f"lottery ticket vs controls at the same density, run {args.run_id} (accuracy: validation / test)")
    print(f"{'level':>5} {'density':>8} {'sparse MMACs':>12} {'ticket':>15} {'random reinit':>15} {'random mask':>15}")
    for r in table.itertuples():
        print(f"{r.level:>5} {r.density:>8.4f} {r.sparse_macs / 1e6:>12.2f} "
              f"{fmt(r.val_acc) + ' / ' + fmt(r.test_acc):>15} "
              f"{fmt(r.reinit_val_acc) + ' / ' + fmt(r.reinit_test_acc):>15} "
              f"{fmt(r.random_mask_val_acc) + ' / ' + fmt(r.random_mask_test_acc):>15}")
    if hint:
        print(hint)
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from study.tracking import Tracker, check_readable

    _, uri = _uri(args)
    check_readable(uri)
    for name in Tracker(uri).studies():
        print(name)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from study import paths
    from study.tracking import check_readable

    root, uri = _uri(args)
    check_readable(uri)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port; valid: 1-65535")
    if args.refresh <= 0:
        raise ConfigError(f"--refresh {args.refresh} must be > 0 seconds")
    from dashboards.app import serve

    serve(uri, paths.cache_dir(root) / "frontiers", host=args.host, port=args.port, refresh_s=args.refresh)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from study import paths
    from study.tracking import Tracker, check_readable

    root, uri = _uri(args)
    check_readable(uri)
    from dashboards.data import StudyCache
    from dashboards.report import write_report

    if args.max_macs is not None and args.max_macs <= 0:
        raise ConfigError(f"--max-macs {args.max_macs} must be > 0")
    cache = StudyCache(Tracker(uri), paths.cache_dir(root) / "frontiers")  # an unknown study: one line from it
    for path in write_report(cache, list(dict.fromkeys(args.study)), Path(args.out), args.max_macs):
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    from study.search import AHEAD_MODES, SAMPLERS, SCHEDULERS
    from trainables.config import DATASETS
    from trainables.methods import METHOD_OBJECTIVES, METHODS

    # Metrics a method offers as the second objective instead of MACs (nb201: the table's latency, model size).
    offered = sorted({k for keys in METHOD_OBJECTIVES.values() for k in keys})
    objectives = ["macs", *offered]
    p = _Parser(prog="dynastudy", description="Hyperparameter studies of dynamic neural networks.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("sweep", help="run a multi-objective sweep (Ray Tune + Optuna, tracked in MLflow)")
    s.add_argument("--method", action="append", choices=list(METHODS),
                   help="method to sweep; repeat to make the method the first searched choice")
    s.add_argument("--study", required=True, help="study name (= MLflow experiment = Optuna study)")
    s.add_argument("--dataset", choices=list(DATASETS))
    s.add_argument("--trials", type=int, default=16)
    s.add_argument("--concurrency", type=int, default=2)
    s.add_argument("--epochs", type=int)
    s.add_argument("--subset", type=int, help="class-balanced subset of the training part")
    s.add_argument("--image-size", type=int, help="side images are resized to (image-folder datasets; default 32)")
    s.add_argument("--config", help="YAML file of fixed config keys (flat dotted keys or nested)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="fix a config key (repeatable); METHOD:KEY=VALUE fixes it for that method only")
    s.add_argument("--choice", action="append", metavar="KEY=V1,V2",
                   help="search a key over these values (repeatable), e.g. model.backbone=resnet18,mobilenet_v2 "
                        "or policy.name=budgeted,entropy; METHOD:KEY=... for that method only")
    s.add_argument("--data-dir", help="dataset folder (default: DYNASTUDY_DATA)")
    s.add_argument("--seed", type=int, help="sampler seed, and the trials' seed unless --set seed=...")
    s.add_argument("--sampler", choices=list(SAMPLERS), default="tpe")
    s.add_argument("--population", type=int,
                   help="NSGA-II's population (--sampler nsga2); default: a tenth of --trials, within 4..50")
    s.add_argument("--ask-ahead", choices=list(AHEAD_MODES), default="auto",
                   help="ask Optuna for the next configuration while trials run; auto: once 100 trials have ended, "
                        "when an ask costs at least 1%% of a trial (short trials); the price is one result the "
                        "sampler does not see")
    s.add_argument("--scheduler", choices=list(SCHEDULERS), default="fifo")
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.25")
    s.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial (from its checkpoint)")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<results-dir>/optuna.db)")
    s.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on loopback)")
    s.add_argument("--storage-path", help="Tune's storage for checkpoints and sweep state, reached by every node: "
                                          "an absolute shared path or s3://bucket/prefix (default: "
                                          "DYNASTUDY_STORAGE_PATH, else <results-dir>/ray)")
    s.add_argument("--objective", default="macs", choices=objectives,
                   help="the second objective, minimised beside validation accuracy: MACs, or a metric a method "
                        "reports (" + "; ".join(f"{m}: {', '.join(keys)}"
                                               for m, keys in sorted(METHOD_OBJECTIVES.items())) + ")")
    s.add_argument("--compile", action="store_true",
                   help="train every trial through torch.compile (inductor; the first epoch pays the compilation)")
    s.add_argument("--tracking-timeout", type=float, default=300.0,
                   help="seconds the sweep's end waits for an unreachable MLflow server before it keeps the "
                        "writes on disk for `resume`")
    _common_tracking(s)
    s.set_defaults(func=cmd_sweep)

    rs = sub.add_parser("resume", help="continue a study's interrupted sweep (driver killed, Ctrl-C) from Tune's "
                                       "saved state and the trials' checkpoints; deliver tracking data kept on disk")
    rs.add_argument("--study", required=True)
    rs.add_argument("--storage", help="Optuna storage URL of the sweep (default: sqlite:///<results-dir>/optuna.db)")
    rs.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on loopback)")
    rs.add_argument("--data-dir", help="dataset folder (default: the sweep's, else DYNASTUDY_DATA)")
    _common_tracking(rs)
    rs.set_defaults(func=cmd_resume)

    r = sub.add_parser("run", help="train one configuration in this process, logged to MLflow")
    r.add_argument("--config", help="YAML file of config keys (e.g. the output of `dynastudy best`)")
    r.add_argument("--method", choices=list(METHODS))
    r.add_argument("--study", default="runs")
    r.add_argument("--dataset", choices=list(DATASETS))
    r.add_argument("--epochs", type=int)
    r.add_argument("--subset", type=int)
    r.add_argument("--image-size", type=int)
    r.add_argument("--set", action="append", metavar="KEY=VALUE")
    r.add_argument("--data-dir")
    r.add_argument("--device", default="cpu")
    r.add_argument("--compile", action="store_true", help="train through torch.compile (inductor)")
    r.add_argument("--threads", type=int)
    _common_tracking(r)
    r.set_defaults(func=cmd_run)

    q = sub.add_parser("pareto", help="the study's accuracy-vs-MACs Pareto front, read from MLflow")
    q.add_argument("--study", required=True)
    q.add_argument("--method", choices=list(METHODS))
    q.add_argument("--format", choices=["table", "json", "csv", "parquet"], default="table")
    q.add_argument("--out", help="write to this file instead of standard output")
    q.add_argument("--ref-macs", type=float, help="hypervolume reference MACs (default 1.1 x the largest)")
    q.add_argument("--by-method", action="store_true",
                   help="each method's own front and hypervolume (one reference point), side by side")
    q.add_argument("--all", action="store_true", help="list every point of every trial, not only the front")
    _common_tracking(q)
    q.set_defaults(func=cmd_pareto)

    b = sub.add_parser("best", help="the best operating point under a budget, as a reproducible config")
    b.add_argument("--study", required=True)
    b.add_argument("--method", choices=list(METHODS))
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-macs", type=float, help="MACs budget per image (e.g. 2e7)")
    g.add_argument("--min-acc", type=float, help="validation accuracy floor (0-1)")
    b.add_argument("--format", choices=["yaml", "json"], default="yaml")
    _common_tracking(b)
    b.set_defaults(func=cmd_best)

    d = sub.add_parser("describe", help="a method's architecture card: parameters, MACs per exit and block")
    d.add_argument("--method", required=True, choices=list(METHODS))
    d.add_argument("--dataset", choices=list(DATASETS), default=None)
    d.add_argument("--data-dir")
    d.add_argument("--image-size", type=int)
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.add_argument("--format", choices=["json", "table"], default="table")
    d.set_defaults(func=cmd_describe)

    ls = sub.add_parser("lesion", help="delete or reorder residual blocks of a trained trial at test time "
                                       "(Veit et al. 2016) and log the errors to its run")
    ls.add_argument("--run-id", required=True,
                    help="MLflow run id of a finished trial (resnet, elastic, aig, vgg, dhm, dsl)")
    ls.add_argument("--blocks", default="all", help="units deleted one at a time: all, or positions like 3,7,12")
    ls.add_argument("--random-k", type=int, default=0, help="also delete k random units, k = 1..K (0: skip)")
    ls.add_argument("--repeats", type=int, default=10, help="random draws per k and per swap count")
    ls.add_argument("--reorder-swaps", type=int, default=0, help="also swap s random pairs, s = 1..S (0: skip)")
    ls.add_argument("--seed", type=int, default=0)
    ls.add_argument("--test-subset", type=int, help="class-balanced test subset (default: the trial's own test set)")
    ls.add_argument("--data-dir", help="dataset folder (default: DYNASTUDY_DATA)")
    ls.add_argument("--device", default="cpu")
    ls.add_argument("--threads", type=int)
    ls.add_argument("--no-log", action="store_true", help="print only; log nothing to the run")
    ls.add_argument("--format", choices=["json", "table"], default="table")
    _common_tracking(ls)
    ls.set_defaults(func=cmd_lesion)

    lc = sub.add_parser("lottery-compare", help="a lottery trial's ticket vs its controls (random re-init, random "
                                                "mask) at every pruning level")
    lc.add_argument("--run-id", required=True, help="MLflow run id of a finished lottery trial")
    lc.add_argument("--format", choices=["json", "table"], default="table")
    _common_tracking(lc)
    lc.set_defaults(func=cmd_lottery_compare)

    db = sub.add_parser("dashboard", help="serve the live Pareto explorer (Dash) over the tracking store")
    db.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    db.add_argument("--port", type=int, default=8050)
    db.add_argument("--refresh", type=float, default=5.0, help="seconds between looks for new trials")
    _common_tracking(db)
    db.set_defaults(func=cmd_dashboard)

    rp = sub.add_parser("report", help="the Pareto and compare plots as a self-contained HTML file and PNGs")
    rp.add_argument("--study", action="append", required=True, help="study to report (repeat to compare several)")
    rp.add_argument("--out", required=True, help="folder to write report.html and the PNGs into")
    rp.add_argument("--max-macs", type=float, help="MACs budget: its line and the best point per method under it")
    _common_tracking(rp)
    rp.set_defaults(func=cmd_report)

    st = sub.add_parser("studies", help="list the studies in the tracking store")
    _common_tracking(st)
    st.set_defaults(func=cmd_studies)
    return p


def _quiet_libraries() -> None:
    """One line per trial instead of Tune's status tables, MLflow's INFO lines and progress bars."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune warns when per-epoch checkpoints of short trials trigger frequent experiment snapshots; expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for name in ("alembic", "optuna", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ConfigError as e:
        print(f"dynastudy: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dynastudy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
