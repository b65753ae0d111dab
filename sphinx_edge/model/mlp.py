"""The fc1 -> GELU -> fc2 block of both visual experts (timm ConvNeXt and DINOv2 ViT-S/B/L names)."""

import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU, as nn.GELU's default in timm and DINOv2
