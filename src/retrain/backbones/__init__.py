"""Pretrained feature extractors, looked up by name."""

from retrain.backbones import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers specs)
from retrain.backbones.registry import (
    BackboneSpec as BackboneSpec,
    FeatureNet as FeatureNet,
    Preprocessing as Preprocessing,
    UnknownBackboneError as UnknownBackboneError,
    available_backbones as available_backbones,
    get_backbone as get_backbone,
    register_backbone as register_backbone,
)

DEFAULT_BACKBONE = "efficientnet_lite0"
