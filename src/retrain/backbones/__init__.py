"""Pretrained feature extractors, looked up by name. Importing this does not import PyTorch."""

from retrain.backbones import catalog as _catalog  # noqa: F401  (registers the built-in backbones)
from retrain.backbones.registry import (
    BackboneSpec as BackboneSpec,
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
    register_alias as register_alias,
)
from retrain.backbones.registry import (
    register_backbone as register_backbone,
)

DEFAULT_BACKBONE = "efficientnet_lite0"


def __getattr__(name: str):
    # FeatureNet subclasses torch.nn.Module: resolve it only when asked for.
    if name == "FeatureNet":
        from retrain.backbones.base import FeatureNet

        return FeatureNet
    raise AttributeError(f"module 'retrain.backbones' has no attribute {name!r}")
