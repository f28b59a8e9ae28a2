"""Backbone registry: one contract for every pretrained feature extractor.

The training code never special-cases an architecture. It asks the registry for a
:class:`BackboneSpec` by name and uses only what the spec says: how to build the
network, what input size and normalisation its weights expect, and how wide its
pooled features are. This module does not import PyTorch: a warm retrain (all
features cached) never needs it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from retrain.errors import RetrainError


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels become the network's input. Travels with every export.

    Images are decoded to RGB uint8, resized (aspect ratio not kept, like
    retrain.py) to ``input_size`` x ``input_size`` with ``resample``, then
    normalised per channel as ``(pixel - mean) / std`` with pixels in 0..255.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "fast_bilinear"  # retrain.images.RESAMPLE_FILTERS lists the choices

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            resample=str(d.get("resample", "bilinear")),  # manifests from before fast_bilinear: Pillow's
        )


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    preprocessing: Preprocessing
    # Builds the network (a retrain.backbones.FeatureNet) with its pretrained ImageNet weights loaded.
    # Only this imports PyTorch, so looking specs up stays cheap.
    build: Callable[..., Any] = field(compare=False, repr=False)
    description: str = ""
    # Giga multiply-adds per image at input_size, for the benchmark's compute floor.
    gmacs: float = 0.0
    # Identifies the exact weights, e.g. "efficientnet-lite0-57934424"; part of cache keys.
    weights_id: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}
# Other names of a registered backbone (retrain.py's / TF Hub's), looked up like its own name.
_ALIASES: dict[str, str] = {}
# A TF Hub feature-vector URL whose network is registered under an alias, e.g.
# https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/4 -> mobilenet_v2_100_224.
_TFHUB_URL = re.compile(r"(?:https?://)?tfhub\.dev/google/imagenet/(\w+)/feature_vector/\d+/?")

# Names retrain.py users may type, with what to say about them.
_LEGACY_NAMES = ("inception_v3", "mobilenet_", "nasnet", "pnasnet", "http://", "https://")


class UnknownBackboneError(RetrainError, ValueError):
    """The backbone name is not in the registry."""


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def register_alias(alias: str, name: str) -> None:
    """``alias`` names the registered backbone ``name`` too (and its TF Hub feature-vector URL)."""
    if name not in _REGISTRY:
        raise ValueError(f"cannot alias {alias!r} to {name!r}: no such backbone")
    if alias in _REGISTRY or alias in _ALIASES:
        raise ValueError(f"backbone name {alias!r} is already registered")
    _ALIASES[alias] = name


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    key = name.strip().lower().replace("-", "_")
    url = _TFHUB_URL.fullmatch(name.strip().lower())
    if url and url.group(1) in _ALIASES:
        key = url.group(1)
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    names = ", ".join(available_backbones())
    if any(key.startswith(p) for p in _LEGACY_NAMES) or "tfhub.dev" in key:
        raise UnknownBackboneError(
            f"backbone {name!r} is a TensorFlow Hub / retrain.py model, which this tool cannot load "
            f"(it runs offline on PyTorch weights shipped as Python packages). "
            f"Available backbones: {names}. The default, efficientnet_lite0, is more accurate than "
            f"mobilenet_v1/v2; mobilenet_v2 (= mobilenet_v2_100_224) is the tutorial's phone network."
        )
    close = difflib.get_close_matches(key, available_backbones(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownBackboneError(f"unknown backbone {name!r}.{hint} Available backbones: {names}.")
