"""MSDNet: the architecture against tables derived by hand from the official `_build_block` arithmetic, exits that
depend only on earlier blocks, the preset rules, the loss weights, both MAC counts and the `describe` card."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import torch
import torch.nn.functional as F

from study.cli import main
from study.search import SweepSpace, config_keys, param_name
from trainables import cost as cost_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import msdnet

G = (1, 2, 4)  # gr_factor of both presets

# Derived by hand from the official code (models/msdnet.py, MSDNet._build_block with prune='max', reduction 0.5,
# growthRate 6, nChannels 16), not by the code under test. One row per MSD layer:
# (block, inScales, outScales, C before, C after, C after the transition or None); scale s holds C * G[s] channels.
# budgeted: steps [1, 2, 3, 4, 5], 15 layers, interval ceil(15/3) = 5: the finest scale goes at layers 6 and 11.
BUDGETED = [
    (0, 3, 3, 16, 22, None),
    (1, 3, 3, 22, 28, None), (1, 3, 3, 28, 34, None),
    (2, 3, 3, 34, 40, None), (2, 3, 3, 40, 46, None), (2, 3, 2, 46, 52, 26),
    (3, 2, 2, 26, 32, None), (3, 2, 2, 32, 38, None), (3, 2, 2, 38, 44, None), (3, 2, 2, 44, 50, None),
    (4, 2, 1, 50, 56, 28), (4, 1, 1, 28, 34, None), (4, 1, 1, 34, 40, None), (4, 1, 1, 40, 46, None),
    (4, 1, 1, 46, 52, None),
]
# anytime: steps [4, 2, 2, 2, 2, 2, 2], 16 layers, interval ceil(16/3) = 6: the finest scale goes at layers 7 and 13.
ANYTIME = [
    (0, 3, 3, 16, 22, None), (0, 3, 3, 22, 28, None), (0, 3, 3, 28, 34, None), (0, 3, 3, 34, 40, None),
    (1, 3, 3, 40, 46, None), (1, 3, 3, 46, 52, None),
    (2, 3, 2, 52, 58, 29), (2, 2, 2, 29, 35, None),
    (3, 2, 2, 35, 41, None), (3, 2, 2, 41, 47, None),
    (4, 2, 2, 47, 53, None), (4, 2, 2, 53, 59, None),
    (5, 2, 1, 59, 65, 32), (5, 1, 1, 32, 38, None),
    (6, 1, 1, 38, 44, None), (6, 1, 1, 44, 50, None),
]
# Input channels of every classifier: the block's last C (after its transition) x gr_factor[-1] = 4.
HEAD_IN = {"budgeted": [88, 136, 104, 200, 208], "anytime": [160, 208, 140, 188, 236, 152, 200]}
TABLES = {"budgeted": BUDGETED, "anytime": ANYTIME}


def _cfg(**flat) -> TrialConfig:
    return TrialConfig.from_flat({"method": "msdnet", **{f"model.{k}": v for k, v in flat.items()}})


def _model(num_classes: int = 10, **flat) -> tuple[TrialConfig, msdnet.MSDNet]:
    cfg = _cfg(**flat)
    torch.manual_seed(0)
    return cfg, msdnet.build(cfg.model, num_classes)


@pytest.mark.parametrize("preset, blocks", [("budgeted", 5), ("anytime", 7)])
def test_one_output_per_block(preset, blocks):
    cfg, model = _model(preset=preset)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.num_exits == msdnet.num_exits(cfg.model) == len(model.blocks) == blocks
    assert all(z.shape == (2, 10) for z in out.logits)


@pytest.mark.parametrize("preset", ["budgeted", "anytime"])
def test_layers_and_feature_maps_match_the_official_arithmetic(preset):
    """Every MSD layer's scales and channels, checked on the tensors that flow through the real modules."""
    _, model = _model(preset=preset)
    seen = []

    def record(kind):
        def hook(module, inputs, output):
            seen.append((kind, module, [tuple(t.shape) for t in inputs[0]], [tuple(t.shape) for t in output]))
        return hook

    for k, block in enumerate(model.blocks):
        for m in block:
            if isinstance(m, (msdnet.MSDLayer, msdnet.Transition)):
                m.register_forward_hook(record((type(m).__name__, k)))
    head_in = []
    for head in model.heads:
        head.register_forward_hook(lambda m, i, o: head_in.append(i[0][-1].shape[1]))
    model.eval()
    model(torch.zeros(1, 3, 32, 32))

    rows = iter(TABLES[preset])
    expected = []
    for block, n_in, n_out, cin, cout, trans in rows:
        in_shapes = [(1, cin * G[s], 32 >> s, 32 >> s) for s in range(3 - n_in, 3)]
        out_shapes = [(1, cout * G[s], 32 >> s, 32 >> s) for s in range(3 - n_out, 3)]
        expected.append((("MSDLayer", block), in_shapes, out_shapes))
        if trans is not None:
            expected.append((("Transition", block), out_shapes,
                             [(1, trans * G[s], 32 >> s, 32 >> s) for s in range(3 - n_out, 3)]))
    assert [(kind, i, o) for kind, _, i, o in seen] == expected
    assert head_in == HEAD_IN[preset]
    assert [m.cin for m in model.heads] == HEAD_IN[preset]


def test_bottleneck_and_strided_conv_shapes():
    """Conv weights of the budgeted network's first layer and of its first scale-dropping layer (layer 6, C 46 -> 52,
    then the transition to 26), by hand: the bottleneck is min(C_in, bnFactor * out) wide."""
    _, model = _model(preset="budgeted")

    def convs(module):
        return [(tuple(c.weight.shape), c.stride[0]) for c in module.modules() if isinstance(c, torch.nn.Conv2d)]

    first = model.blocks[0][0]
    assert convs(first) == [((16, 3, 3, 3), 1), ((32, 16, 3, 3), 2), ((64, 32, 3, 3), 2)]
    layer1 = model.blocks[0][1]
    assert [convs(u) for u in layer1.units] == [
        [((6, 16, 1, 1), 1), ((6, 6, 3, 3), 1)],  # scale 0: 6 new channels from itself
        [((6, 16, 1, 1), 1), ((6, 6, 3, 3), 2), ((12, 32, 1, 1), 1), ((6, 12, 3, 3), 1)],  # 6 down + 6 same
        [((24, 32, 1, 1), 1), ((12, 24, 3, 3), 2), ((48, 64, 1, 1), 1), ((12, 48, 3, 3), 1)],  # 12 + 12
    ]
    layer6, transition = model.blocks[2][2], model.blocks[2][3]  # block 2 = layers 4, 5, 6
    assert (layer6.in_scales, layer6.out_scales, layer6.drops) == (3, 2, True)
    assert [convs(u) for u in layer6.units] == [
        [((6, 46, 1, 1), 1), ((6, 6, 3, 3), 2), ((12, 92, 1, 1), 1), ((6, 12, 3, 3), 1)],
        [((24, 92, 1, 1), 1), ((12, 24, 3, 3), 2), ((48, 184, 1, 1), 1), ((12, 48, 3, 3), 1)],
    ]
    assert convs(transition) == [((52, 104, 1, 1), 1), ((104, 208, 1, 1), 1)]
    # where C_in is the smaller, it caps the bottleneck: 4 input channels, bnFactor 1 x 6 outputs
    _, narrow = _model(preset="custom", channels=4)
    assert convs(narrow.blocks[0][1].units[0]) == [((4, 4, 1, 1), 1), ((6, 4, 3, 3), 1)]
    _, plain = _model(preset="custom", bottleneck=False)
    assert convs(plain.blocks[0][1].units[0]) == [((6, 16, 3, 3), 1)]


def test_an_exit_depends_only_on_the_blocks_before_it():
    # five one-layer blocks, narrow: both scale drops happen (layers 3 and 5)
    _, model = _model(preset="custom", blocks=5, step_mode="even", step=1, base=1, channels=8, growth_rate=4)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x).logits
        for j in range(len(model.blocks)):
            for part in (model.blocks[j], model.heads[j]):
                for p in part.parameters():
                    p.add_(0.1 * torch.randn_like(p))
                out = model(x).logits
                assert all(torch.equal(out[k], base[k]) for k in range(j))
                assert not torch.allclose(out[j], base[j])
                model.load_state_dict(saved)


def test_presets_fill_the_architecture_and_explicit_keys_must_agree():
    default = _cfg().model
    assert (default.preset, default.blocks, default.step_mode, default.step, default.base) == \
        ("budgeted", 5, "lin_grow", 1, 1)
    assert msdnet.block_steps(default) == [1, 2, 3, 4, 5]
    anytime = _cfg(preset="anytime").model
    assert (anytime.blocks, anytime.step_mode, anytime.step, anytime.base) == (7, "even", 2, 4)
    assert msdnet.block_steps(anytime) == [4, 2, 2, 2, 2, 2, 2]
    # the preset's own value is no conflict, and names the same configuration
    assert _cfg(preset="anytime", blocks=7, growth_rate=6).config_hash() == _cfg(preset="anytime").config_hash()
    # a resolved configuration parses back to itself
    flat = _cfg(preset="anytime").to_flat()
    assert TrialConfig.from_flat(flat) == _cfg(preset="anytime")
    # custom: free keys; unset layout keys come from the budgeted preset
    custom = _cfg(preset="custom", blocks=3, growth_rate=12).model
    assert (custom.blocks, custom.step_mode, custom.step, custom.base, custom.growth_rate) == \
        (3, "lin_grow", 1, 1, 12)


@pytest.mark.parametrize("flat, message", [
    ({"preset": "anytime", "growth_rate": 12},
     "model.growth_rate=12 conflicts with model.preset=anytime, which sets growth_rate=6; set model.preset=custom"),
    ({"blocks": 7}, "model.blocks=7 conflicts with model.preset=budgeted, which sets blocks=5"),
    ({"preset": "anytime", "step_mode": "lin_grow"}, "model.step_mode=lin_grow conflicts with model.preset=anytime"),
    ({"preset": "budgeted", "gr_factor": [1, 2, 2]},
     "model.gr_factor=[1, 2, 2] conflicts with model.preset=budgeted, which sets gr_factor=[1, 2, 4]"),
    ({"preset": "anytime", "bottleneck": False}, "model.bottleneck=False conflicts with model.preset=anytime"),
    ({"preset": "custom", "gr_factor": [1, 2]}, "model.gr_factor=[1, 2] must have 3 values, one per scale"),
    ({"preset": "custom", "growth_rate": 7, "gr_factor": [1, 1, 2]},
     "growth_rate=7 with gr_factor=[1, 1, 2] gives 7 new channels at scale 1, which must be even"),
    ({"preset": "custom", "reduction": 0.01}, "model.reduction=0.01 leaves floor(0.01 * 52) = 0 channels"),
    ({"preset": "nope"}, "model.preset='nope' is not one of: budgeted, anytime, custom"),
])
def test_bad_configurations_name_the_keys(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(**flat)


def test_loss_weights():
    cfg, model = _model(preset="custom", blocks=3, weights="linear")
    model.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    out = model(x)
    ce = [F.cross_entropy(z, y) for z in out.logits]
    assert torch.allclose(msdnet.loss(out, y, cfg.model), ce[0] / 3 + ce[1] * 2 / 3 + ce[2])
    uniform = _cfg(preset="custom", blocks=3).model
    assert torch.allclose(msdnet.loss(out, y, uniform), ce[0] + ce[1] + ce[2])


def test_both_mac_counts_of_a_one_layer_network_by_hand():
    """One block of one layer (3 scales in and out, no transition), C 16 -> 22, a 10-class head on 88 channels."""
    _, model = _model(preset="custom", blocks=1, base=1)
    convs = [3 * 16 * 9 * 1024, 16 * 32 * 9 * 256, 32 * 64 * 9 * 64,            # first layer
             16 * 6 * 1024, 6 * 6 * 9 * 1024,                                    # scale 0: bottleneck, 3x3
             16 * 6 * 1024, 6 * 6 * 9 * 256, 32 * 12 * 256, 12 * 6 * 9 * 256,    # scale 1: down, same
             32 * 24 * 256, 24 * 12 * 9 * 64, 64 * 48 * 64, 48 * 12 * 9 * 64,    # scale 2: down, same
             88 * 128 * 9 * 16, 128 * 128 * 9 * 4]                               # classifier 8 -> 4 -> 2 px
    relus = [16 * 1024, 32 * 256, 64 * 64,
             6 * 1024, 6 * 1024,
             6 * 1024, 6 * 256, 12 * 256, 6 * 256,
             24 * 256, 12 * 64, 48 * 64, 12 * 64,
             128 * 16, 128 * 4]
    linear, bias, pooled = 128 * 10, 10, 128 * 4
    assert cost_lib.measure(model, 32).exits == (sum(convs) + linear,)
    assert msdnet.paper_macs(model, 32) == [sum(convs) + linear + sum(relus) + pooled + bias]


@pytest.mark.parametrize("preset", ["budgeted", "anytime"])
def test_cumulative_macs_are_monotone_and_end_at_the_total(preset):
    _, model = _model(100, preset=preset)
    card = cost_lib.measure(model, 32)
    paper = msdnet.paper_macs(model, 32)
    assert all(a < b for a, b in zip(card.exits, card.exits[1:])) and card.exits[-1] == card.total
    assert all(a < b for a, b in zip(paper, paper[1:])) and len(paper) == len(card.exits)
    assert all(p > m for p, m in zip(paper, card.exits))  # ReLUs, pooling and biases on top
    heads = sum(m for name, m in card.blocks if name.startswith("head"))
    assert 0.25 < heads / card.total < 0.4  # methods.md: the heads are 28-37% of the total


def test_paper_counter_refuses_modules_it_has_no_rule_for():
    _, model = _model(preset="custom", blocks=1, base=1)
    model.heads[0].features[2] = torch.nn.GELU()
    with pytest.raises(TypeError, match="no counting rule for GELU"):
        msdnet.paper_macs(model, 32)


def test_describe_prints_both_counts(capsys):
    assert main(["describe", "--method", "msdnet", "--set", "model.preset=anytime", "--format", "json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert len(card["exits"]) == 7 and card["config"]["model.blocks"] == 7
    assert all(e["paper_macs"] > e["macs"] for e in card["exits"])
    assert main(["describe", "--method", "msdnet", "--set", "model.preset=custom", "--set", "model.blocks=1"]) == 0
    text = capsys.readouterr().out
    assert "paper rules" in text and f"{msdnet.paper_macs(_model(preset='custom', blocks=1)[1], 32)[-1]:,}" in text


def test_space_leaves_a_fixed_preset_alone_and_contains_the_paper_networks():
    space = SweepSpace(["msdnet"], {"model.preset": "anytime"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    for _ in range(5):
        trial = study.ask()
        constants = space(trial)
        assert set(k for k in config_keys(trial.params) if k.startswith("model.")) == {"model.weights"}
        cfg = TrialConfig.from_flat({"model.preset": "anytime", **constants})
        assert cfg.model.blocks == 7
        study.tell(trial, [0.5, 1.0])
    for preset in ("anytime", "budgeted"):
        arch = {k: v for k, v in msdnet.PRESETS[preset].items() if k in ("blocks", "step_mode", "step", "base")}
        params = {"model.preset": "custom", **{f"model.{k}": v for k, v in arch.items()}, "model.growth_rate": 6,
                  "model.channels": 16, "model.weights": "uniform", "optim.lr": 0.1, "optim.weight_decay": 1e-4,
                  "optim.label_smoothing": 0.0, "policy.name": "budgeted", "policy.q": 1.0}
        if arch["step_mode"] == "lin_grow":
            del params["model.step"]
        constants = SweepSpace(["msdnet"], {})(optuna.trial.FixedTrial({param_name("msdnet", k): v
                                                                        for k, v in params.items()}))
        cfg = TrialConfig.from_flat({**params, **constants})
        assert msdnet.plan(cfg.model) == msdnet.plan(_cfg(preset=preset).model)
