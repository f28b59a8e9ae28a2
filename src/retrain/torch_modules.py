"""PyTorch pieces shared by export and fine-tuning. Imported only when PyTorch is needed."""

from __future__ import annotations

import torch
from torch import nn

from retrain.backbones import Preprocessing


class NormalizePixels(nn.Module):
    """uint8 RGB (N, H, W, 3) -> normalised float (N, 3, H, W): ``(x - mean) / std`` per channel."""

    def __init__(self, preprocessing: Preprocessing):
        super().__init__()
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.permute(0, 3, 1, 2).float() - self.mean) / self.std


class PixelsToFeatures(nn.Module):
    """uint8 RGB (N, H, W, 3) -> normalised (N, 3, H, W) -> backbone features (N, D)."""

    def __init__(self, net: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.normalize = NormalizePixels(preprocessing)
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(image))
