"""Stochastic depth and the lesion study (deleting and reordering units at test time)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainables import cost as cost_lib
from trainables import lesion
from trainables.config import TrialConfig
from trainables.methods import get_method
from trainables.models.cifar_resnet import BasicBlock, linear_survival


def _model(name, **flat):
    cfg = TrialConfig.from_flat({"method": name, **flat})
    torch.manual_seed(0)
    return get_method(name).build(cfg.model, 10).eval()


# ------------------------------------------------------------------------------------------- stochastic depth

def test_linear_survival_and_expected_training_macs():
    p = linear_survival(54, 0.5)
    assert p[0] == pytest.approx(1 - 0.5 / 54) and p[-1] == pytest.approx(0.5)
    assert sum(p) == pytest.approx(40.25)  # the expected executed blocks of SD ResNet-110 (methods.md 4b)
    card = cost_lib.measure(_model("resnet", **{"model.depth": 110, "model.survival_last": 0.5}), 32)
    blocks = dict(card.blocks)
    branches = [blocks[f"block{i}.residual"] for i in range(54)]
    assert card.train_total == pytest.approx(card.total - sum((1 - q) * m for q, m in zip(p, branches)))
    assert card.total == cost_lib.measure(_model("resnet", **{"model.depth": 110}), 32).total  # test: full cost


def _counting(block: BasicBlock) -> list[int]:
    sizes: list[int] = []
    block.residual.register_forward_pre_hook(lambda _m, a: sizes.append(a[0].shape[0]))
    return sizes


def test_stochastic_depth_per_batch_runs_or_skips_the_whole_branch():
    torch.manual_seed(0)
    block = BasicBlock(8, 8, 1).train()
    block.survival, block.drop_mode = 0.5, "batch"
    sizes = _counting(block)
    x = torch.randn(16, 8, 8, 8)
    for _ in range(200):
        block(x)
    assert set(sizes) == {16} and 70 < len(sizes) < 130


def test_stochastic_depth_per_sample_runs_the_branch_on_the_kept_samples_only():
    torch.manual_seed(0)
    block = BasicBlock(8, 8, 1).train()
    block.survival, block.drop_mode = 0.7, "sample"
    sizes = _counting(block)
    x = torch.randn(1000, 8, 4, 4)
    y = block(x)
    assert 650 < sizes[0] < 750
    dropped = torch.isclose(y, F.relu(x)).flatten(1).all(1)  # dropped samples got the identity alone
    assert dropped.sum().item() == 1000 - sizes[0]


def test_stochastic_depth_scales_the_branch_at_test_time():
    block = BasicBlock(8, 8, 1).eval()
    block.survival = 0.6
    x = torch.randn(4, 8, 8, 8)
    torch.testing.assert_close(block(x), F.relu(x + 0.6 * block.residual(x)))


# ------------------------------------------------------------------------------------------- lesions

def _block_io(model, x):
    units = model.lesion_units().container
    io = []
    handles = [u.register_forward_hook(lambda _m, a, o: io.append((a[0].clone(), o.clone()))) for u in units]
    with torch.no_grad():
        out = model(x).final
    for h in handles:
        h.remove()
    return io, out


@pytest.mark.parametrize("name,flat", [("resnet", {}), ("elastic", {}), ("aig", {"model.depth": 20})])
@pytest.mark.parametrize("position", [1, 3])  # an identity block and a downsampling block
def test_deleting_a_block_changes_only_that_blocks_contribution(name, flat, position):
    model = _model(name, **flat)
    x = torch.randn(6, 3, 32, 32)
    before, out = _block_io(model, x)
    with lesion.deleted(model, []):
        assert torch.equal(_block_io(model, x)[1], out)  # deleting nothing changes nothing
    with lesion.deleted(model, [position]):
        after, _ = _block_io(model, x)
    for i in range(position):
        assert torch.equal(after[i][1], before[i][1])
    block = model.lesion_units().container[position]
    torch.testing.assert_close(after[position][1], F.relu(block.shortcut(after[position][0])))
    assert _block_io(model, x)[1].equal(out)  # the lesion was undone


def test_vgg_units_become_the_identity_and_others_cannot_be_deleted():
    model = _model("vgg", **{"model.depth": 11})
    units = model.lesion_units()
    assert units.deletable == (5, 8, 10, 11) and units.swap_groups == ((10, 11),)
    x = torch.randn(2, 3, 32, 32)
    before, _ = _block_io(model, x)
    with lesion.deleted(model, [5]):
        after, _ = _block_io(model, x)
    assert torch.equal(after[5][1], after[5][0])
    with pytest.raises(ValueError, match="cannot be deleted"):
        with lesion.deleted(model, [0]):
            pass


def test_kendall_tau():
    assert lesion.kendall_tau([0, 1, 2, 3]) == 1.0
    assert lesion.kendall_tau([3, 2, 1, 0]) == -1.0
    assert lesion.kendall_tau([1, 0, 2, 3]) == pytest.approx(4 / 6)


def test_reordering_swaps_within_groups_and_is_undone():
    model = _model("resnet")
    units = model.lesion_units()
    assert units.swap_groups == ((0, 1, 2), (4, 5), (7, 8))
    rng = np.random.default_rng(0)
    order = lesion.random_swaps(units.swap_groups, 9, 5, rng)
    assert order[3] == 3 and order[6] == 3 * 2 and sorted(order) == list(range(9))
    for group in units.swap_groups:
        assert sorted(order[p] for p in group) == list(group)
    x = torch.randn(2, 3, 32, 32)
    out = model(x).final
    original = list(units.container)
    with lesion.reordered(model, [1, 0, 2, 3, 4, 5, 6, 7, 8]):
        assert list(units.container)[:2] == original[1::-1]
        assert not torch.equal(model(x).final, out)
    assert list(units.container) == original and torch.equal(model(x).final, out)


def test_study_rows_summary_and_plot():
    model = _model("resnet")
    calls = []

    def error(m):  # a fake evaluation: the number of deleted blocks, so every row is checkable
        deleted = sum(u.lesioned for u in m.lesion_units().container)
        calls.append(deleted)
        return deleted / 10

    df = lesion.study(model, error, blocks=[0, 4], random_k=3, repeats=2, reorder_swaps=2, seed=0)
    assert list(df.kind) == ["none", "single", "single"] + ["random"] * 6 + ["reorder"] * 4
    assert df[df.kind == "single"].error.tolist() == [0.1, 0.1]
    for _, r in df[df.kind == "random"].iterrows():
        assert len(json.loads(r.units)) == r.k and r.error == pytest.approx(r.k / 10)
    assert (df[df.kind == "reorder"].kendall_tau < 1).all()
    s = lesion.summary(df)
    assert s["baseline_error"] == 0 and [r["k"] for r in s["random"]] == [1, 2, 3]
    assert lesion.plot(df, "t")[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(u.lesioned for u in model.lesion_units().container)
