"""The PyTorch modules of a model file written by retrain: backbone + new layer, for conversion.

A retrain model is one ONNX file. Phone formats (TFLite, ExecuTorch, Core ML, torch.export)
are converted from PyTorch, so this rebuilds the PyTorch module the ONNX graph was exported
from: the manifest names the backbone (built from the registry, with its architecture), and
every weight comes from the ONNX file itself, so a fine-tuned backbone converts as it was
trained, not as ImageNet left it.

The ONNX exporter folded each BatchNorm into the convolution before it (weights and a bias).
So the rebuilt net folds its own BatchNorms the same way first, then takes the ONNX
convolutions' weights in execution order, checking every shape. The caller compares the
converted file with the ONNX model anyway; a wrong mapping would not go unnoticed.

    >>> module, manifest = torch_classifier("output_graph.onnx")
    >>> module(torch.zeros(1, 224, 224, 3, dtype=torch.uint8))  # uint8 NHWC RGB -> probabilities
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from retrain.backbones import Preprocessing, get_backbone
from retrain.errors import ModelFileError
from retrain.export import get_manifest, is_multi_label
from retrain.torch_modules import PixelsToFeatures

HEAD_WEIGHTS = "final_retrain_ops/weights"
HEAD_BIASES = "final_retrain_ops/biases"


class PixelsToProbabilities(nn.Module):
    """uint8 RGB (N, H, W, 3) -> class probabilities (N, C): normalisation, backbone, new layer, softmax
    (``multi_label``: a sigmoid per label, as the multi-label ONNX model has)."""

    def __init__(
        self, features: PixelsToFeatures, coef: np.ndarray, intercept: np.ndarray, multi_label: bool = False
    ):
        super().__init__()
        self.features, self.multi_label = features, multi_label
        self.head = nn.Linear(coef.shape[0], coef.shape[1])
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.array(coef.T, np.float32)))
            self.head.bias.copy_(torch.from_numpy(np.array(intercept, np.float32)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(image))
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=1)


def torch_classifier(graph: str | os.PathLike) -> tuple[PixelsToProbabilities, dict]:
    """The eval-mode PyTorch module equivalent to the float ONNX model ``graph``, and its manifest."""
    path = os.fspath(graph)
    try:
        model = onnx.load(path)
    except FileNotFoundError:
        raise ModelFileError(f"model file {path!r} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
        raise ModelFileError(
            f"{path!r} is not an ONNX model written by retrain ({type(exc).__name__})"
        ) from None
    manifest = get_manifest(model, path)
    if manifest.get("quantization"):
        raise ModelFileError(
            f"{path!r} is the {manifest['quantization']} model; phone formats are converted from the float32 "
            "model (output_graph.onnx) and quantized by the converter: pass that file as --graph"
        )
    spec = get_backbone(manifest["backbone"]["name"])
    if spec.weights_id != manifest["backbone"].get("weights_id"):
        raise ModelFileError(
            f"{path!r} was trained on backbone weights {manifest['backbone'].get('weights_id')!r}, but this "
            f"retrain has {spec.weights_id!r} for {spec.name!r}; convert it with the retrain version that trained it"
        )
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if HEAD_WEIGHTS not in inits or HEAD_BIASES not in inits:
        raise ModelFileError(f"{path!r} has no new layer ({HEAD_WEIGHTS!r}); re-export it with retrain")
    net = spec.build().eval()
    fold_batch_norms(net, spec.preprocessing.input_size)
    load_onnx_convolutions(net, model, inits, path)
    module = PixelsToProbabilities(
        PixelsToFeatures(net, Preprocessing.from_dict(manifest["preprocessing"])),
        inits[HEAD_WEIGHTS],
        inits[HEAD_BIASES],
        multi_label=is_multi_label(manifest),
    )
    return module.eval(), manifest


def _leaf_calls(net: nn.Module, input_size: int) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(qualified name, module, input, output) of every Conv2d and BatchNorm2d call, in execution order."""
    calls: list = []
    names = {m: n for n, m in net.named_modules()}

    def hook(m, inputs, output):
        calls.append((names[m], m, inputs[0], output))

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
    ]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    return calls


def fold_batch_norms(net: nn.Module, input_size: int) -> None:
    """Fold every BatchNorm2d that directly follows a Conv2d into it (as the ONNX exporter did); eval mode only."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    calls = _leaf_calls(net, input_size)
    for (conv_name, conv, _, conv_out), (bn_name, bn, bn_in, _) in zip(calls, calls[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn_in is conv_out:
            _set_module(net, conv_name, fuse_conv_bn_eval(conv, bn))
            _set_module(net, bn_name, nn.Identity())


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def load_onnx_convolutions(net: nn.Module, model: onnx.ModelProto, inits: dict, path: str = "model") -> None:
    """Copy the ONNX graph's Conv weights (BatchNorm folded) into ``net``'s Conv2d layers, in execution order."""
    onnx_convs = [n for n in model.graph.node if n.op_type == "Conv"]
    size = int(model.graph.input[0].type.tensor_type.shape.dim[1].dim_value or 0)
    torch_convs = [(name, m) for name, m, _, _ in _leaf_calls(net, size) if isinstance(m, nn.Conv2d)]
    if len(onnx_convs) != len(torch_convs):
        raise ModelFileError(
            f"{path!r} has {len(onnx_convs)} convolutions but its backbone has {len(torch_convs)}; the file was "
            "not exported from this backbone: convert it with the retrain version that trained it"
        )
    with torch.no_grad():
        for node, (name, conv) in zip(onnx_convs, torch_convs):
            weight = inits.get(node.input[1])
            bias = inits.get(node.input[2]) if len(node.input) > 2 else None
            if weight is None or tuple(weight.shape) != tuple(conv.weight.shape):
                raise ModelFileError(
                    f"{path!r}: convolution {node.name!r} does not fit layer {name!r} of the backbone "
                    f"({None if weight is None else weight.shape} vs {tuple(conv.weight.shape)}); re-export the model"
                )
            conv.weight.copy_(torch.from_numpy(np.array(weight)))
            if bias is not None:
                if conv.bias is None:
                    conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
                conv.bias.copy_(torch.from_numpy(np.array(bias)))
            elif conv.bias is not None:
                conv.bias.zero_()
