"""Strict config parsing, validation and the stable configuration hash."""

from __future__ import annotations

import pytest

from trainables.config import TrialConfig
from trainables.hparams import ConfigError, fold_indexed


def test_defaults_and_flat_round_trip():
    cfg = TrialConfig.from_flat({"method": "elastic", "model.depth": 32, "optim.lr": "0.05"})
    assert cfg.model.depth == 32 and cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    again = TrialConfig.from_flat(cfg.to_flat())
    assert again == cfg and again.config_hash() == cfg.config_hash()


def test_hash_is_pinned():
    # Changing these literals means every stored study's config hashes change: add fields with defaults instead.
    assert TrialConfig.from_flat({"method": "resnet"}).config_hash() == "5159c7a4c471"
    assert TrialConfig.from_flat({"method": "elastic", "model.depth": 56}).config_hash() == \
        TrialConfig.from_flat({"method": "elastic", "model.depth": 56, "optim.lr": 0.1}).config_hash()


def test_hash_ignores_seed_and_tracks_values():
    a = TrialConfig.from_flat({"method": "elastic", "seed": 1})
    b = TrialConfig.from_flat({"method": "elastic", "seed": 2})
    c = TrialConfig.from_flat({"method": "elastic", "optim.lr": 0.2})
    assert a.config_hash() == b.config_hash() != c.config_hash()


@pytest.mark.parametrize("flat, fragment", [
    ({"method": "nope"}, "unknown method 'nope'; valid methods: resnet, elastic"),
    ({"method": "resnet", "optim.lrr": 1}, "unknown config key 'optim.lrr'"),
    ({"method": "resnet", "bogus.x": 1}, "unknown config key 'bogus.x'"),
    ({"method": "resnet", "model.depth": 21}, "model.depth=21 is not one of: 20, 32, 56, 110"),
    ({"method": "resnet", "optim.lr": -1}, "optim.lr=-1.0 is outside the allowed range"),
    ({"method": "resnet", "optim.epochs": "three"}, "optim.epochs='three' is not an integer"),
    ({"method": "resnet", "data.augment": "maybe"}, "data.augment='maybe' is not a boolean"),
    ({"method": "resnet", "optim.schedule": "linear"}, "optim.schedule='linear' is not one of: cosine, step"),
    ({"method": "elastic", "model.weights": "independent"}, "exit_weights has 0 values; depth 20 has 9 exits"),
    ({"method": "elastic", "policy.exit": 9}, "policy.exit=9 is outside the allowed range [-1, 8]"),
    ({"model.depth": 20}, "names no method"),
])
def test_bad_configs_raise_one_line(flat, fragment):
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_flat(flat)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_elementwise_keys_fold_into_lists():
    flat = {"method": "elastic", "model.weights": "independent",
            **{f"model.exit_weights.{k}": 0.5 for k in range(8)}, "model.exit_weights.8": 1.0}
    cfg = TrialConfig.from_flat(flat)
    assert cfg.model.exit_weights == (0.5,) * 8 + (1.0,)
    with pytest.raises(ConfigError, match="element indices"):
        fold_indexed({"model.exit_weights.1": 1.0})
    assert cfg.replace(**{"model.exit_weights.0": 0.25}).model.exit_weights[0] == 0.25
