"""torchvision classification backbones at CIFAR resolution, cut into blocks for multi-exit networks.

Each backbone is torchvision's own model, built with `weights=None` (torchvision never downloads anything
here; ImageNet weights come only from a local state_dict file, `load_pretrained`). It is adapted to 32x32
inputs by the stem's stride alone, so every weight keeps its ImageNet shape:

  resnet18      conv1 (7x7) at stride 1 and no max-pool: layer1 runs at 32x32, the final feature map is 4x4
                (512 channels). Blocks: the 8 BasicBlocks of layer1..layer4.
  mobilenet_v2  the first conv (3x3) at stride 1: the four stride-2 stages of the inverted residuals take 32
                to 2, so the final feature map is 2x2 (1280 channels after the last 1x1 conv). Blocks: the 17
                inverted-residual blocks (features.1..17); features.18, the 1x1 conv to 1280, belongs to the
                final exit.
  densenet121   conv0 (7x7) at stride 1 and no pool0: dense block 1 runs at 32x32, the final feature map is
                4x4 (1024 channels). Blocks: the 4 dense blocks, each with the transition that follows it (the
                last has none), so an exit reads a transition's output. That is where the official Elastic
                DenseNet puts its heads; the transition is on the main path anyway, and its BN-ReLU-1x1 conv
                turns the block's raw concatenation (DenseNet is pre-activation) into a learnt projection with
                half the channels (a cheaper head).
  vgg16_bn      no stem stride to change: all five max-pools are kept, as in the CIFAR VGGs (and the `vgg`
                method), so the last conv group ends at 1x1 (512 channels). Blocks: the 5 conv groups, each
                with its closing max-pool (the official Keras Elastic VGG also reads the pool outputs).
                torchvision's classifier (7x7 adaptive pool, 25088 -> 4096 -> 4096 -> classes) would only see
                49 copies of one pixel at this size: it becomes global pooling + one linear layer (the CIFAR
                VGG head), and the 4096-wide layers are never allocated (built on the meta device).

`width` scales the backbones that torchvision can scale, for small test sizes (1 = the standard model):
MobileNetV2's `width_mult`; DenseNet's growth rate and initial features; VGG's channel counts. torchvision's
ResNet-18 has no width argument.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
import torchvision
from torchvision.models.vgg import VGG, cfgs as vgg_cfgs, make_layers

from trainables.hparams import ConfigError

BACKBONES = ("resnet18", "mobilenet_v2", "densenet121", "vgg16_bn")
SCALABLE = ("mobilenet_v2", "densenet121", "vgg16_bn")  # those with a width option
NUM_BLOCKS = {"resnet18": 8, "mobilenet_v2": 17, "densenet121": 4, "vgg16_bn": 5}
CLASSIFIER = {"resnet18": "fc.", "mobilenet_v2": "classifier.", "densenet121": "classifier.",
              "vgg16_bn": "classifier."}  # state_dict prefix of the ImageNet classifier, never loaded

# Old torchvision DenseNet checkpoints (the ImageNet files among them) name a dense layer's parts `norm.1`,
# `conv.2`, ...; torchvision itself renames them on load, and so does `load_pretrained`.
_OLD_DENSE_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                            r"([12]\.(?:weight|bias|running_mean|running_var))$")

Named = list[tuple[str, nn.Module]]


@dataclasses.dataclass
class Cut:
    """A backbone in execution order: the stem, the blocks (an exit can follow each), and the final exit's
    modules (`pre_pool`, then global average pooling, ReLU first where `relu_before_pool`, then `classifier`)."""

    net: nn.Module  # the torchvision model itself, whose forward gives the final exit's logits
    stem: Named
    blocks: list[Named]
    widths: list[int]  # channels after each block
    pre_pool: Named
    relu_before_pool: bool
    classifier: tuple[str, nn.Module]


class GlobalPool(nn.Module):
    """Global average pooling to a flat vector, after a ReLU where the backbone has one there (DenseNet)."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(x) if self.relu else x, 1), 1)


def _scale(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _named(net: nn.Module, *names: str) -> Named:
    return [(n, net.get_submodule(n)) for n in names]


def _resnet18(num_classes: int, width: float, pretrained: str) -> Cut:
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if pretrained:
        load_pretrained(net, "resnet18", pretrained)
    net.conv1.stride = (1, 1)
    net.maxpool = nn.Identity()
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    return Cut(net, _named(net, "conv1", "bn1", "relu"), [_named(net, b) for b in blocks],
               [net.get_submodule(b).bn2.num_features for b in blocks], [], False, ("fc", net.fc))


def _mobilenet_v2(num_classes: int, width: float, pretrained: str) -> Cut:
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width)
    if pretrained:
        load_pretrained(net, "mobilenet_v2", pretrained)
    net.features[0][0].stride = (1, 1)
    last = len(net.features) - 1
    return Cut(net, _named(net, "features.0"), [_named(net, f"features.{i}") for i in range(1, last)],
               [net.features[i].out_channels for i in range(1, last)], _named(net, f"features.{last}"), False,
               ("classifier", net.classifier))


def _densenet121(num_classes: int, width: float, pretrained: str) -> Cut:
    # torchvision's densenet121() is exactly this DenseNet at width 1.
    net = torchvision.models.DenseNet(growth_rate=_scale(32, width), block_config=(6, 12, 24, 16),
                                      num_init_features=_scale(64, width), num_classes=num_classes)
    if pretrained:
        load_pretrained(net, "densenet121", pretrained)
    net.features.conv0.stride = (1, 1)
    net.features.pool0 = nn.Identity()
    blocks = [_named(net, f"features.denseblock{i}", f"features.transition{i}") for i in (1, 2, 3)]
    blocks.append(_named(net, "features.denseblock4"))
    widths = [net.get_submodule(f"features.transition{i}").conv.out_channels for i in (1, 2, 3)]
    widths.append(net.features.norm5.num_features)
    return Cut(net, _named(net, "features.conv0", "features.norm0", "features.relu0"), blocks, widths,
               _named(net, "features.norm5"), True, ("classifier", net.classifier))


def _vgg16_bn(num_classes: int, width: float, pretrained: str) -> Cut:
    features = make_layers([v if v == "M" else _scale(v, width) for v in vgg_cfgs["D"]], batch_norm=True)
    # VGG's __init__ initialises the features (on the CPU) and the ImageNet classifier, which is replaced below:
    # on the meta device its ~120M parameters are never allocated.
    with torch.device("meta"):
        net = VGG(features, num_classes=num_classes)
    if pretrained:
        load_pretrained(net, "vgg16_bn", pretrained)
    channels = [m.num_features for m in features if isinstance(m, nn.BatchNorm2d)][-1]
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    net.classifier = nn.Linear(channels, num_classes)
    blocks, group, widths = [], [], []
    for i, m in enumerate(features):
        group.append((f"features.{i}", m))
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
        if isinstance(m, nn.MaxPool2d):
            blocks.append(group)
            widths.append(c)
            group = []
    return Cut(net, [], blocks, widths, [], False, ("classifier", net.classifier))


_BUILDERS = {"resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2, "densenet121": _densenet121,
             "vgg16_bn": _vgg16_bn}


def build(name: str, num_classes: int, width: float = 1.0, pretrained: str = "") -> Cut:
    """torchvision's `name` for `num_classes` classes at 32x32, its ImageNet weights loaded from the file
    `pretrained` when given (the classifier excepted). The name and width are checked by elastic's Hparams."""
    cut = _BUILDERS[name](num_classes, width, pretrained)
    assert len(cut.blocks) == NUM_BLOCKS[name] == len(cut.widths)
    return cut


def load_pretrained(net: nn.Module, name: str, path: str) -> None:
    """Load the torchvision state_dict saved in `path` into `net`, strictly: every key but the classifier's
    (`CLASSIFIER[name]`, skipped: the classes differ) must be there with its shape, and no other key.
    BatchNorm's `num_batches_tracked` may be missing (files saved before PyTorch 0.4.1 have none; BatchNorm
    fills it in). Raises ConfigError, one line naming the file and what did not fit."""
    where = f"model.pretrained={path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{where}: not a readable torch state_dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where}: holds a {type(state).__name__}, not a state_dict (a mapping of names to "
                          "tensors, as torch.save(model.state_dict()) writes)")
    skip = CLASSIFIER[name]
    given = {_OLD_DENSE_KEY.sub(r"\1\2", k): v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(skip)}
    missing = sorted(k for k in own.keys() - given.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given.keys() - own.keys())
    if missing or unexpected:
        raise ConfigError(f"{where} does not fit torchvision's {name}: {len(missing)} keys missing"
                          + (f" (first: {missing[0]})" if missing else "") + f", {len(unexpected)} unexpected"
                          + (f" (first: {unexpected[0]})" if unexpected else ""))
    wrong = [k for k in sorted(given) if given[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{where} does not fit torchvision's {name}: {len(wrong)} tensors of another shape "
                          f"(first: {k} is {tuple(given[k].shape)} in the file, {tuple(own[k].shape)} in the model)")
    net.load_state_dict(given, strict=False)
