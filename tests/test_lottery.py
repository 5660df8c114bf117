"""Lottery tickets: exact pruning counts, zeros that stay zero, exact rewinding, nested masks, resumption at a
level, the controls, sparse MACs and the per-level frontier."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainables import cost as cost_lib
from trainables import loop as loop_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import lottery

CTX = loop_lib.RunContext(threads=2)


def _cfg(**flat):
    base = {"method": "lottery", "model.depth": 20, "data.dataset": "synthetic", "data.val_size": 100,
            "optim.epochs": 1, "optim.batch_size": 50, "model.levels": 3}
    return TrialConfig.from_flat({**base, **flat})


def _run(cfg, splits, state=None):
    reports = []
    for r in loop_lib.fit(cfg, splits, CTX, state):
        reports.append((r, r.state()))
    return reports


@pytest.fixture(scope="module")
def three_levels(tiny_splits):
    """Dense level 0 and three pruning levels, rewinding to step 3 (mid-epoch), f = 0.2, global."""
    cfg = _cfg(**{"model.rewind_step": 3})
    return cfg, _run(cfg, tiny_splits)


def test_prune_removes_exactly_the_fraction_by_magnitude_and_nests():
    torch.manual_seed(0)
    weights = {"a": torch.randn(10, 10), "b": torch.randn(50)}
    masks = {"a": torch.ones(10, 10, dtype=torch.bool), "b": torch.ones(50, dtype=torch.bool)}
    m1 = lottery.prune(masks, weights, 0.2, "global")
    assert sum(int(m.sum()) for m in m1.values()) == 150 - 30
    kept = torch.cat([weights[n].abs().flatten()[m1[n].flatten()] for n in m1])
    dropped = torch.cat([weights[n].abs().flatten()[~m1[n].flatten()] for n in m1])
    assert dropped.max() <= kept.min()  # the smallest magnitudes went
    m2 = lottery.prune(m1, weights, 0.2, "global")
    assert sum(int(m.sum()) for m in m2.values()) == 120 - math.ceil(0.2 * 120)
    assert all(not (m2[n] & ~m1[n]).any() for n in m2)  # nested
    lw = lottery.prune(masks, weights, 0.2, "layerwise")
    assert int(lw["a"].sum()) == 80 and int(lw["b"].sum()) == 40
    # Ties are broken by position, so the count is exact even when every magnitude is equal.
    flat = lottery.prune({"c": torch.ones(7, dtype=torch.bool)}, {"c": torch.ones(7)}, 0.5, "global")
    assert int(flat["c"].sum()) == 3


def test_random_masks_keep_the_per_layer_density():
    masks = {"a": torch.rand(20, 20) < 0.3, "b": torch.rand(100) < 0.7}
    rnd = lottery.random_masks(masks, torch.Generator().manual_seed(1))
    assert all(int(rnd[n].sum()) == int(masks[n].sum()) for n in masks)
    assert not torch.equal(rnd["a"], masks["a"])


def test_levels_prune_to_0_8_to_the_n_keep_zeros_nest_and_rewind_exactly(tiny_splits, three_levels):
    cfg, reports = three_levels
    assert [r.epoch for r, _ in reports] == [1, 2, 3, 4] and reports[-1][0].final is not None
    states = [s for _, s in reports]
    total = sum(m.numel() for m in states[0]["masks"].values())
    for n, (r, s) in enumerate(reports):
        kept = sum(int(m.sum()) for m in s["masks"].values())
        assert abs(kept - 0.8 ** n * total) <= n  # ceil() per level: within one weight per level of 0.8^n
        assert r.metrics["density"] == pytest.approx(kept / total)
        for name, mask in s["masks"].items():  # pruned weights are exactly zero after training
            assert (s["weights"][f"{name}.weight"][~mask] == 0).all()
        if n:
            assert all(not (mask & ~states[n - 1]["masks"][name]).any() for name, mask in s["masks"].items())
    # The step-3 weights are those of an independent dense run stopped after 3 steps.
    torch.manual_seed(cfg.seed)
    model = lottery.build(cfg.model, 10).to(memory_format=torch.channels_last)
    train = loop_lib.train_batches(cfg, tiny_splits, torch.device("cpu"), True)
    opt, sched = loop_lib.make_optimizer(cfg, model, len(train))
    seen = {}

    def capture(step):
        if step == 3:
            seen["w"] = {k: v.clone() for k, v in model.state_dict().items()}

    loop_lib.train_epoch(cfg, lottery, model, train, opt, sched, torch.device("cpu"), 0, after_step=capture)
    rewind = states[0]["rewind"]
    assert all(torch.equal(rewind[k], seen["w"][k]) for k in rewind)


def test_rewinding_restores_the_step_k_weights_of_the_surviving_entries(tiny_splits):
    # With k = the last step, a pruned level trains for zero steps: its weights are the step-k weights, masked.
    steps = len(loop_lib.train_batches(_cfg(), tiny_splits, torch.device("cpu"), False))
    reports = _run(_cfg(**{"model.rewind_step": steps, "model.levels": 1}), tiny_splits)
    (_, s0), (_, s1) = reports
    assert all(torch.equal(s0["rewind"][k], s0["weights"][k]) for k in s0["rewind"])  # step k = the end
    for key, value in s1["weights"].items():
        name = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and name in s1["masks"]:
            assert torch.equal(value, s0["rewind"][key] * s1["masks"][name])
        else:
            assert torch.equal(value, s0["rewind"][key])  # biases, BatchNorm parameters and statistics too


def test_a_resumed_trial_continues_at_its_level_with_the_same_masks(tiny_splits, three_levels):
    cfg, full = three_levels
    killed_after_level_1 = full[1][1]  # the checkpoint a killed trial left
    resumed = _run(cfg, tiny_splits, state=killed_after_level_1)
    assert [r.epoch for r, _ in resumed] == [3, 4]  # levels 0 and 1 are not recomputed
    for (_, a), (_, b) in zip(full[2:], resumed):
        assert all(torch.equal(a["masks"][n], b["masks"][n]) for n in a["masks"])
        assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert resumed[-1][0].final.frontier["level"].tolist() == [0, 1, 2, 3]
    assert resumed[-1][0].final.frontier["val_acc"].tolist() == full[-1][0].final.frontier["val_acc"].tolist()


def test_sparse_macs_frontier_and_controls(tiny_splits):
    cfg = _cfg(**{"model.levels": 1, "model.controls": "both", "model.exclude": ["first_conv", "last_linear"]})
    reports = _run(cfg, tiny_splits)
    final = reports[-1][0].final
    model = lottery.build(cfg.model, 10)
    layers = lottery.prunable(model, cfg.model.exclude)
    names = [n for n, _ in layers]
    assert names[0] != "net.stem.0" and names[-1] != "net.head.fc" and "net.head.fc" not in names
    layer_macs = dict(zip(names, cost_lib.module_macs(model, [m for _, m in layers], 32)))
    dense = cost_lib.measure(model, 32).total
    masks = reports[-1][1]["masks"]
    expected = dense - sum((1 - masks[n].float().mean().item()) * layer_macs[n] for n in names)
    assert final.macs == pytest.approx(expected) and final.macs < dense
    table = final.tables["lottery"]
    assert table["level"].tolist() == [0, 1]
    assert table[["reinit_val_acc", "random_mask_val_acc"]].iloc[1:].notna().all().all()
    assert table[["reinit_val_acc", "random_mask_val_acc"]].iloc[0].isna().all()  # level 0 is dense: no control
    f = final.frontier
    assert f["macs"].tolist() == table["sparse_macs"].tolist() and f["operating"].tolist() == [False, True]
    assert json.loads(f["overrides"].iloc[0]) == {"model.levels": 0, "model.target_density": 0.0}
    assert TrialConfig.from_flat({**cfg.to_flat(), **json.loads(f["overrides"].iloc[0])}).model.levels == 0


def test_target_density_sets_the_levels_and_bad_settings_are_one_line_errors(tiny_splits):
    assert lottery.num_levels(_cfg(**{"model.target_density": 0.5}).model) == 4  # 0.8^4 = 0.41 <= 0.5 < 0.8^3
    assert lottery.num_levels(_cfg(**{"model.target_density": 0.8}).model) == 1
    for flat, match in (({"model.depth": 16}, "depth=16 is not a resnet depth; valid: 20, 32, 56, 110"),
                        ({"model.exclude": ["fc"]}, "model.exclude='fc' is not one of: first_conv, last_linear"),
                        ({"model.scope": "local"}, "model.scope='local' is not one of: global, layerwise")):
        with pytest.raises(ConfigError, match=match):
            _cfg(**flat)
    with pytest.raises(ConfigError, match="model.rewind_step=1000 is past the end of training"):
        _run(_cfg(**{"model.rewind_step": 1000}), tiny_splits)


def test_vgg_backbone_prunes_its_convolutions_and_classifier():
    cfg = _cfg(**{"model.backbone": "vgg", "model.depth": 11, "model.exclude": ["last_linear"]})
    model = lottery.build(cfg.model, 10)
    layers = lottery.prunable(model, cfg.model.exclude)
    assert len(layers) == 8 and all(isinstance(m, torch.nn.Conv2d) for _, m in layers)  # VGG-11: 8 convs
    assert len(lottery.prunable(model)) == 9  # and the classifier when nothing is excluded
