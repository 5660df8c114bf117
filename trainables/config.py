"""A trial's full configuration: data, optimisation, method and exit-policy hyperparameters.

Addressed by flat dotted keys (`data.subset`, `optim.lr`, `model.depth`, `policy.threshold`, `method`, `seed`):
that flat form is what `--set`, YAML configs, Optuna parameter names and MLflow params all use.
The seed is the replicate index and stays outside the configuration hash (open_lth), so replicates of one
configuration share a hash.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from trainables.hparams import ConfigError, Hparams, _coerce, build_group, fold_indexed, hp, stable_hash

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")


@dataclasses.dataclass(frozen=True)
class DataHparams(Hparams):
    dataset: str = hp("cifar10", "dataset name", choices=DATASETS)
    val_size: int = hp(5000, "validation images carved (stratified) from the training set", low=1)
    subset: int = hp(0, "class-balanced subset of the training part for quick runs (0 = all)", low=0)
    test_subset: int = hp(0, "class-balanced subset of the test set, for quick runs (0 = all)", low=0)
    image_size: int = hp(32, "side length images are resized to (image-folder datasets)", low=8, high=512)
    augment: bool = hp(True, "4-px reflect-pad random crop + horizontal flip during training")
    split_seed: int = hp(0, "seed of the train/validation split and of subsets (the same for every trial)", low=0)


@dataclasses.dataclass(frozen=True)
class OptimHparams(Hparams):
    epochs: int = hp(10, "training epochs", low=1, high=10000)
    batch_size: int = hp(128, "minibatch size", low=1, high=65536)
    lr: float = hp(0.1, "peak SGD learning rate", low=1e-6, high=10.0)
    momentum: float = hp(0.9, "SGD momentum", low=0.0, high=0.999)
    nesterov: bool = hp(True, "Nesterov momentum")
    weight_decay: float = hp(5e-4, "L2 weight decay", low=0.0, high=0.1)
    schedule: str = hp("cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant"))
    warmup_epochs: float = hp(0.0, "linear learning-rate warm-up, in epochs", low=0.0, high=1000.0)
    warmup_steps: int = hp(0, "linear learning-rate warm-up, in steps (iterations); replaces warmup_epochs when > 0",
                           low=0, high=10_000_000)
    label_smoothing: float = hp(0.0, "label smoothing of every exit's cross-entropy", low=0.0, high=0.5)


POLICIES = ("confidence", "static", "budgeted", "entropy", "sdn")


@dataclasses.dataclass(frozen=True)
class PolicyHparams(Hparams):
    """How a multi-exit network picks its exit at inference (trainables/policies.py); evaluation only: changing it
    needs no retraining."""

    name: str = hp("confidence", "exit policy of the operating point: confidence (max-softmax thresholds), static "
                   "(one exit), budgeted (MSDNet's geometric exit prior, thresholds derived on validation), "
                   "entropy (BranchyNet), sdn (most confident exit, full cost, if none is confident)",
                   choices=POLICIES)
    threshold: float = hp(0.9, "confidence and sdn policies: max-softmax needed to exit (one for every exit)",
                          low=0.0, high=1.0)
    thresholds: tuple[float, ...] = hp((), "confidence and sdn policies: one threshold per exit (overrides "
                                       "threshold)", low=0.0, high=1.0)
    entropy: float = hp(0.5, "entropy policy: exit where the softmax entropy (nats) is below this", low=0.0,
                        high=20.0)
    entropies: tuple[float, ...] = hp((), "entropy policy: one entropy threshold per exit (overrides entropy)",
                                      low=0.0, high=20.0)
    q: float = hp(1.0, "budgeted policy: ratio of the exit prior pi_k ~ q^k (< 1 front-loads exits, > 1 back-loads "
                  "them; MSDNet sweeps 0.05..1.95)", low=0.001, high=100.0)
    exit: int = hp(-1, "static policy: the exit every sample takes (-1 = the last)", low=-1)
    grid: tuple[str, ...] = hp((), "policy families swept for the trial's frontier, besides the static exits "
                               "(empty = the operating policy's own family and budgeted), e.g. [entropy,sdn]",
                               choices=POLICIES)


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    method: str
    model: Hparams
    data: DataHparams = DataHparams()
    optim: OptimHparams = OptimHparams()
    policy: PolicyHparams = PolicyHparams()
    seed: int = 0

    GROUPS = ("data", "optim", "model", "policy")

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "TrialConfig":
        """Strictly parse flat dotted keys; raises ConfigError naming the bad key or value and the choices."""
        from trainables.methods import get_method  # the registry imports this module

        flat = fold_indexed(flat)
        if "method" not in flat:
            raise ConfigError("the config names no method (set method=...)")
        method = get_method(str(flat["method"]))
        groups: dict[str, dict[str, Any]] = {g: {} for g in cls.GROUPS}
        seed = 0
        for key, value in flat.items():
            if key == "method":
                continue
            if key == "seed":
                seed = value
                continue
            group, _, name = key.partition(".")
            if group not in groups or not name:
                raise ConfigError(f"unknown config key {key!r}; valid keys: method, seed, "
                                  + ", ".join(f"{g}.*" for g in cls.GROUPS))
            groups[group][name] = value
        seed = _coerce("seed", seed, int)
        if seed < 0:
            raise ConfigError(f"seed={seed} is outside the allowed range [0, None]")
        cfg = cls(
            method=method.NAME,
            model=build_group(method.Hparams, "model.", groups["model"]),
            data=build_group(DataHparams, "data.", groups["data"]),
            optim=build_group(OptimHparams, "optim.", groups["optim"]),
            # a method may bring its own default policy (MSDNet: budgeted); the user's keys still win
            policy=build_group(PolicyHparams, "policy.", {**getattr(method, "POLICY_DEFAULTS", {}),
                                                         **groups["policy"]}),
            seed=seed,
        )
        k = method.num_exits(cfg.model)
        for key in ("thresholds", "entropies"):
            values = getattr(cfg.policy, key)
            if values and len(values) != k:
                raise ConfigError(f"policy.{key} has {len(values)} values; this {cfg.method} network has {k} exits")
        if cfg.policy.exit >= k:
            raise ConfigError(f"policy.exit={cfg.policy.exit} is outside the allowed range [-1, {k - 1}]")
        return cfg

    @classmethod
    def valid_keys(cls, method: str) -> list[str]:
        from trainables.methods import get_method

        keys = ["method", "seed"]
        for group, hcls in (("data", DataHparams), ("optim", OptimHparams),
                            ("model", get_method(method).Hparams), ("policy", PolicyHparams)):
            keys += [f"{group}.{n}" for n in hcls.field_names()]
        return keys

    def to_flat(self) -> dict[str, Any]:
        """Every field, resolved, as flat dotted keys (tuples as lists)."""
        out: dict[str, Any] = {"method": self.method, "seed": self.seed}
        for group in self.GROUPS:
            for name, value in getattr(self, group).to_dict().items():
                out[f"{group}.{name}"] = list(value) if isinstance(value, tuple) else value
        return out

    def identity(self) -> dict[str, Any]:
        """What the hash covers: the method and every non-default field, not the seed (the replicate)."""
        return {"method": self.method, **{g: getattr(self, g).non_default() for g in self.GROUPS}}

    def config_hash(self) -> str:
        return stable_hash(self.identity())

    def replace(self, **flat: Any) -> "TrialConfig":
        """A copy with some flat keys changed, parsed as strictly as the original."""
        merged = self.to_flat()
        for key in list(merged):  # an element-wise override changes one element of the list
            if isinstance(merged[key], list) and any(k.startswith(key + ".") for k in flat):
                merged.update({f"{key}.{i}": v for i, v in enumerate(merged.pop(key))})
        merged.update(flat)
        return TrialConfig.from_flat(merged)
