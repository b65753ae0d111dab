"""Model FLOPs of a training step, and model FLOPs utilisation (MFU) on known GPUs.

Model FLOPs follow the usual convention (PaLM, appendix B): a trainable module costs its forward
FLOPs three times (forward, and backward w.r.t. activations and weights); a frozen encoder costs its
forward once; recomputation by activation checkpointing does not count. The forward FLOPs are
counted by `torch.utils.flop_counter` on a real batch rather than by a closed form, so the
any-resolution layout (3 or 5 views, skip tokens) and padding are counted as they run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets; matched
# against torch.cuda.get_device_name, first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and NVL
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The GPU's dense bf16 peak, or None where it is unknown (CPU, fp32 training, an unlisted GPU)."""
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def model_flops_per_token(trainee: nn.Module, examples: list, frozen: tuple[nn.Module, ...]) -> float:
    """Model FLOPs of training on `examples` (3x the trainable forward + 1x the frozen forward), per
    sequence position processed. `trainee(examples)` returns (loss, positions processed)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _, positions = trainee(examples)
    total = counter.get_total_flops()
    per_module = counter.get_flop_counts()
    frozen_flops = 0
    for module in frozen:
        name = _counter_name(trainee, module)
        if name not in per_module:
            raise ValueError(f"the FLOP counter saw no {name}; cannot tell frozen from trainable FLOPs")
        frozen_flops += sum(per_module[name].values())
    return (frozen_flops + 3 * (total - frozen_flops)) / positions


def _counter_name(root: nn.Module, module: nn.Module) -> str:
    """FlopCounterMode's key for a submodule: the root's class name, then the dotted path."""
    for path, sub in root.named_modules():
        if sub is module:
            return f"{type(root).__name__}.{path}" if path else type(root).__name__
    raise ValueError("module is not part of the root")
