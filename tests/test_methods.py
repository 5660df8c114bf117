"""Contract tests run for every registered method (timm's list_models pattern)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from trainables import cost as cost_lib
from trainables.config import TrialConfig
from trainables.methods import METHOD_OBJECTIVES, METHODS, get_method
from trainables.outputs import MultiExitOutput


# The smallest member of each family, so the contract tests stay fast and their few SGD steps stable.
TINY = {"aig": {"model.depth": 20}, "vgg": {"model.depth": 11}, "dhm": {"model.depth": 20}, "dsl": {"model.depth": 20},
        "lottery": {"model.depth": 20}, "sdn": {"model.depth": 20},
        # three one-layer blocks: both scale drops (and their transitions) happen, no feature goes unused
        "msdnet": {"model.preset": "custom", "model.blocks": 3, "model.step_mode": "even", "model.step": 1,
                   "model.base": 1, "model.channels": 8, "model.growth_rate": 4}}
# Other architectures of a method, each run through every contract test on top of its TINY config (test id
# `<method>-<variant>`): elastic's torchvision backbones, at the smallest width each can take (ResNet-18 has
# none in torchvision).
VARIANTS = {"elastic": {"resnet18": {"model.backbone": "resnet18"},
                        "mobilenet_v2": {"model.backbone": "mobilenet_v2", "model.width": 0.25},
                        "densenet121": {"model.backbone": "densenet121", "model.width": 0.25},
                        "vgg16_bn": {"model.backbone": "vgg16_bn", "model.width": 0.125}}}
CASES = [pytest.param(name, {}, id=name) for name in METHODS] + [
    pytest.param(name, flat, id=f"{name}-{variant}") for name, variants in VARIANTS.items()
    for variant, flat in variants.items()]
# DHM's six mutual KL terms between three untrained heads on a random batch make its loss several times steeper
# than one cross-entropy: at lr 0.05 with momentum these few steps oscillate, at 0.01 they descend.
STEP_LR = {"dhm": 0.01}


def _model(name: str, **flat):
    cfg = TrialConfig.from_flat({"method": name, **TINY.get(name, {}), **flat})
    m = get_method(name)
    torch.manual_seed(0)
    return cfg, m, m.build(cfg.model, 10)


@pytest.mark.parametrize("name,variant", CASES)
def test_output_contract(name, variant):
    cfg, method, model = _model(name, **variant)
    out = model(torch.randn(4, 3, 32, 32))
    assert isinstance(out, MultiExitOutput)
    assert out.num_exits == method.num_exits(cfg.model) >= 1
    for z in out.logits:
        assert z.shape == (4, 10) and torch.isfinite(z).all()


@pytest.mark.parametrize("name,variant", CASES)
def test_gradients_reach_every_parameter(name, variant):
    cfg, method, model = _model(name, **variant)
    model.train()
    loss = method.loss(model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 10, cfg.model)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("name,variant", CASES)
def test_one_step_lowers_loss_on_a_fixed_batch(name, variant):
    cfg, method, model = _model(name, **variant)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    opt = torch.optim.SGD(model.parameters(), lr=STEP_LR.get(name, 0.05), momentum=0.9)
    model.train()
    losses = []
    for _ in range(5):
        loss = method.loss(model(x), y, cfg.model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name,variant", CASES)
def test_macs_match_flop_counter_and_exits_are_monotone(name, variant):
    _, _, model = _model(name, **variant)
    card = cost_lib.measure(model, 32)
    model.eval()
    with getattr(model, "full_compute", contextlib.nullcontext)():  # every gate open
        assert sum(m for _, m in card.blocks) == cost_lib.count_macs(model, torch.zeros(1, 3, 32, 32))
    assert all(a < b for a, b in zip(card.exits, card.exits[1:]))
    assert card.exits[-1] == card.total  # the last exit pays for everything, every head included
    assert card.train_total >= card.total or any(f < 1 for f in card.train_fractions)


def test_resnet20_macs_are_the_known_figure():
    # 40.81M MACs for the CIFAR ResNet-20 with 1x1 projection shortcuts (convolutions + the linear layer).
    _, _, model = _model("resnet", **{"model.depth": 20})
    assert cost_lib.measure(model, 32).total == 40_813_184


def test_elastic_exit_macs_include_earlier_heads():
    _, _, model = _model("elastic", **{"model.depth": 20})
    card = cost_lib.measure(model, 32)
    blocks = dict(card.blocks)
    head = blocks["head0"]
    assert head == 16 * 10  # pool is free; the linear layer is 16 x 10 MACs
    assert card.exits[1] == (blocks["stem"] + blocks["block0.residual"] + blocks["head0"] + blocks["block1.residual"]
                             + blocks["head1"])


def test_elastic_loss_weights():
    from trainables.methods import elastic

    cfg, method, model = _model("elastic", **{"model.weights": "linear", "model.head_dropout": 0.0})
    model.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    out = model(x)
    per_exit = [torch.nn.functional.cross_entropy(z, y) for z in out.logits]
    expected = sum((k + 1) / 9 * ce for k, ce in enumerate(per_exit))
    assert torch.allclose(method.loss(out, y, cfg.model), expected)
    assert elastic.exit_weights(cfg.model)[-1] == 1.0


def test_segments_missing_a_module_are_detected():
    _, _, model = _model("resnet")
    full = model.segments
    model.segments = lambda: [s for s in full() if s.name != "block3.shortcut"]
    with pytest.raises(RuntimeError, match="missing from segments"):
        cost_lib.measure(model, 32)


@pytest.mark.parametrize("name", list(METHODS))
def test_objectives_table_matches_module(name):
    # The command line lists second objectives from METHOD_OBJECTIVES without importing the methods.
    offered = tuple(getattr(get_method(name), "OBJECTIVES", {}))
    assert METHOD_OBJECTIVES.get(name, ()) == offered
