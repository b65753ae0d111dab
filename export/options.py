"""What an export is asked for, and the one place its rules are checked. Torch-free, so the CLI
refuses a bad combination before it loads anything.

Rules (docs/ARCHITECTURE.md, section 4): ONNX offers fp32, fp16, int8 and int4 on the LLM's linears,
the .pte fp32, int8 and int4 (XNNPACK's fp16 kernels target ARM); the vision encoder is quantized to
int8 at most (fp16 on ONNX only); the token embedding table is fp32 or int8; int4 blocks are powers
of two from 16 (onnxruntime's MatMulNBits) and divide the layers' widths (checked by the exporters);
the Core ML delegate lowers a .pte.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum


class ExportError(ValueError):
    """An export that cannot be made as asked, said before any work is done where possible."""


class Format(StrEnum):
    ONNX = "onnx"
    PTE = "pte"


class ExportFormat(StrEnum):
    """`sphinx-edge export --format`: one format, or both."""
    ONNX = "onnx"
    PTE = "pte"
    BOTH = "both"

    @property
    def formats(self) -> tuple[Format, ...]:
        return tuple(Format) if self is ExportFormat.BOTH else (Format(self.value),)


class Quant(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


# The token embedding table's quantization.
TableQuant = StrEnum("TableQuant", {"FP32": "fp32", "INT8": "int8"})
# Where the .pte's vision encoder runs: XNNPACK (CPU, any device) or Core ML (Apple devices).
Delegate = StrEnum("Delegate", {"XNNPACK": "xnnpack", "COREML": "coreml"})


QUANTS = {Format.ONNX: tuple(Quant), Format.PTE: (Quant.FP32, Quant.INT8, Quant.INT4)}
VISION_QUANTS = {Format.ONNX: (Quant.FP32, Quant.FP16, Quant.INT8), Format.PTE: (Quant.FP32, Quant.INT8)}


def _choice(kind: type[StrEnum], value: object, what: str) -> StrEnum:
    try:
        return kind(value)
    except ValueError:
        raise ExportError(f"unknown {what} {value!r}; choose {', '.join(kind)}") from None


@dataclass
class ExportOptions:
    quant: Quant = Quant.FP32
    formats: tuple[Format, ...] = (Format.ONNX,)
    vision_quant: Quant | None = None  # default: int8 for int8/int4, else `quant`
    embedding_quant: TableQuant = TableQuant.FP32
    group_size: int = 32  # int4 block / group size (onnx MatMulNBits, pte 8da4w)
    accuracy_level: int = 4  # onnxruntime MatMulNBits compute type on CPU (4: int8 dot products)
    verify: bool = True
    eval_samples: int = 0  # held-out synthetic questions to score (SPHINX-Nano)
    delegate: Delegate = Delegate.XNNPACK
    max_seq_len: int | None = None  # the export's context; None: the exporter's default

    def __post_init__(self) -> None:
        self.quant = _choice(Quant, self.quant, "quantization")
        self.formats = tuple(dict.fromkeys(_choice(Format, f, "format") for f in self.formats))
        if not self.formats:
            raise ExportError("no format to export: choose onnx, pte or both")
        if self.vision_quant is not None:
            self.vision_quant = _choice(Quant, self.vision_quant, "vision quantization")
        self.embedding_quant = _choice(TableQuant, self.embedding_quant, "embedding quantization")
        self.delegate = _choice(Delegate, self.delegate, "delegate")
        for fmt in self.formats:
            if self.quant not in QUANTS[fmt]:
                raise ExportError(f"{self.quant} is not offered for {fmt} graphs (choose {', '.join(QUANTS[fmt])})"
                                  + ("; XNNPACK's fp16 kernels target ARM: use --format onnx" if fmt == Format.PTE else ""))
            if self.vision not in VISION_QUANTS[fmt]:
                raise ExportError(f"the vision encoder is quantized to int8 at most ({fmt}: "
                                  f"{', '.join(VISION_QUANTS[fmt])}); got {self.vision}")
        if self.delegate == Delegate.COREML and Format.PTE not in self.formats:
            raise ExportError("--delegate coreml lowers the ExecuTorch program: add --format pte (or both)")
        if self.quant == Quant.INT4 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ExportError(f"--group-size {self.group_size}: int4 blocks are a power of two, at least 16")
        if self.eval_samples < 0 or (self.max_seq_len is not None and self.max_seq_len < 1):
            raise ExportError("--eval and --max-seq-len take positive numbers")

    @property
    def vision(self) -> Quant:
        """The vision encoder's quantization: int8 at most, int8 by default for int8/int4."""
        if self.vision_quant:
            return self.vision_quant
        return Quant.INT8 if self.quant in (Quant.INT8, Quant.INT4) else self.quant

    def with_context(self, max_seq_len: int) -> ExportOptions:
        return dataclasses.replace(self, max_seq_len=max_seq_len)
