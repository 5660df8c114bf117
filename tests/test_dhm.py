"""DHM and DSL: the mimicking loss against a hand computation, no gradient into a teacher, branches that are
train-only in cost and removable without changing head 0, and every head's accuracy logged."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from trainables import cost as cost_lib
from trainables import loop as loop_lib
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import dhm, dsl, get_method, resnet

# Three heads, two samples, three classes, labels (0, 2).
LOGITS = [[[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]],
          [[1.0, 1.0, 0.0], [-1.0, 0.0, 2.0]],
          [[0.0, 3.0, 1.0], [0.5, -0.5, 0.0]]]
LABELS = [0, 2]


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def _hand_loss(weights, alpha, t, eps=1e-8):
    """The DHM loss written out element by element, independently of the implementation."""
    ce = sum(w * sum(-math.log(_softmax(LOGITS[h][n])[LABELS[n]]) for n in range(2)) / 2
             for h, w in enumerate(weights))
    kl = 0.0
    for i in range(3):  # student
        for j in range(3):  # teacher
            if i == j:
                continue
            for n in range(2):
                p = [(v + eps) / (1 + 3 * eps) for v in _softmax(LOGITS[j][n], t)]
                q = [(v + eps) / (1 + 3 * eps) for v in _softmax(LOGITS[i][n], t)]
                kl += t * t * sum(a * math.log(a / b) for a, b in zip(p, q)) / 2
    return ce + alpha * kl


@pytest.mark.parametrize("alpha,t", [(0.0, 1.0), (1.0, 1.0), (0.5, 2.0), (2.0, 4.0)])
def test_loss_equals_a_hand_computation(alpha, t):
    logits = [torch.tensor(z, dtype=torch.float64) for z in LOGITS]
    weights = [1.0, 0.7, 0.3]
    got = dhm.supervised_loss(logits, torch.tensor(LABELS), weights, alpha, t)
    assert got.item() == pytest.approx(_hand_loss(weights, alpha, t), rel=1e-6)


def test_dsl_is_dhm_without_mimicking():
    cfg = TrialConfig.from_flat({"method": "dsl", "model.depth": 20, "model.aux_weights": [0.5, 0.25]})
    model = dsl.build(cfg.model, 10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    out = model(x)
    z = dhm.head_logits(out)
    expected = sum(w * torch.nn.functional.cross_entropy(l, y) for w, l in zip([1.0, 0.5, 0.25], z))
    assert torch.allclose(dsl.loss(out, y, cfg.model), expected)
    mimic = dhm.Hparams(depth=20, alpha=0.0, aux_weights=(0.5, 0.25))
    assert torch.allclose(dhm.loss(out, y, mimic), expected)


def test_no_gradient_reaches_a_teacher_through_its_kl_term():
    z0 = torch.tensor(LOGITS[0], requires_grad=True)
    z1 = torch.tensor(LOGITS[1], requires_grad=True)
    dhm.mimic_kl(z0, z1.detach(), 2.0).backward()
    assert z1.grad is None and z0.grad is not None and z0.grad.abs().sum() > 0
    # In the full loss with the CE terms off, a head's gradient is that of the terms where it is the student.
    z0.grad = None
    dhm.supervised_loss([z0, z1], torch.tensor(LABELS), [0.0, 0.0], 1.5, 2.0).backward()
    s0 = torch.tensor(LOGITS[0], requires_grad=True)
    (1.5 * dhm.mimic_kl(s0, torch.tensor(LOGITS[1]), 2.0)).backward()
    assert torch.allclose(z0.grad, s0.grad)


def test_branch_layout_follows_the_official_code():
    for depth, blocks in ((32, (5, 3, 5)), (110, (9, 9, 18)), (20, (2, 2, 3)), (56, (5, 5, 9))):
        assert dhm.branch_blocks(dhm.Hparams(depth=depth)) == blocks
    model = dhm.build(dhm.Hparams(depth=32), 10)
    b1, b2 = model.branches["1"].blocks, model.branches["2"].blocks
    assert [b.cout for b in b1] == [128] * 5 and b1[0].cin == 32 and b1[0].stride == 2
    assert [b.cout for b in b2] == [32] * 5 + [64] * 3 and b2[0].cin == 16
    assert model.fork_after == {"1": 9, "2": 4}
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())  # option A
    only = dhm.build(dhm.Hparams(depth=20, branches="stage1", branch_blocks=(1, 2, 3)), 10)
    assert only.side_heads == [2] and [b.cout for b in only.branches["2"].blocks] == [32, 64, 64]


def test_branches_are_train_only_in_cost_and_dropping_them_leaves_a_plain_resnet():
    cfg = dhm.Hparams(depth=20, branch_width=1.5)
    torch.manual_seed(0)
    model = dhm.build(cfg, 10).eval()
    card = cost_lib.measure(model, 32)
    plain = resnet.build(resnet.Hparams(depth=20, shortcut="A"), 10).eval()
    plain_card = cost_lib.measure(plain, 32)
    assert card.total == card.exits[0] == plain_card.total  # inference = the plain backbone
    blocks = dict(card.blocks)
    assert card.train_total == card.total + blocks["branch1"] + blocks["branch2"]
    stage1 = blocks["stem"] + sum(m for n, m in card.blocks if n.split(".")[0] in {f"block{i}" for i in range(3)})
    assert dict(card.side_heads)[2] == stage1 + blocks["branch2"]
    assert card.to_dict()["side_heads"] == [{"head": 2, "macs": stage1 + blocks["branch2"]},
                                            {"head": 1, "macs": dict(card.side_heads)[1]}]

    x = torch.randn(8, 3, 32, 32)
    before = model(x)
    assert before.aux["side_logits"].shape == (2, 8, 10)
    model.drop_branches()
    after = model(x)
    assert "side_logits" not in after.aux and torch.equal(before.final, after.final)
    assert cost_lib.measure(model, 32).train_total == plain_card.total
    plain.load_state_dict(model.state_dict())  # strict: the same keys as the plain network
    assert torch.equal(plain(x).final, after.final)


def test_side_head_paths_count_only_their_own_branch():
    model = dhm.build(dhm.Hparams(depth=20, branches="stage2"), 10)
    card = cost_lib.measure(model, 32)
    blocks = dict(card.blocks)
    before_fork = card.total - blocks["head"] - sum(blocks[f"block{i}.residual"] for i in range(6, 9)) \
        - blocks["block6.shortcut"]
    assert card.side_heads == ((1, before_fork + blocks["branch1"]),)


def test_bad_settings_are_one_line_errors():
    for flat, match in (({"model.aux_weights": [1.0]}, "aux_weights=.*must have 2 values"),
                        ({"model.branch_blocks": [1, 2]}, "branch_blocks=.*must have 3 values"),
                        ({"model.branch_width": 0.25}, "branch_width=0.25 gives head 1 16 channels"),
                        ({"model.branches": "stage3"}, "model.branches='stage3' is not one of: both, stage2, stage1"),
                        ({"model.alpha": -1}, "model.alpha=-1.0 is outside")):
        with pytest.raises(ConfigError, match=match) as e:
            TrialConfig.from_flat({"method": "dhm", **flat})
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'model.alpha'"):
        TrialConfig.from_flat({"method": "dsl", "model.alpha": 1.0})


def test_head_report_says_when_a_side_head_beats_head_0():
    card = cost_lib.CostModel(blocks=(("a", 100),), exits=(100,), side_heads=((1, 250), (2, 80)))
    val = {"val_acc_head_0": 0.60, "val_acc_head_1": 0.65, "val_acc_head_2": 0.50}
    test = {"test_acc_head_0": 0.58, "test_acc_head_1": 0.62, "test_acc_head_2": 0.49}
    table, notes = loop_lib.head_report(None, card, val, test)
    assert list(table["head"]) == [0, 1, 2] and list(table["macs"]) == [100, 250, 80]
    assert len(notes) == 1 and notes[0].startswith("side head 1 beats head 0 on validation (0.6500 vs 0.6000")
    _, none = loop_lib.head_report(None, card, {**val, "val_acc_head_1": 0.6}, test)
    assert none == []


@pytest.mark.parametrize("name", ["dhm", "dsl"])
def test_fit_logs_every_head(tiny_splits, name):
    cfg = TrialConfig.from_flat({"method": name, "model.depth": 20, "data.dataset": "synthetic",
                                 "data.val_size": 100, "optim.epochs": 1, "optim.batch_size": 50})
    (report,) = list(loop_lib.fit(cfg, tiny_splits, loop_lib.RunContext(threads=2)))
    m, f = report.metrics, report.final
    assert {"val_acc_head_0", "val_acc_head_1", "val_acc_head_2"} <= set(m)
    assert m["val_acc_head_0"] == m["val_acc"] == f.val_acc
    assert {"test_acc_head_0", "test_acc_head_1", "test_acc_head_2"} <= set(f.metrics)
    assert f.metrics["test_acc_head_0"] == f.test_acc
    heads: pd.DataFrame = f.tables["heads"]
    assert list(heads["head"]) == [0, 1, 2] and heads["macs"].iloc[0] == f.cost.total == f.macs
    assert m["train_macs"] == f.cost.train_total > 2 * f.cost.total  # both branches: over twice the inference
    assert (f.frontier["macs"] == f.cost.total).all() and (f.frontier["val_acc"] == f.val_acc).all()
    model = get_method(name).build(cfg.model, 10)
    model.load_state_dict(f.weights)  # the logged weights rebuild the trained network, branches included
