"""SDN: IC placement against the official masks, the tau schedule, the mixed-pooling IC, exits and their MACs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from search_spaces.sdn import VGG_DEPTH
from trainables import cost as cost_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import sdn, vgg
from trainables.models.cifar_resnet import DEPTHS

# `add_ic` of the official network_architectures.py: per residual block (ResNet-56, three stages of nine) and
# per VGG-16-BN layer (13 convolutions, then the fully connected layer).
OFFICIAL_RESNET56 = [[0, 0, 0, 1, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1, 0, 0, 0]]
OFFICIAL_VGG16 = [0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0]


def _hp(**kw) -> sdn.Hparams:
    return sdn.Hparams(**kw)


def _conv_layers(positions: list[int], depth: int) -> list[int]:
    """VGG unit positions (our unit list interleaves the poolings) as indices among the convolutions."""
    convs = [i for i, v in enumerate(vgg.CONFIGS[depth]) if v != "M"]
    # an IC after a pooling follows the convolution just before it
    return [sum(1 for c in convs if c <= p) - 1 for p in positions]


def test_resnet56_placement_matches_the_official_mask():
    flat = [i for i, on in enumerate(sum(OFFICIAL_RESNET56, [])) if on]
    assert sdn.ic_positions(_hp()) == flat == [3, 7, 11, 15, 19, 23]
    # The "reach" rule puts three of the six ICs one block later (44.5% < 45% after block 11, and so on).
    assert sdn.ic_positions(_hp(placement="reach")) == [3, 7, 12, 16, 20, 24]


def test_vgg16_placement_matches_the_official_mask():
    flat = [i for i, on in enumerate(OFFICIAL_VGG16) if on]
    positions = sdn.ic_positions(_hp(backbone="vgg", depth=16))
    assert positions == [2, 5, 7, 9, 11, 13]  # after the pooling that follows conv 1, 3, 6, 9
    assert _conv_layers(positions, 16) == flat == [1, 3, 5, 6, 8, 9]
    # "reach": the 15% IC goes after conv 2 (18.6%) instead of conv 1 (12.6%)
    assert _conv_layers(sdn.ic_positions(_hp(backbone="vgg", depth=16, placement="reach")), 16) == [2, 3, 5, 6, 8, 9]


def test_ics_sit_near_their_fractions_and_see_the_official_map_sizes():
    prof = sdn.backbone_profile("resnet", 56)
    at = [prof.fractions[p] for p in sdn.ic_points(_hp())]
    assert all(abs(a - f) < 0.02 for a, f in zip(at, sdn.LAYOUTS["sdn"]))
    assert [prof.shapes[p] for p in sdn.ic_points(_hp())] == [(16, 32)] * 2 + [(32, 16)] * 2 + [(64, 8)] * 2
    prof = sdn.backbone_profile("vgg", 16)
    assert [prof.shapes[p] for p in sdn.ic_points(_hp(backbone="vgg", depth=16))] == \
        [(64, 16), (128, 8), (256, 8), (256, 4), (512, 4), (512, 2)]


def test_profiling_does_not_move_the_rng():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    sdn.backbone_profile.__wrapped__("resnet", 20)  # uncached: it builds a backbone
    assert torch.equal(torch.rand(3), expected)


def test_tau_schedule_by_hand():
    hp = _hp()  # C = 0.15, 0.3, ..., 0.9
    assert sdn.ic_weights(hp, 0.0) == pytest.approx([0.01] * 6)
    # e = 10 of E = 100: 0.01 + 0.1 C
    assert sdn.ic_weights(hp, 10 / 100) == pytest.approx([0.025, 0.04, 0.055, 0.07, 0.085, 0.1])
    # e = 95 of 100: 0.01 + 0.95 C, capped at C for C < 0.2 (0.01 + 0.1425 > 0.15)
    assert sdn.ic_weights(hp, 95 / 100) == pytest.approx([0.15, 0.295, 0.4375, 0.58, 0.7225, 0.865])
    assert sdn.ic_weights(hp, 1.0) == pytest.approx([0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    # scaled maxima, and per-IC maxima: e = 1 of E = 4
    assert sdn.ic_weights(_hp(ic_weight_scale=2.0), 1 / 4) == pytest.approx([0.085, 0.16, 0.235, 0.31, 0.385, 0.46])
    assert sdn.ic_weights(_hp(ic_layout="sparse", ic_weights=(1.0, 0.012, 0.5)), 1 / 4) == \
        pytest.approx([0.26, 0.012, 0.135])


def test_mixed_pooling_head_is_the_hand_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ic = sdn.InternalClassifier(3, 8, 5)
    with torch.no_grad():
        ic.alpha.fill_(0.3)
    mixed = 0.3 * F.max_pool2d(x, 2) + 0.7 * F.avg_pool2d(x, 2)  # the official kernel = 8 / 4
    expected = mixed.flatten(1) @ ic.linear.weight.T + ic.linear.bias
    assert mixed.shape[-2:] == (4, 4)
    assert torch.allclose(ic(x), expected, atol=1e-6)
    x32 = torch.randn(2, 3, 32, 32)
    ic32 = sdn.InternalClassifier(3, 32, 5)
    mixed = ic32.alpha * F.max_pool2d(x32, 8) + (1 - ic32.alpha) * F.avg_pool2d(x32, 8)
    assert torch.allclose(ic32(x32), ic32.linear(mixed.flatten(1)), atol=1e-6)
    # a 2x2 map (VGG after four poolings): classified whole, no alpha
    small = sdn.InternalClassifier(3, 2, 5)
    x2 = torch.randn(2, 3, 2, 2)
    assert small.alpha is None and small.linear.in_features == 12
    assert torch.allclose(small(x2), small.linear(x2.flatten(1)))


def test_alpha_is_drawn_uniformly_from_the_seeded_rng():
    torch.manual_seed(0)
    a = sdn.build(_hp(depth=20), 10)
    torch.manual_seed(0)
    b = sdn.build(_hp(depth=20), 10)
    alphas = [ic.alpha.item() for ic in a.ics]
    assert alphas == [ic.alpha.item() for ic in b.ics]
    assert all(0.0 <= v < 1.0 for v in alphas) and len(set(alphas)) == len(alphas)


@pytest.mark.parametrize("kw", [dict(depth=20), dict(depth=20, ic_layout="sparse"),
                                dict(depth=32, ic_fractions=(0.2, 0.5)), dict(backbone="vgg", depth=16)])
def test_exits_are_ics_plus_one_and_their_macs_grow(kw):
    hp = _hp(**kw)
    torch.manual_seed(0)
    model = sdn.build(hp, 10)
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.num_exits == len(model.ics) + 1 == len(sdn.fractions(hp)) + 1 == sdn.num_exits(hp)
    card = cost_lib.measure(model, 32)
    assert all(a < b for a, b in zip(card.exits, card.exits[1:]))
    # exit k pays for everything before it, every earlier IC included
    running, exits = 0, []
    for name, macs in card.blocks:
        running += macs
        if name.startswith("ic") or name == "head":
            exits.append(running)
    assert tuple(exits) == card.exits and card.exits[-1] == card.total


def test_ic_macs_are_their_linear_layers():
    card = cost_lib.measure(sdn.build(_hp(depth=20), 10), 32)
    blocks = dict(card.blocks)
    assert [blocks[f"ic{k}"] for k in range(6)] == [16 * 16 * 10] * 2 + [32 * 16 * 10] * 2 + [64 * 16 * 10] * 2
    assert blocks["head"] == 64 * 10


def test_loss_uses_the_scheduled_weights_in_training_and_the_maxima_in_eval():
    hp = _hp(depth=20)
    torch.manual_seed(0)
    model = sdn.build(hp, 10)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    model.eval()
    out = model(x)
    assert "ic_weights" not in out.aux
    ce = [F.cross_entropy(z, y) for z in out.logits]
    expected = ce[-1] + sum(c * l for c, l in zip(sdn.LAYOUTS["sdn"], ce))
    assert torch.allclose(sdn.loss(out, y, hp), expected)
    model.set_progress(1.0)  # the schedule never reaches evaluation
    assert all(torch.equal(a, b) for a, b in zip(model(x).logits, out.logits))
    model.train()
    model.set_progress(0.25)
    out = model(x)
    assert out.aux["ic_weights"].tolist() == pytest.approx(sdn.ic_weights(hp, 0.25))
    ce = [F.cross_entropy(z, y, label_smoothing=0.1) for z in out.logits]
    expected = ce[-1] + sum(c * l for c, l in zip(sdn.ic_weights(hp, 0.25), ce))
    assert torch.allclose(sdn.loss(out, y, hp, 0.1), expected)


@pytest.mark.parametrize("flat, match", [
    ({"model.backbone": "vgg"}, "model.depth=56 is not a vgg depth; vgg depths: 11, 16"),
    ({"model.backbone": "vgg", "model.depth": 11}, "fractions 0.6 and 0.75 both place an IC after unit 7 of vgg-11"),
    ({"model.depth": 20, "model.placement": "reach"}, "fraction 0.9 places an IC after the last unit of resnet-20"),
    ({"model.ic_fractions": [0.5, 0.3]}, r"model.ic_fractions=\[0.5, 0.3\] must be strictly increasing"),
    ({"model.ic_weights": [1.0, 2.0]}, r"model.ic_weights=\[1.0, 2.0\] has 2 values; there are 6 ICs"),
])
def test_invalid_configs_are_one_line_errors(flat, match):
    with pytest.raises(ConfigError, match=match):
        TrialConfig.from_flat({"method": "sdn", **flat})


@pytest.mark.parametrize("placement", sdn.PLACEMENTS)
def test_every_layout_fits_every_backbone_of_the_search_space(placement):
    nets = [("resnet", d) for d in DEPTHS] + [("vgg", VGG_DEPTH)]
    bad = []
    for backbone, depth in nets:
        for layout in sdn.LAYOUTS:
            try:
                _hp(backbone=backbone, depth=depth, ic_layout=layout, placement=placement)
            except ConfigError as e:
                bad.append((backbone, depth, layout, str(e)))
    if placement == "nearest":  # the search space's rule
        assert not bad
    else:  # ResNet-20's last 10% is one block: the 0.9 ICs fall on it
        assert [b[:3] for b in bad] == [("resnet", 20, "sdn"), ("resnet", 20, "late")]
