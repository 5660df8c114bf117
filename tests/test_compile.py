"""torch.compile as a way to run a trial (`RunContext.compile`): it trains, and its checkpoints look exactly like
an uncompiled run's (no `_orig_mod.` prefix).

The default test compiles with the aot_eager backend (dynamo graph capture and AOTAutograd, PyTorch's own kernels;
about 5 s): it checks what the platform does with a compiled model. Inductor, the backend `fit()` uses, generates
and builds C++ kernels: with a cold kernel cache that takes about 30 s on an idle 2-core CPU (60 s under load;
about 3 s once /tmp/torchinductor_* holds them), so that variant runs only with DYNASTUDY_TEST_INDUCTOR=1."""

from __future__ import annotations

import functools
import math
import os
import shutil

import pytest
import torch

from trainables import loop as loop_lib
from trainables.config import TrialConfig
from trainables.methods import get_method


def _cfg():
    # 300 training images in 6 full batches: one compiled graph (a last partial batch would compile a second)
    return TrialConfig.from_flat({"method": "resnet", "model.depth": 20, "data.dataset": "synthetic",
                                  "data.val_size": 100, "optim.epochs": 1, "optim.batch_size": 50})


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fit_trains_and_keeps_the_checkpoint_layout(tiny_splits, monkeypatch, backend):
    if backend == "inductor":
        if not os.environ.get("DYNASTUDY_TEST_INDUCTOR"):
            pytest.skip("inductor builds C++ kernels (about 30 s cold on 2 CPU cores); set DYNASTUDY_TEST_INDUCTOR=1")
        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            pytest.fail("torch.compile's CPU backend (inductor) needs a C++ compiler; none on PATH")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    assert len(tiny_splits.train_y) % _cfg().optim.batch_size == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    (plain,) = loop_lib.fit(_cfg(), tiny_splits, loop_lib.RunContext(threads=2))
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    (compiled,) = loop_lib.fit(_cfg(), tiny_splits, loop_lib.RunContext(threads=2, compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really trained through dynamo

    a, b = plain.state(), compiled.state()
    assert list(b["model"]) == list(a["model"])
    assert not any(k.startswith("_orig_mod.") for k in b["model"])
    assert all(b["model"][k].shape == a["model"][k].shape for k in a["model"])
    assert set(b) == set(a) and b["epoch"] == a["epoch"] and b["config"] == a["config"]
    assert b["optimizer"]["param_groups"] == a["optimizer"]["param_groups"]
    assert set(b["optimizer"]["state"]) == set(a["optimizer"]["state"])
    assert list(compiled.final.weights) == list(plain.final.weights)
    # the compiled module trained the weights the checkpoint holds: the same steps, up to kernel rounding
    assert math.isfinite(compiled.metrics["train_loss"])
    assert compiled.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=0.02)
    assert compiled.metrics["val_acc"] == pytest.approx(plain.metrics["val_acc"], abs=0.05)
    # an uncompiled network takes a compiled run's checkpoint as it is
    get_method("resnet").build(_cfg().model, tiny_splits.num_classes).load_state_dict(b["model"])
