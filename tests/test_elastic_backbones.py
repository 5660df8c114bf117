"""`elastic` on torchvision backbones: exits per backbone, the 32x32 adaptation, ImageNet weights from a local
file (and never from the network), the from-scratch note, validation, the search space, and the unchanged
cifar_resnet default (same hashes, parameters and MACs as before backbones existed)."""

from __future__ import annotations

import json
import socket
import urllib.request

import optuna
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseBlock
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.models.vgg import cfgs as vgg_cfgs, make_layers

from study.search import SweepSpace, config_keys
from trainables import cost as cost_lib
from trainables import lesion
from trainables.config import TrialConfig
from trainables.hparams import ConfigError
from trainables.methods import elastic
from trainables.models import torchvision_backbones as tvb

# Counted by hand from torchvision's definitions: ResNet-18 = 4 stages x 2 BasicBlocks; MobileNetV2's inverted
# residual setting repeats its blocks 1+2+3+4+3+3+1 times; DenseNet-121 has 4 dense blocks (6, 12, 24, 16
# layers); VGG16 = 5 conv groups (2, 2, 3, 3, 3 convs) closed by 5 max-pools.
EXITS = {"resnet18": 8, "mobilenet_v2": 17, "densenet121": 4, "vgg16_bn": 5}
BLOCK_TYPES = {"resnet18": BasicBlock, "mobilenet_v2": InvertedResidual, "densenet121": _DenseBlock,
               "vgg16_bn": nn.MaxPool2d}
# The final feature map at 32x32 inputs, as the backbone module's docstring states.
FINAL_MAP = {"resnet18": (512, 4), "mobilenet_v2": (1280, 2), "densenet121": (1024, 4), "vgg16_bn": (512, 1)}
TINY_WIDTH = {"resnet18": 1.0, "mobilenet_v2": 0.25, "densenet121": 0.25, "vgg16_bn": 0.125}


def _cfg(backbone: str, **flat) -> TrialConfig:
    return TrialConfig.from_flat({"method": "elastic", "model.backbone": backbone, **flat})


def _build(backbone: str, num_classes: int = 10, **flat) -> nn.Module:
    torch.manual_seed(0)
    return elastic.build(_cfg(backbone, **flat).model, num_classes)


def _imagenet_state(backbone: str) -> dict[str, torch.Tensor]:
    """A state_dict with the keys and shapes of torchvision's ImageNet file for `backbone` (random values).
    VGG's ImageNet classifier (120M parameters) is stood in for by small tensors under its keys: they are
    skipped whatever they hold."""
    torch.manual_seed(123)
    if backbone == "vgg16_bn":
        state = {f"features.{k}": v for k, v in make_layers(vgg_cfgs["D"], batch_norm=True).state_dict().items()}
        return {**state, "classifier.6.weight": torch.randn(3, 3), "classifier.6.bias": torch.randn(3)}
    return getattr(torchvision.models, backbone)(weights=None).state_dict()


@pytest.mark.parametrize("backbone", list(EXITS))
def test_exits_are_the_hand_counted_blocks(backbone):
    model = _build(backbone)  # the standard width
    cfg = _cfg(backbone)
    blocks = sum(isinstance(m, BLOCK_TYPES[backbone]) for m in model.net.modules())
    assert blocks == EXITS[backbone] == elastic.num_exits(cfg.model) == len(model.heads) + 1
    out = model.eval()(torch.zeros(1, 3, 32, 32))
    assert out.num_exits == EXITS[backbone]
    assert [s.exit for s in model.segments() if s.exit is not None] == list(range(EXITS[backbone]))


@pytest.mark.parametrize("backbone", list(EXITS))
def test_last_exit_is_the_adapted_torchvision_network(backbone):
    model = _build(backbone, **{"model.width": TINY_WIDTH[backbone]}).eval()
    seen = {}

    def record(_module, args):
        seen["map"] = args[0].shape

    model.pool.register_forward_pre_hook(record)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out.logits[-1], model.net(x), atol=1e-5)
    if TINY_WIDTH[backbone] == 1.0:
        assert tuple(seen["map"][1:]) == (FINAL_MAP[backbone][0],) + (FINAL_MAP[backbone][1],) * 2
    else:
        assert tuple(seen["map"][2:]) == (FINAL_MAP[backbone][1],) * 2


@pytest.mark.parametrize("backbone", list(EXITS))
def test_pretrained_weights_load_from_a_local_file(backbone, tmp_path):
    state = _imagenet_state(backbone)
    path = tmp_path / f"{backbone}.pth"
    torch.save(state, path)
    model = _build(backbone, **{"model.pretrained": str(path)})
    scratch = _build(backbone)
    own = model.net.state_dict()
    skip = tvb.CLASSIFIER[backbone]
    loaded = [k for k in state if not k.startswith(skip)]
    assert loaded and all(torch.equal(own[k], state[k]) for k in loaded)
    assert any(not torch.equal(own[k], scratch.net.state_dict()[k]) for k in loaded)  # not the scratch init
    assert model(torch.zeros(1, 3, 32, 32)).logits[-1].shape == (1, 10)  # a fresh classifier for 10 classes
    assert model.notes == [f"{backbone}: pretrained weights from {path} (all but the classifier, which starts "
                           "from scratch for 10 classes)"]
    assert len(model(torch.zeros(1, 3, 32, 32)).logits) == EXITS[backbone]


def test_old_densenet_checkpoint_keys_are_renamed(tmp_path):
    # torchvision's ImageNet DenseNet files name a dense layer's parts `norm.1`, `conv.2`, ... (names from before
    # PyTorch 0.4, so they have no BatchNorm counters either).
    state = {k: v for k, v in _imagenet_state("densenet121").items() if not k.endswith("num_batches_tracked")}
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()}
    assert any(".norm.1." in k for k in old)
    torch.save(old, tmp_path / "d.pth")
    model = _build("densenet121", **{"model.pretrained": str(tmp_path / "d.pth")})
    k = "features.denseblock1.denselayer1.norm1.weight"
    assert torch.equal(model.net.state_dict()[k], state[k])


def test_missing_num_batches_tracked_is_accepted(tmp_path):
    # ImageNet files saved before PyTorch 0.4.1 have no BatchNorm counters.
    state = {k: v for k, v in _imagenet_state("resnet18").items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "r.pth")
    model = _build("resnet18", **{"model.pretrained": str(tmp_path / "r.pth")})
    assert torch.equal(model.net.conv1.weight, state["conv1.weight"])


def _bad_files(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save(_imagenet_state("resnet18"), tmp_path / "resnet18.pth")
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).state_dict(), tmp_path / "half.pth")
    return [("missing.pth", r"model.pretrained='.*missing.pth': no such file"),
            ("garbage.pth", r"model.pretrained='.*garbage.pth': not a readable torch state_dict \("),
            ("list.pth", r"model.pretrained='.*list.pth': holds a list, not a state_dict"),
            ("resnet18.pth", r"model.pretrained='.*resnet18.pth' does not fit torchvision's mobilenet_v2: \d+ keys "
                             r"missing \(first: features\..*\), \d+ unexpected \(first: bn1\.bias\)"),
            ("half.pth", r"model.pretrained='.*half.pth' does not fit torchvision's mobilenet_v2: \d+ tensors of "
                         r"another shape \(first: features\.\S+ is \(\d+, .*\) in the file, \(\d+, .*\) in the "
                         r"model\)")]


def test_a_bad_file_fails_with_one_line_naming_it(tmp_path):
    for name, pattern in _bad_files(tmp_path):
        with pytest.raises(ConfigError, match=pattern) as e:
            _build("mobilenet_v2", **{"model.pretrained": str(tmp_path / name)})
        assert "\n" not in str(e.value)


def test_nothing_is_ever_downloaded(monkeypatch, tmp_path):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise AssertionError("network access")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    torch.save(_imagenet_state("mobilenet_v2"), tmp_path / "m.pth")
    for backbone in EXITS:
        _build(backbone)
    _build("mobilenet_v2", **{"model.pretrained": str(tmp_path / "m.pth")})
    assert calls == []


def test_from_scratch_is_said_where_the_user_sees_it(tiny_splits, capsys):
    from study.cli import main
    from trainables.loop import RunContext, fit

    model = _build("mobilenet_v2", **{"model.width": 0.25})
    assert model.notes == ["mobilenet_v2: trained from scratch (no model.pretrained file given; the paper "
                           "fine-tunes ImageNet weights)"]
    assert not hasattr(_build("cifar_resnet"), "notes")  # the CIFAR ResNet is always trained from scratch
    assert main(["describe", "--method", "elastic", "--set", "model.backbone=mobilenet_v2", "--set",
                 "model.width=0.25", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"] == model.notes
    cfg = TrialConfig.from_flat({"method": "elastic", "model.backbone": "vgg16_bn", "model.width": 0.125,
                                 "data.dataset": "synthetic", "data.val_size": 100, "optim.epochs": 1,
                                 "optim.batch_size": 100})
    final = list(fit(cfg, tiny_splits, RunContext(threads=2)))[-1].final
    assert final.notes == ["vgg16_bn: trained from scratch (no model.pretrained file given; the paper fine-tunes "
                           "ImageNet weights)"]  # logged as the tag dynastudy.notes and printed with the result


@pytest.mark.parametrize("flat,message", [
    ({"model.backbone": "resnet50"}, "model.backbone='resnet50' is not one of: cifar_resnet, resnet18, mobilenet_v2, "
                                     "densenet121, vgg16_bn"),
    ({"model.backbone": "resnet18", "model.width": 0.5}, "model.width=0.5 is not supported by backbone=resnet18; "
                                                         "backbones with a width: mobilenet_v2, densenet121, vgg16_bn"),
    ({"model.width": 0.5}, "model.width=0.5 is not supported by backbone=cifar_resnet; backbones with a width: "),
    ({"model.backbone": "vgg16_bn", "model.depth": 56}, "model.depth=56 applies only to backbone=cifar_resnet (got "
                                                        "backbone=vgg16_bn, whose depth is fixed)"),
    ({"model.pretrained": "/w.pth"}, "model.pretrained='/w.pth' needs a torchvision backbone (one of: resnet18, "
                                     "mobilenet_v2, densenet121, vgg16_bn); cifar_resnet has no ImageNet weights"),
    ({"model.backbone": "resnet18", "model.pretrained": "w.pth"}, "model.pretrained='w.pth' is not an absolute path"),
    ({"model.backbone": "densenet121", "model.pretrained": "/w.pth", "model.width": 0.5},
     "model.pretrained='/w.pth' needs width=1.0 (got 0.5)"),
    ({"model.backbone": "densenet121", "model.weights": "independent", "model.exit_weights": [1, 1, 1]},
     "exit_weights has 3 values; backbone densenet121 has 4 exits"),
    ({"model.backbone": "resnet18", "policy.exit": 8}, "policy.exit=8 is outside the allowed range [-1, 7]"),
])
def test_invalid_configs_say_why_in_one_line(flat, message):
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_flat({"method": "elastic", **flat})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("backbone", list(EXITS))
def test_loss_weight_schemes_follow_the_exit_count(backbone):
    k = EXITS[backbone]
    width = {"model.width": TINY_WIDTH[backbone], "model.head_dropout": 0.0}
    model = _build(backbone, **width).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.arange(2)
    with torch.no_grad():
        out = model(x)
    ce = [torch.nn.functional.cross_entropy(z, y) for z in out.logits]
    for scheme, weights in [("uniform", [1.0] * k), ("linear", [(i + 1) / k for i in range(k)]),
                            ("independent", [0.5] * (k - 1) + [1.0])]:
        extra = {"model.exit_weights": weights} if scheme == "independent" else {}
        cfg = _cfg(backbone, **width, **{"model.weights": scheme}, **extra)
        assert elastic.exit_weights(cfg.model) == pytest.approx(weights)
        assert torch.allclose(elastic.loss(out, y, cfg.model), sum(w * c for w, c in zip(weights, ce)))


def test_lesion_study_refuses_torchvision_backbones():
    model = _build("vgg16_bn", **{"model.width": 0.125})
    with pytest.raises(ConfigError, match="the lesion study needs model.backbone=cifar_resnet; the vgg16_bn backbone"):
        with lesion.deleted(model, [0]):
            pass


def test_exit_macs_add_up_per_backbone():
    model = _build("densenet121", **{"model.width": 0.25})
    card = cost_lib.measure(model, 32)
    blocks = dict(card.blocks)
    # The first exit pays for the stem, dense block 1, its transition and its head; nothing else.
    first = sum(blocks[n] for n in ("features.conv0", "features.denseblock1", "features.transition1", "head0"))
    assert card.exits[0] == first and blocks["head0"] == model.heads[0].fc.in_features * 10
    assert blocks["features.conv0"] == 3 * 16 * 7 * 7 * 32 * 32  # stride 1: the 7x7 stem at full resolution


def test_the_space_follows_a_fixed_backbone_and_never_searches_one():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "minimize"])
    fixed = {"model.backbone": "resnet18"}
    seen = set()
    for _ in range(20):
        trial = study.ask()
        constants = SweepSpace(["elastic"], fixed)(trial)
        searched = config_keys(trial.params)
        assert not any(k.startswith(("model.backbone", "model.depth", "model.width")) for k in searched)
        cfg = TrialConfig.from_flat({**fixed, **constants})
        seen.add(cfg.model.weights)
        if cfg.model.weights == "independent":
            assert len(cfg.model.exit_weights) == 8 and cfg.model.exit_weights[-1] == 1.0
        study.tell(trial, [0.5, 1.0])
    assert seen == {"uniform", "linear", "independent"}
    for _ in range(10):  # nothing fixed: the default backbone, a one-value parameter Optuna does not sample
        trial = study.ask()
        SweepSpace(["elastic"], {})(trial)
        searched = config_keys(trial.params)
        assert searched["model.backbone"] == "cifar_resnet" and "model.depth" in searched
        study.tell(trial, [0.5, 1.0])


def test_cifar_resnet_default_is_unchanged():
    # Hashes and figures measured before `model.backbone` existed.
    assert TrialConfig.from_flat({"method": "elastic"}).config_hash() == "03c15cbd134f"
    assert TrialConfig.from_flat({"method": "elastic", "model.depth": 56}).config_hash() == "4e5a95c0be62"
    assert TrialConfig.from_flat({"method": "elastic", "model.backbone": "cifar_resnet", "model.width": 1.0,
                                  "model.pretrained": ""}).config_hash() == "03c15cbd134f"
    model = _build("cifar_resnet")
    assert isinstance(model, elastic.Elastic)
    assert sum(p.numel() for p in model.parameters()) == 275_274
    assert cost_lib.measure(model, 32).exits[-1] == 40_815_904
