"""Pretrained feature extractors, looked up by name."""

from retrain.backbones import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers specs)
from retrain.backbones.registry import (
    BackboneSpec as BackboneSpec,
)
from retrain.backbones.registry import (
    FeatureNet as FeatureNet,
)
from retrain.backbones.registry import (
    Preprocessing as Preprocessing,
)
from retrain.backbones.registry import (
    UnknownBackboneError as UnknownBackboneError,
)
from retrain.backbones.registry import (
    available_backbones as available_backbones,
)
from retrain.backbones.registry import (
    get_backbone as get_backbone,
)
from retrain.backbones.registry import (
    register_backbone as register_backbone,
)

DEFAULT_BACKBONE = "efficientnet_lite0"
