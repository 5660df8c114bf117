"""ConvNet-AIG: the straight-through Gumbel gate, the target-rate loss, deterministic evaluation, real skipping
against masking, and the per-sample cost model of gated networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables import cost as cost_lib
from trainables import policies
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.loop import fit
from trainables.methods import aig
from trainables.outputs import MultiExitOutput


def _aig(**flat):
    cfg = TrialConfig.from_flat({"method": "aig", "model.depth": 20, **flat})
    torch.manual_seed(0)
    return cfg, aig.build(cfg.model, 10)


def _input_dependent_gates(model):
    """Gates initialised near-constant open; make their decisions depend on the input for the tests."""
    torch.manual_seed(1)
    for gate in model.gates.values():
        torch.nn.init.normal_(gate.fc2.weight, 0.0, 1.0)
        torch.nn.init.zeros_(gate.fc2.bias)
    return model


def test_straight_through_forward_is_exactly_one_hot_and_backward_is_the_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(64, 2)
    noise = aig.gumbel_noise(logits.shape, "cpu")
    weights = torch.randn(64, 2)

    a = logits.clone().requires_grad_()
    hard = aig.gumbel_st(a, tau=0.7, noise=noise)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.sum(1), torch.ones(64))
    assert torch.equal(hard.argmax(1), (logits + noise).argmax(1))
    (hard * weights).sum().backward()

    b = logits.clone().requires_grad_()
    (F.softmax((b + noise) / 0.7, dim=-1) * weights).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_temperature_is_used_and_annealed():
    cfg, _ = _aig(**{"model.tau": 2.0, "model.anneal": "exponential", "model.tau_final": 0.5})
    assert aig.temperature(cfg.model, 0.0) == 2.0
    assert aig.temperature(cfg.model, 1.0) == pytest.approx(0.5)
    assert aig.temperature(cfg.model, 0.5) == pytest.approx(1.0)
    lin = cfg.replace(**{"model.anneal": "linear"}).model
    assert aig.temperature(lin, 0.5) == pytest.approx(1.25)
    # a lower temperature makes the soft sample (and so the gradient) sharper
    torch.manual_seed(0)
    logits, noise = torch.randn(32, 2), aig.gumbel_noise((32, 2), "cpu")
    soft = [F.softmax((logits + noise) / t, -1)[:, 1] for t in (5.0, 0.2)]
    assert (soft[1] - 0.5).abs().mean() > (soft[0] - 0.5).abs().mean()


def test_target_rate_loss_on_a_fixed_gate_pattern():
    gates = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.float32)  # rates 0.75 each
    expected = 2.0 * ((0.6 - 0.75) ** 2 + (0.5 - 0.75) ** 2 + (1.0 - 0.75) ** 2) / 3
    assert aig.rate_loss(gates, [0.6, 0.5, 1.0], 2.0).item() == pytest.approx(expected, abs=1e-7)

    cfg, _ = _aig(**{"model.pin_open": "first+downsampling", "model.lam": 2.0,
                     "model.targets": [0.6, 0.5, 1.0, 0.6, 0.5, 1.0]})
    logits = torch.randn(4, 10)
    y = torch.arange(4)
    out = MultiExitOutput([logits], {"gates": gates.repeat(1, 2)})
    total = aig.loss(out, y, cfg.model)
    assert total.item() == pytest.approx(F.cross_entropy(logits, y).item() + expected, abs=1e-6)


def test_pinned_blocks_are_not_gated():
    cfg, model = _aig(**{"model.pin_open": "first+downsampling"})
    assert aig.gated_blocks(cfg.model) == [1, 2, 4, 5, 7, 8]
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).aux["gates"].shape == (2, 6)
    assert cost_lib.measure(model, 32).num_gates == 6


def test_bad_aig_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="tau_final"):
        _aig(**{"model.tau_final": 0.3})
    with pytest.raises(ConfigError, match="targets has 2 values; depth 20 .* has 9 gated layers"):
        _aig(**{"model.targets": [0.5, 0.5]})


def test_evaluation_is_deterministic():
    model = _input_dependent_gates(_aig()[1]).eval()
    x = torch.randn(32, 3, 32, 32)
    a, b = model(x), model(x)
    assert torch.equal(a.aux["gates"], b.aux["gates"]) and torch.equal(a.final, b.final)
    assert 0 < a.aux["gates"].mean() < 1


def test_cutoff_moves_the_test_time_gate():
    model = _input_dependent_gates(_aig()[1]).eval()
    x = torch.randn(32, 3, 32, 32)
    rates = []
    for cutoff in (0.2, 0.5, 0.8):
        model.cutoff = cutoff
        rates.append(model(x).aux["gates"].mean().item())
    assert rates[0] > rates[1] > rates[2]


def test_real_skipping_matches_masking_and_its_counted_macs_are_the_expected_macs():
    model = _input_dependent_gates(_aig()[1]).eval()
    card = cost_lib.measure(model, 32)
    x = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        model.execution = "mask"
        masked = model(x)
        model.execution = "skip"
        skipped = model(x)
    gates = skipped.aux["gates"]
    assert torch.equal(gates, masked.aux["gates"])
    assert 0 < gates.mean() < 1 and (gates.sum(0) < 48).any()
    torch.testing.assert_close(skipped.final, masked.final, rtol=1e-4, atol=1e-5)

    per_sample = card.per_sample(gates.numpy(), 48)
    counted = cost_lib.count_macs(model, x)  # every sample of the batch, as actually executed
    assert counted == int(round(per_sample[0].sum()))
    # the issue's formula: always-run parts + sum_l rate_l x MACs of l's branch (the gates included)
    blocks = dict(card.blocks)
    branch = [blocks[f"block{i}.residual"] for i in range(9)]
    analytic = card.total - sum((1 - r) * m for r, m in zip(gates.mean(0).tolist(), branch))
    assert per_sample[0].mean() == pytest.approx(analytic)
    assert counted < card.total * 48


def test_per_sample_costs_on_a_hand_made_cost_model():
    card = cost_lib.CostModel(blocks=(("stem", 10), ("b0.gate", 1), ("b0.residual", 100), ("head0", 5),
                                      ("b1.residual", 50), ("head1", 5)),
                              exits=(116, 171), gates=(None, None, 0, None, 1, None), exit_blocks=(3, 5))
    gates = np.array([[1, 1], [0, 1], [0, 0]])
    np.testing.assert_array_equal(card.per_sample(gates, 3), [[116, 16, 16], [171, 71, 21]])
    probs = np.zeros((2, 3, 2))
    probs[:, :, 0] = 1.0
    cache = policies.ExitCache(probs, np.zeros(3, dtype=np.int64), card.per_sample(gates, 3))
    out = policies.evaluate(cache, np.array([0, 1, 1]), card.exits)
    assert out.macs == pytest.approx((116 + 71 + 21) / 3)


def test_fit_logs_gate_rates_and_expected_macs(tiny_splits):
    cfg = TrialConfig.from_flat({"method": "aig", "model.depth": 20, "model.anneal": "exponential",
                                 "model.tau": 2.0, "model.tau_final": 0.5, "data.dataset": "synthetic",
                                 "optim.epochs": 1, "optim.batch_size": 50, "policy.name": "static"})
    reports = list(fit(cfg, tiny_splits))
    final = reports[-1].final
    rates = [final.metrics[f"gate_rate_{l}"] for l in range(9)]
    assert final.metrics["gate_rate_mean"] == pytest.approx(np.mean(rates))
    table = final.tables["gate_rates"]
    assert len(table) == 9 * len(np.unique(tiny_splits.val_y))
    # the per-class table averages back to the per-layer rates
    per_layer = table.assign(n=table["rate"] * table["count"]).groupby("layer")[["n", "count"]].sum()
    np.testing.assert_allclose(per_layer["n"] / per_layer["count"], rates)
    blocks = dict(final.cost.blocks)
    expected = final.cost.total - sum((1 - r) * blocks[f"block{i}.residual"] for i, r in enumerate(rates))
    assert final.macs == pytest.approx(expected)
    assert reports[0].metrics["train_macs"] == final.cost.total  # masked in training: every branch computed
    assert set(final.weights) == set(aig.build(cfg.model, 10).state_dict())


def test_other_cutoffs_join_the_frontier_without_retraining(tiny_splits):
    cfg = TrialConfig.from_flat({"method": "aig", "model.depth": 20, "model.cutoff": 0.5,
                                 "model.cutoff_grid": [0.2, 0.5, 0.9], "data.dataset": "synthetic",
                                 "optim.epochs": 1, "optim.batch_size": 50, "policy.name": "static"})
    assert aig.eval_variants(cfg.model) == [{"model.cutoff": 0.2}, {"model.cutoff": 0.9}]
    final = list(fit(cfg, tiny_splits))[-1].final
    f = final.frontier
    own = f[f.overrides == "{}"]
    assert set(own.policy) == {"static"} and own.macs.iloc[0] == pytest.approx(final.macs)
    by_cutoff = {json.loads(o)["model.cutoff"]: m for o, m in zip(f.overrides, f.macs) if o != "{}"}
    assert set(by_cutoff) == {0.2, 0.9}
    assert by_cutoff[0.2] >= final.macs >= by_cutoff[0.9]  # a higher cut-off opens fewer gates
