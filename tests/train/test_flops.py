"""Model FLOPs of a training step against closed forms."""

import pytest
import torch
from torch import nn

from sphinx_edge.train.flops import PEAK_BF16_FLOPS, model_flops_per_token, peak_flops


class EncoderThenHead(nn.Module):
    """Stands in for the trainee: a (frozen) encoder, a trainable head; returns (loss, positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 16, bias=False)
        self.head = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.head(self.encoder(x)).sum(), x.shape[0] * x.shape[1]


def test_frozen_modules_count_once_and_trainable_ones_three_times():
    model, x = EncoderThenHead(), torch.randn(3, 5, 8)  # 15 positions
    encoder, head = 2 * 8 * 16, 2 * 16 * 4  # multiply-adds x 2, per position
    assert model_flops_per_token(model, x, frozen=(model.encoder,)) == pytest.approx(encoder + 3 * head)
    assert model_flops_per_token(model, x, frozen=()) == pytest.approx(3 * (encoder + head))


def test_a_frozen_module_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="not part of the root"):
        model_flops_per_token(EncoderThenHead(), torch.randn(1, 2, 8), frozen=(nn.Linear(8, 16),))


def test_peaks_need_a_gpu_and_bf16():
    assert peak_flops(torch.device("cpu"), "bf16") is None
    assert dict(PEAK_BF16_FLOPS)["H100"] == pytest.approx(989e12)
