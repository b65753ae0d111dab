"""The export's rules, checked once (export/options.py) before any work: what each format offers."""

import pytest

from sphinx_edge.export.options import Delegate, ExportError, ExportFormat, ExportOptions, Format, Quant
from tests.test_cli import run


def test_defaults_and_coercion():
    options = ExportOptions(quant="int4", formats=("pte", "onnx", "pte"))
    assert options.quant is Quant.INT4 and options.formats == (Format.PTE, Format.ONNX)
    assert options.vision is Quant.INT8 and options.delegate is Delegate.XNNPACK
    assert ExportOptions(quant="fp16").vision is Quant.FP16  # onnx: the vision encoder follows, fp16 at most
    assert ExportFormat.BOTH.formats == (Format.ONNX, Format.PTE)


@pytest.mark.parametrize("kwargs, message", [
    (dict(quant="fp8"), "unknown quantization 'fp8'"),
    (dict(formats=("tflite",)), "unknown format 'tflite'"),
    (dict(formats=()), "no format to export"),
    (dict(quant="fp16", formats=("pte",)), "fp16 is not offered for pte graphs"),
    (dict(quant="int4", vision_quant="int4"), "int8 at most"),
    (dict(quant="fp32", vision_quant="fp16", formats=("pte",)), "int8 at most (pte: fp32, int8)"),
    (dict(embedding_quant="int4"), "unknown embedding quantization 'int4'"),
    (dict(delegate="coreml"), "--delegate coreml lowers the ExecuTorch program"),
    (dict(quant="int4", group_size=24), "--group-size 24"),
    (dict(quant="int4", group_size=8), "at least 16"),
])
def test_what_no_format_offers_is_refused(kwargs, message):
    with pytest.raises(ExportError, match=None) as e:
        ExportOptions(**kwargs)
    assert message in str(e.value)


def test_the_cli_refuses_before_loading_anything(tmp_path):
    code, out = run("export", "--size", "test-tiny", "--random-init", "--quant", "int4", "--group-size", "48",
                    "--out", tmp_path / "e")
    assert code == 2 and "power of two" in out and not (tmp_path / "e").exists()
    code, out = run("export", "--size", "test-tiny", "--random-init", "--quant", "fp8", "--out", tmp_path / "e")
    assert code == 2 and "fp8" in out and "int4" in out  # the choices are listed
