"""PyTorch pieces shared by export and fine-tuning. Imported only when PyTorch is needed."""

from __future__ import annotations

import torch
from torch import nn

from retrain.backbones import Preprocessing


class PixelsToFeatures(nn.Module):
    """uint8 RGB (N, H, W, 3) -> normalised (N, 3, H, W) -> backbone features (N, D)."""

    def __init__(self, net: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()
        return self.net((x - self.mean) / self.std)
