"""The engines that run a pixels -> features network: ONNX Runtime on the CPU, PyTorch on a GPU.

Every engine says what it is, so the extraction scheduler never has to guess:

* ``kind``: what computed the numbers (part of the cache namespace: engines differ by ~1e-5);
* ``device``: "cpu" or "cuda";
* ``batch_size``: images per call when none is asked for;
* ``concurrency``: how many threads may call it at once.
"""

from __future__ import annotations

import os

import numpy as np

from retrain.backbones import BackboneSpec
from retrain.devices import cpu_cores, resolve_device

# Images per forward pass when none is asked for. On the CPU small batches are as fast as big ones
# (the activations of a batch of 8 stay near the caches) and each worker's ONNX Runtime arena stays
# ~250 MB smaller than at 32; a GPU wants bigger calls.
AUTO_BATCH = {"cpu": 8, "cuda": 64}
MAX_CPU_WORKERS = 8  # each CPU worker holds one batch of activations
MAX_GPU_FEEDERS = 32  # decoding threads feeding one GPU


class OnnxEngine:
    """Runs a pixels->features (or pixels->probabilities) ONNX graph on the CPU.

    ``threads`` is ONNX Runtime's intra-op thread count (None: its default, all cores).
    ``concurrency`` is how many calls may run at once from different threads: a session's
    ``run`` is thread-safe, so one session serves every extraction worker.
    """

    kind = "onnxruntime-cpu"
    device = "cpu"
    batch_size = AUTO_BATCH["cpu"]

    def __init__(
        self, model_path: str | os.PathLike | bytes, threads: int | None = None, *, concurrency: int = 1
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # ORT_ENABLE_ALL already fuses every Pad and Clip of the exported backbone into its Conv and runs
        # the convolutions in the blocked NCHWc layout; there is no Cast or Transpose left but the input's.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a chain of convs: nothing to run in parallel
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        if threads and threads > 1 and concurrency > 1:
            # Other workers share the cores: threads spinning between ops would take them from decoding.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        src = model_path if isinstance(model_path, bytes) else os.fspath(model_path)
        self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.concurrency = concurrency

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: pixels})[0]


class TorchEngine:
    """Runs the backbone through PyTorch on a CUDA GPU (or CPU, for comparison).

    float32 on purpose: a half-precision network would give features far from the CPU's.
    On a GPU this small network is not the bottleneck anyway; decoding JPEGs on the CPU is.
    """

    concurrency = 1  # one GPU stream; the decoding threads queue here

    def __init__(self, spec: BackboneSpec, device: str = "cuda", net=None):
        import torch

        from retrain.torch_modules import PixelsToFeatures

        self.torch = torch
        self._device = torch.device(device)
        self.device = self._device.type
        self.kind = f"torch-{self.device}"
        self.batch_size = AUTO_BATCH.get(self.device, AUTO_BATCH["cpu"])
        module = PixelsToFeatures(net if net is not None else spec.build(), spec.preprocessing)
        self.module = module.eval().to(self._device)
        if self.device == "cuda":
            # NHWC input permuted to NCHW is already channels_last in memory: no copy on the way in.
            self.module = self.module.to(memory_format=torch.channels_last)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        # Fixed input size: let cuDNN pick its fastest kernels once. No TF32: it would change the
        # features (about 1e-3) against exact float32. Scoped, not global.
        with (
            torch.inference_mode(),
            torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False),
        ):
            x = torch.from_numpy(pixels)  # (B, H, W, 3) uint8
            if self.device == "cuda":
                x = x.pin_memory().to(self._device, non_blocking=True)
            return self.module(x).float().cpu().numpy()  # (B, D)


def engine_kind(device: str) -> str:
    """The ``kind`` of the engine :func:`make_engine` builds for ``device`` (without building it)."""
    return "torch-cuda" if resolve_device(device) == "cuda" else OnnxEngine.kind


def extraction_plan(device: str, workers: int | None = None) -> tuple[int, int]:
    """(worker threads, ONNX Runtime threads per call) for feature extraction on ``device``.

    CPU: one worker per core, each running single-threaded inference, up to 8 workers (each
    holds one batch of activations); more cores than that go to intra-op threads.
    GPU: many decoding workers, since decoding on the CPU is what limits a GPU.
    """
    cores = cpu_cores()
    if device == "cuda":
        return (workers or min(MAX_GPU_FEEDERS, cores)), 1
    n = workers or min(cores, MAX_CPU_WORKERS)
    return n, max(1, cores // n)


def make_engine(
    spec: BackboneSpec,
    *,
    device: str = "auto",
    model_dir=None,
    threads: int | None = None,
    workers: int | None = None,
):
    """The fastest engine for ``device``: ONNX Runtime on the CPU, PyTorch on a CUDA GPU."""
    if resolve_device(device) == "cuda":
        return TorchEngine(spec, "cuda")
    from retrain.export import backbone_onnx_path

    n, per_call = extraction_plan("cpu", workers)
    return OnnxEngine(backbone_onnx_path(spec, model_dir), threads=threads or per_call, concurrency=n)
