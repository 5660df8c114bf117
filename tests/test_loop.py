"""The training loop: it learns, resumes exactly, and ends a diverging trial with its reason."""

from __future__ import annotations

import pytest
import torch

from trainables import loop as loop_lib
from trainables.config import TrialConfig

CTX = loop_lib.RunContext(threads=2)


def _cfg(**flat):
    base = {"method": "elastic", "data.dataset": "synthetic", "data.val_size": 100, "optim.epochs": 2,
            "optim.batch_size": 50, "model.depth": 20}
    return TrialConfig.from_flat({**base, **flat})


def test_fit_reports_every_epoch_and_a_final_result(tiny_splits):
    reports = list(loop_lib.fit(_cfg(), tiny_splits, CTX))
    assert [r.epoch for r in reports] == [1, 2]
    assert reports[0].final is None and reports[1].final is not None
    m = reports[-1].metrics
    assert {"train_loss", "val_acc", "macs", "epoch_time_s", "images_per_s", "val_acc_exit_8"} <= set(m)
    f = reports[-1].final
    assert len(f.exit_val_acc) == len(f.exit_test_acc) == 9 == len(f.cost.exits)
    assert 0 < f.macs <= f.cost.total and f.val_acc == m["val_acc"]
    assert f.val_acc > 0.2  # learnable synthetic data: well above the 0.1 of chance after two epochs
    assert set(f.frontier["policy"]) == {"static", "confidence", "budgeted"}
    assert abs(sum(f.val_exit_fractions) - 1) < 1e-9


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny_splits):
    cfg = _cfg(**{"optim.epochs": 3})
    full = list(loop_lib.fit(cfg, tiny_splits, CTX))
    first = next(iter(loop_lib.fit(cfg, tiny_splits, CTX)))
    state = first.state()
    resumed = list(loop_lib.fit(cfg, tiny_splits, CTX, state=state))
    assert [r.epoch for r in resumed] == [2, 3]
    a, b = full[-1].state()["model"], resumed[-1].state()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed[-1].metrics["val_acc"] == full[-1].metrics["val_acc"]


def test_divergence_raises_with_the_reason(tiny_splits, monkeypatch):
    from trainables.methods import elastic

    real = elastic.loss
    monkeypatch.setattr(elastic, "loss", lambda out, y, hp, ls=0.0: real(out, y, hp, ls) * float("nan"))
    with pytest.raises(loop_lib.Diverged, match="training loss is nan at epoch 1"):
        list(loop_lib.fit(_cfg(), tiny_splits, CTX))


def test_step_schedule_and_warmup():
    cfg = _cfg(**{"optim.schedule": "step", "optim.warmup_epochs": 1.0, "optim.epochs": 4})
    f = loop_lib._lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == 1.0 and f(25) == pytest.approx(0.1) and f(35) == pytest.approx(0.01)
