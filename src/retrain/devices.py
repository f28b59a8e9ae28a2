"""Which device runs the network, and how many cores this process may use."""

from __future__ import annotations

import os
import sys

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``--device`` (auto, cpu, cuda) -> "cpu" or "cuda"; asking for a GPU that is not there is an error."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "cpu"
    cuda = _cuda_available()
    if device == "cuda" and not cuda:
        from retrain.errors import RetrainError

        raise RetrainError(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU. Use --device auto or cpu."
        )
    return "cuda" if cuda else "cpu"


def _cuda_available() -> bool:
    # Only look if PyTorch is installed with CUDA; importing it costs seconds, so check cheaply first.
    if "torch" not in sys.modules:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False
        try:
            from importlib.metadata import version

            if "+cpu" in version("torch"):
                return False
        except Exception:  # noqa: BLE001 - metadata missing: fall through to the real check
            pass
        # A Linux machine with an NVIDIA driver has /dev/nvidiactl (WSL2: /dev/dxg); without either
        # CUDA cannot work, and importing a CUDA build of PyTorch to find that out takes seconds.
        if sys.platform == "linux" and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg")):
            return False
    import torch

    return torch.cuda.is_available()


def cpu_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def decode_workers(requested: int | None = None) -> int:
    """Threads that decode images ahead of the network (``--num_workers``, or a few more than the cores:
    Pillow and OpenCV release the GIL, and a thread waiting on the disk holds no core)."""
    return requested or min(8, cpu_cores() + 2)
