"""The trial view's panels on the data of real tiny trials: each trial is trained in-process on a small synthetic
split, its epoch reports and final result turned into `TrialData` the way the tracker logs them (metric keys from
`study.tracking.final_metrics`, tables through parquet, the cost card through JSON), and each panel is checked
against the numbers the trial produced."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from dashboards import panels as P
from dashboards.data import TrialData
from study.tracking import TAG_FAIL, TAG_METHOD, TAG_NOTES, TAG_TRIAL, _param_str, final_metrics
from trainables import lesion as lesion_lib
from trainables import loop as loop_lib
from trainables.config import DataHparams, TrialConfig
from trainables.data import make_splits, synthetic
from trainables.methods import get_method

CPU = torch.device("cpu")
# One thread: these models are so small that a second thread only adds contention on a shared machine.
CTX = loop_lib.RunContext(threads=1, channels_last=False)
MSDNET = {f"model.{k}": v for k, v in dict(preset="custom", blocks=3, step_mode="even", step=1, base=1, channels=8,
                                           growth_rate=4).items()}


@pytest.fixture(scope="module")
def splits():
    """Smaller than conftest's tiny_splits (16 px, 40 training images): every trial here trains in about a
    second; the panels need the trials' artifacts, not their accuracy."""
    threads = torch.get_num_threads()
    yield make_splits(synthetic(n_train=60, n_test=30, image_size=16), DataHparams(dataset="synthetic", val_size=20))
    torch.set_num_threads(threads)  # fit() set one thread for the whole process


def _table(df: pd.DataFrame) -> pd.DataFrame:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return pd.read_parquet(io.BytesIO(buf.getvalue()))


def _trial(splits, method: str, **flat) -> tuple[TrialData, loop_lib.FinalResult]:
    """Train a trial and hold its results as the tracker logs them: every epoch's metrics at step = epoch, the
    final metrics at the last step again, the frontier and the method's tables as parquet, the cost card."""
    cfg = TrialConfig.from_flat({"method": method, "data.dataset": "synthetic", "data.val_size": 20,
                                 "optim.batch_size": 20, "optim.epochs": 1, **flat})
    histories: dict[str, list[tuple[int, float]]] = {}
    metrics: dict[str, float] = {}
    final = None
    for report in loop_lib.fit(cfg, splits, CTX):
        logged = {k: float(v) for k, v in report.metrics.items() if isinstance(v, (int, float))}
        if report.final is not None:
            final = report.final
            logged.update(final_metrics(final))
        for k, v in logged.items():
            histories.setdefault(k, []).append((report.epoch, v))
        metrics.update(logged)
    tags = {TAG_METHOD: method, TAG_TRIAL: f"t-{method}"}
    if final.notes:
        tags[TAG_NOTES] = "\n".join(final.notes)
    tables = {name: _table(df) for name, df in {"frontier": final.frontier, **final.tables}.items()}
    return TrialData(run_id=f"run-{method}", method=method, trial=f"t-{method}", status="FINISHED",
                     params={k: _param_str(v) for k, v in cfg.to_flat().items()}, metrics=metrics, tags=tags,
                     histories=histories, tables=tables, cost=json.loads(json.dumps(final.cost.to_dict()))), final


@pytest.fixture(scope="module")
def msdnet(splits):
    """A 3-exit MSDNet (test_methods' smallest), two epochs, under its own budgeted-batch policy."""
    return _trial(splits, "msdnet", **{"optim.epochs": 2, **MSDNET})


@pytest.fixture(scope="module")
def aig(splits):
    """ConvNet-AIG on ResNet-20, with a lesion study of its trained weights logged to it."""
    t, final = _trial(splits, "aig", **{"model.depth": 20, "policy.name": "static"})
    model = get_method("aig").build(TrialConfig.from_flat({"method": "aig", "model.depth": 20}).model, 10)
    model.load_state_dict(final.weights)
    test = loop_lib.eval_batches(splits, "test", CPU, channels_last=False)
    t.tables["lesion"] = _table(lesion_lib.study(
        model, lambda m: loop_lib.final_exit_error(m, test, splits.test_y, CPU), blocks=[0, 4, 8], random_k=2,
        repeats=2, reorder_swaps=2, seed=0))
    return t, final


@pytest.fixture(scope="module")
def dsl(splits):
    return _trial(splits, "dsl", **{"model.depth": 20})


@pytest.fixture(scope="module")
def ticket(splits):
    return _trial(splits, "lottery", **{"model.depth": 20, "model.levels": 2, "model.controls": "both"})


def _empty(status="RUNNING", tags=None) -> TrialData:
    """A trial that has logged nothing yet (or failed before its first epoch)."""
    return TrialData(run_id="r0", method="elastic", trial="t0", status=status, params={}, metrics={},
                     tags=tags or {}, histories={}, tables={}, cost=None)


def _axes_titled(fig) -> None:
    """Every visible axis has a title (shared x axes of upper subplots hide their ticks and need none)."""
    used = {tr.xaxis or "x" for tr in fig.data if "xaxis" in tr} | {tr.yaxis or "y" for tr in fig.data if "yaxis" in tr}
    for ref in used:
        axis = fig.layout[ref.replace("x", "xaxis", 1) if ref.startswith("x") else ref.replace("y", "yaxis", 1)]
        if axis.showticklabels is False:
            continue
        assert axis.title.text, f"{ref} has no title in {fig.layout.title.text!r}"


def _trace(fig, name):
    (tr,) = [tr for tr in fig.data if tr.name == name]
    return tr


# ------------------------------------------------------------------------------------------------ panels

def test_curves_per_epoch_with_every_exit_and_head(msdnet, dsl, ticket):
    t, _ = msdnet
    fig = P.curves(t)
    _axes_titled(fig)
    assert list(_trace(fig, "training loss").x) == [1, 2]
    acc = _trace(fig, "validation accuracy")
    assert list(acc.y) == [v for _, v in t.histories["val_acc"][:2]]  # the final value repeats step 2: one point
    assert [tr.name for tr in fig.data if tr.legendgroup == "exits"] == [f"exit {k}" for k in range(3)]
    assert list(_trace(fig, "learning rate").x) == [1, 2]
    assert fig.layout.xaxis3.title.text == "epoch"
    # DSL: its side heads as faint lines; head 0 is the network itself (the validation accuracy line)
    assert [tr.name for tr in P.curves(dsl[0]).data if tr.legendgroup == "heads"] == ["side head 1", "side head 2"]
    # lottery tickets: one point per pruning level, level L logged at step L + 1
    fig = P.curves(ticket[0])
    assert list(_trace(fig, "validation accuracy").x) == [0, 1, 2]
    assert fig.layout.xaxis2.title.text == "pruning level"
    assert P.curves(_empty()) is None


def test_exits_one_point_per_exit_at_its_cumulative_macs(msdnet, aig):
    t, final = msdnet
    fig = P.exits(t)
    _axes_titled(fig)
    val, test = _trace(fig, "validation"), _trace(fig, "test")
    assert list(val.x) == list(test.x) == list(final.cost.exits)
    assert all(a < b for a, b in zip(val.x, val.x[1:]))  # cumulative
    assert list(val.y) == pytest.approx(final.exit_val_acc) and list(test.y) == pytest.approx(final.exit_test_acc)
    assert f"{final.val_exit_fractions[1]:.1%} of validation samples leave here" in val.hovertext[1]
    op = _trace(fig, "operating point (validation)")
    assert (op.x[0], op.y[0]) == pytest.approx((final.macs, final.val_acc))
    assert P.exits(aig[0]) is None and P.exits(_empty()) is None  # one exit: nothing to compare


def test_anytime_is_a_step_function_of_the_budget(msdnet, aig):
    t, final = msdnet
    fig = P.anytime(t)
    _axes_titled(fig)
    (tr,) = fig.data
    assert tr.line.shape == "hv" and list(tr.x) == list(final.cost.exits)
    assert list(tr.y) == pytest.approx(final.exit_test_acc)
    assert P.anytime(aig[0]) is None


def test_frontier_points_by_policy_with_the_operating_point(msdnet, ticket):
    t, final = msdnet
    f = final.frontier
    fig = P.frontier(t)
    _axes_titled(fig)
    assert fig.layout.xaxis.type == "log"
    by_policy = {tr.name: tr for tr in fig.data if tr.name not in ("operating point", "non-dominated")}
    assert set(by_policy) == {"static", "budgeted"}  # MSDNet's own policy family
    for policy, tr in by_policy.items():
        rows = f[(f.policy == policy) & ~f.operating].sort_values("macs")
        assert list(tr.x) == pytest.approx(rows.macs.tolist()) and list(tr.y) == pytest.approx(rows.val_acc.tolist())
    op = _trace(fig, "operating point")
    assert (op.x[0], op.y[0]) == pytest.approx((final.macs, final.val_acc))
    assert "exit 2" in by_policy["static"].hovertext[-1]
    budgeted = by_policy["budgeted"].hovertext[0]
    assert "param 0.05" in budgeted  # q, the first of MSDNet's 39 exit priors
    assert "thresholds [" in budgeted and "exit fractions (validation) [" in budgeted
    front = _trace(fig, "non-dominated")
    assert all(a <= b for a, b in zip(front.y, front.y[1:]))  # more MACs buy more accuracy along the front
    test = P.frontier(t, acc="test_acc")
    assert list(_trace(test, "static").x) == pytest.approx(f[f.policy == "static"].sort_values("test_macs")
                                                           .test_macs.tolist())
    # lottery tickets: one series of levels (not one per level's override), the last level is the operating one
    fig = P.frontier(ticket[0])
    assert [tr.name for tr in fig.data] == ["static", "non-dominated", "operating point"]
    assert "level 0, density 100.00%" in _trace(fig, "static").hovertext[-1]  # the dense level costs the most
    with pytest.raises(ValueError, match="valid: val_acc, test_acc"):
        P.frontier(t, acc="macs")


def test_gate_heatmap_is_layers_by_classes(aig, splits):
    t, final = aig
    fig = P.gate_heatmap(t)
    _axes_titled(fig)
    (hm,) = fig.data
    table = final.tables["gate_rates"]
    assert np.shape(hm.z) == (9, len(np.unique(splits.val_y)))
    assert list(hm.y) == loop_lib.gate_names(final.cost) == [f"block{i}" for i in range(9)]
    assert hm.z[4][3] == pytest.approx(table[(table.layer == 4) & (table["class"] == 3)].rate.item())
    # gate_rates on known decisions: two gates in one block are told apart by their layer index
    gates = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1], [1, 1, 1]])
    _, table = loop_lib.gate_rates(gates, np.array([0, 0, 1, 1]), ["block0", "block0", "block1"])
    hm = P.gate_heatmap(dataclasses.replace(t, tables={"gate_rates": table})).data[0]
    assert list(hm.y) == ["0: block0", "1: block0", "2: block1"] and list(hm.x) == ["class 0", "class 1"]
    np.testing.assert_allclose(hm.z, [[1.0, 0.5], [0.5, 0.5], [0.5, 1.0]])
    assert P.gate_heatmap(_empty()) is None


def test_heads_accuracy_vs_path_macs(dsl):
    t, final = dsl
    fig = P.heads(t)
    _axes_titled(fig)
    table = final.tables["heads"].sort_values("macs")
    val = _trace(fig, "validation")
    assert list(val.x) == table.macs.tolist() and list(val.y) == pytest.approx(table.val_acc.tolist())
    assert list(val.text) == [f"head {h}" for h in table["head"]]
    assert "head 1 (side, train-only)" in " ".join(val.hovertext)
    assert P.heads(_empty()) is None


def test_lottery_accuracy_vs_density_per_level_with_controls(ticket):
    t, final = ticket
    fig = P.lottery(t)
    _axes_titled(fig)
    table = final.tables["lottery"]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.autorange == "reversed"
    ticket_val = _trace(fig, "ticket (validation)")
    assert list(ticket_val.x) == table.density.tolist() and table.density.is_monotonic_decreasing
    assert list(ticket_val.y) == table.val_acc.tolist()
    for name in ("reinit control", "random-mask control"):  # trained at levels 1 and 2 only
        assert list(_trace(fig, f"{name} (test)").x) == table.density.tolist()[1:]
    assert f"sparse {final.tables['lottery'].sparse_macs.iloc[2] / 1e6:.2f}M MACs" in ticket_val.hovertext[2]
    assert P.lottery(_empty()) is None


def test_lesion_error_vs_blocks_deleted_and_swaps(aig):
    t, _ = aig
    df = t.tables["lesion"]
    fig = P.lesion(t)
    _axes_titled(fig)
    s = lesion_lib.summary(df)
    base = _trace(fig, "intact network")
    assert (base.x[0], base.y[0]) == (0, s["baseline_error"])
    single = _trace(fig, "one block deleted")
    assert list(single.x) == [1, 1, 1] and list(single.y) == [r["error"] for r in s["single"]]
    rnd = _trace(fig, "k random blocks deleted (mean ± sd)")
    assert list(rnd.x) == [0, 1, 2]
    assert list(rnd.y[1:]) == pytest.approx([r["mean_error"] for r in s["random"]])
    assert list(rnd.error_y.array[1:]) == pytest.approx([r["std_error"] for r in s["random"]])
    swaps = _trace(fig, "s random swaps (mean ± sd)")
    assert swaps.xaxis == "x2" and list(swaps.x) == [0, 1, 2]
    assert list(swaps.y[1:]) == pytest.approx([r["mean_error"] for r in s["reorder"]])
    # without reordering: one subplot
    no_swaps = dataclasses.replace(t, tables={"lesion": df[df.kind != "reorder"]})
    assert {tr.xaxis for tr in P.lesion(no_swaps).data} == {"x"}


def test_panels_lists_only_the_panels_with_data(msdnet, aig, dsl, ticket):
    ids = {name: [pid for pid, _, _ in P.panels(t)] for name, (t, _) in
           {"msdnet": msdnet, "aig": aig, "dsl": dsl, "lottery": ticket}.items()}
    assert ids == {"msdnet": ["curves", "frontier", "exits", "anytime"],
                   "aig": ["curves", "frontier", "gates", "lesion"], "dsl": ["curves", "frontier", "heads"],
                   "lottery": ["curves", "frontier", "lottery"]}
    assert P.panels(_empty()) == []
    pid, title, fig = P.panels(aig[0])[2]
    assert title == fig.layout.title.text and fig.layout.template.layout.paper_bgcolor == "white"
    assert set(P.PANEL_IDS) == {"curves", "exits", "frontier", "gates", "lottery", "lesion", "anytime", "heads"}


def test_summary_facts(msdnet, ticket):
    t, final = msdnet
    rows = dict(P.summary(t))
    assert rows["method"] == "msdnet" and rows["status"] == "FINISHED" and rows["exits"] == "3"
    assert rows["validation accuracy"] == f"{final.val_acc:.4f}" and rows["test accuracy"] == f"{final.test_acc:.4f}"
    assert rows["MACs per image"].startswith(f"{final.macs / 1e6:.2f}M")
    assert f"FLOPs = 2 x MACs = {2 * final.macs / 1e6:.2f}M" in rows["MACs per image"]
    assert sum("FLOPs" in v for v in rows.values()) == 1
    assert rows["policy"] == "budgeted (q=1.0)" and "growth_rate=4" in rows["model"]
    assert "epochs=2" in rows["training"]
    lottery_rows = dict(P.summary(ticket[0]))
    assert lottery_rows["density (prunable weights kept)"] == f"{ticket[1].metrics['density']:.2%}"
    assert "policy" not in lottery_rows  # one exit: the policy changes nothing
    failed = dict(P.summary(_empty("FAILED", {TAG_FAIL: "training loss is nan at epoch 1", TAG_NOTES: "n"})))
    assert failed["fail reason"] == "training loss is nan at epoch 1" and failed["notes"] == "n"
    assert "validation accuracy" not in failed
