"""The CLI's one error path: every expected failure is one line naming the file or argument, exit
code 2, no traceback; a bug is one line and exit code 1; --debug shows the traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sphinx_edge.bundled import SAMPLES
from sphinx_edge.cli import app
from sphinx_edge.runtime.manifest import ManifestError
from tests.test_cli import run

SCRIPT = Path(sys.executable).with_name("sphinx-edge")


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and 'File "' not in out, out


def test_a_manifest_entry_without_size_or_hash_is_refused(onnx_export, tmp_path):
    _, out_dir, _ = onnx_export
    copy = tmp_path / "e"
    shutil.copytree(out_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["decoder.onnx"]["sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out = run("run", copy, "hi")
    assert code == 2 and "decoder.onnx" in out and "'sha256'" in out
    _no_traceback(out)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "sub/dir.onnx", "..", ""])
def test_manifest_file_names_stay_inside_the_export(onnx_export, tmp_path, name):
    _, out_dir, _ = onnx_export
    copy = tmp_path / "e"
    shutil.copytree(out_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = manifest["files"].pop("tokenizer.model")
    manifest["tokenizer"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, out = run("run", copy, "hi")
    assert code == 2 and "not a file name inside the export directory" in out
    _no_traceback(out)


def test_prompts_that_are_not_valid_utf8_are_refused(onnx_export, tmp_path):
    _, out_dir, _ = onnx_export
    code, out = run("run", out_dir, "caf\udce9 ?")  # how Python passes the byte 0xE9 of argv
    assert code == 2 and "the question is not valid UTF-8" in out
    code, out = run("chat", out_dir, "caf\udce9 ?")
    assert code == 2 and "not valid UTF-8" in out
    # Really through argv: undecodable bytes reach Python as lone surrogates.
    proc = subprocess.run([str(SCRIPT), "request", str(out_dir), b"caf\xe9 ?", "--out", str(tmp_path / "r")],
                          capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8", "COLUMNS": "200"})
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "the question is not valid UTF-8" in err and not (tmp_path / "r").exists()
    _no_traceback(err)


def test_chat_refuses_an_undecodable_line_and_goes_on(onnx_export):
    _, out_dir, _ = onnx_export
    result = CliRunner().invoke(app, ["chat", str(out_dir), "--max-new-tokens", "2"],
                                input=b"caf\xe9 \xff?\nWhat is it?\n", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "that line is not valid UTF-8" in result.output
    assert result.output.count("tokens in context") == 1
    _no_traceback(result.output)


def test_empty_prompts_are_refused(onnx_export):
    _, out_dir, _ = onnx_export
    code, out = run("run", out_dir, "  ")
    assert code == 2 and "the question is empty" in out
    code, out = run("chat", out_dir, "")
    assert code == 2 and "the question is empty" in out


@pytest.mark.parametrize("out_dir", ["/proc/sphinx-edge-test/e", "FILE/e"])
def test_an_export_into_a_place_that_cannot_be_written_is_one_line(tokenizer_file, tmp_path, out_dir):
    (tmp_path / "FILE").write_text("a file, not a directory")
    target = out_dir.replace("FILE", str(tmp_path / "FILE"))
    code, out = run("export", "--size", "test-tiny", "--random-init", "--tokenizer", tokenizer_file, "--no-verify",
                    "--out", target)
    assert code == 2 and "error:" in out and (str(Path(target).parent) in out or target in out), out
    _no_traceback(out)


def test_checkpoint_problems_are_named_for_what_they_are(tmp_path):
    code, out = run("export", "--size", "test-tiny", "--checkpoint", tmp_path / "nowhere", "--out", tmp_path / "e")
    assert code == 2 and "does not exist" in out and "tokenizer" not in out
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    code, out = run("chat", "hi", "--checkpoint", tmp_path / "broken")
    assert code == 2 and "config.json is not valid JSON" in out and "Hugging Face" not in out


@pytest.mark.parametrize("value", ["0", "-3"])
def test_thread_counts_below_one_are_refused(onnx_export, value):
    _, out_dir, _ = onnx_export
    for command in (["run", out_dir, "hi"], ["chat", out_dir, "hi"], ["bench", out_dir]):
        code, out = run(*command, "--threads", value)
        assert code == 2 and "--threads" in out and "greater than or equal to 1" in out, out


def test_a_bug_is_one_line_with_exit_code_1_and_debug_shows_the_traceback(monkeypatch):
    import sphinx_edge.cli as cli

    def broken(size):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "get_config", broken)
    code, out = run("info", "--size", "tiny")
    assert code == 1 and "internal error (RuntimeError: boom)" in out and "--debug" in out
    _no_traceback(out)
    result = CliRunner().invoke(app, ["--debug", "info", "--size", "tiny"])
    assert isinstance(result.exception, RuntimeError)  # raised through: Python prints the traceback
    code, out = run("info", "--size", "tiny")  # --debug does not stick to later invocations
    assert code == 1


def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path):
    result = CliRunner().invoke(app, ["--debug", "run", str(tmp_path / "nowhere"), "hi"])
    assert isinstance(result.exception, ManifestError)
    proc = subprocess.run([str(SCRIPT), "--debug", "run", str(tmp_path / "nowhere"), "hi"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_tiles_reads_only_the_header_and_reports_bad_files_per_row(tmp_path):
    """A 144-megapixel PNG of 140 kB: tiles must not decode it (nor fail the other rows)."""
    from tests.odd_images import png_bomb

    (tmp_path / "huge.png").write_bytes(png_bomb(12000))  # 144 MP, below Pillow's refusal limit
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    script = ("import resource, sys; from typer.testing import CliRunner; from sphinx_edge.cli import app; "
              "r = CliRunner().invoke(app, sys.argv[1:]); print(r.output); "
              "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(r.exit_code)")

    def tiles(*images) -> tuple[int, str, int]:
        proc = subprocess.run([sys.executable, "-c", script, "tiles", *map(str, images)], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"})
        return proc.returncode, proc.stdout, int(proc.stdout.split("MAXRSS")[1])

    code, out, rss = tiles(tmp_path / "huge.png", tmp_path / "broken.png", SAMPLES / "wide_2x1.png")
    assert code == 2 and "12000x12000" in out and "800x400" in out and "unreadable" in out and "broken.png" in out
    _, _, baseline = tiles(SAMPLES / "wide_2x1.png")
    assert rss - baseline < 50_000, f"tiles decoded the image: {rss - baseline} kB more peak RSS"
