"""The PyTorch side of the backbone contract."""

from __future__ import annotations

import torch
from torch import nn


class FeatureNet(nn.Module):
    """What every backbone's ``build`` returns.

    ``forward(x)`` takes a normalised float tensor (N, 3, H, W) and returns pooled
    features (N, feature_dim). ``blocks`` lists the network's stages from input to
    output, so fine-tuning can unfreeze "the top k blocks" without knowing the
    architecture.
    """

    feature_dim: int
    blocks: nn.ModuleList

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
