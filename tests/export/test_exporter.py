"""The export directory's safety: what --overwrite may replace, atomic replacement, interrupted and
killed exports (no process left behind, staging swept), and the user's umask on what is written."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sphinx_edge.export.exporter import ExportError, ExportOptions, export_model, sweep_stale_stages
from sphinx_edge.runtime.manifest import read_manifest
from sphinx_edge.tokenizer import Tokenizer
from tests.test_cli import run


def _user_files(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    files = {"photo.jpg": b"\xff\xd8\xff not really a photo", "thesis-chapter-3.tex": b"\\chapter{Results}\n"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def test_overwrite_never_touches_a_folder_of_user_files(model_factory, tokenizer_file, tmp_path):
    files = _user_files(tmp_path / "mine")
    for overwrite in (False, True):
        with pytest.raises(ExportError) as e:
            export_model(model_factory("test-tiny"), Tokenizer(tokenizer_file), tmp_path / "mine",
                         ExportOptions(verify=False), overwrite=overwrite)
        assert "photo.jpg, thesis-chapter-3.tex" in str(e.value) and "--overwrite" not in str(e.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left either


def test_the_cli_refuses_user_files_without_suggesting_overwrite(tokenizer_file, tmp_path):
    files = _user_files(tmp_path / "mine")
    code, out = run("export", "--size", "test-tiny", "--random-init", "--quant", "fp32", "--tokenizer", tokenizer_file,
                    "--out", tmp_path / "mine", "--overwrite", "--no-verify")
    assert code == 2 and "photo.jpg" in out and "--overwrite" not in out.replace("export", "")
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == files


def test_an_export_with_extra_user_files_is_not_replaced(onnx_export, model_factory, tokenizer_file, tmp_path):
    import shutil

    _, out, _ = onnx_export
    copy = tmp_path / "e"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"an export and files it did not write \(notes.txt\)"):
        export_model(model_factory("test-tiny"), Tokenizer(tokenizer_file), copy, ExportOptions(verify=False),
                     overwrite=True)
    assert (copy / "notes.txt").read_text() == "mine" and read_manifest(copy)["model"]["name"] == "test-tiny"


def test_overwrite_replaces_a_previous_export_and_the_old_one_stays_until_then(model_factory, tokenizer_file,
                                                                               tmp_path):
    tok = Tokenizer(tokenizer_file)
    target = tmp_path / "e"
    export_model(model_factory("test-tiny"), tok, target, ExportOptions(verify=False))
    with pytest.raises(ExportError, match="already holds an export of 'test-tiny'.*--overwrite"):
        export_model(model_factory("test-intern2"), tok, target, ExportOptions(verify=False))
    seen = []

    def look(stage: str) -> None:  # during the new export, the old one is still whole and readable
        seen.append(read_manifest(target)["model"]["name"])

    manifest = export_model(model_factory("test-intern2"), tok, target, ExportOptions(verify=False), overwrite=True,
                            on_stage=look)
    assert seen and set(seen) == {"test-tiny"}
    assert read_manifest(target)["model"]["name"] == manifest["model"]["name"] == "test-intern2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_an_interrupted_overwrite_keeps_the_old_export(model_factory, tokenizer_file, tmp_path):
    tok = Tokenizer(tokenizer_file)
    export_model(model_factory("test-tiny"), tok, tmp_path / "e", ExportOptions(verify=False))
    before = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}

    def interrupt(stage: str) -> None:
        if stage == "onnx graphs: decoder":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(model_factory("test-intern2"), tok, tmp_path / "e", ExportOptions(verify=False), overwrite=True,
                     on_stage=interrupt)
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_an_interrupted_export_leaves_nothing_that_looks_finished(model_factory, tokenizer_file, tmp_path):
    def interrupt(stage: str) -> None:
        if stage == "onnx graphs: decoder":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(model_factory("test-tiny"), Tokenizer(tokenizer_file), tmp_path / "e",
                     ExportOptions(verify=False), on_stage=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_stale_staging_folders_of_dead_processes_are_swept(tmp_path):
    """Only folders marked as ours, and only when their process is gone, whatever target they were for."""
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / ".e.x1y2.partial"
    other_target = tmp_path / ".f.a1b2.partial"
    live = tmp_path / ".e.c3d4.partial"  # an export running right now
    unmarked = tmp_path / ".someone-elses.partial"
    for d, pid in ((stale, dead), (other_target, dead), (live, os.getpid()), (unmarked, None)):
        d.mkdir()
        if pid is not None:
            (d / ".sphinx-edge-staging").write_text(str(pid))
    assert sorted(sweep_stale_stages(tmp_path)) == sorted([stale, other_target])
    assert live.exists() and unmarked.exists()


def test_artifacts_follow_the_users_umask(model_factory, tokenizer_file, tmp_path):
    old = os.umask(0o022)
    try:
        export_model(model_factory("test-tiny"), Tokenizer(tokenizer_file), tmp_path / "e",
                     ExportOptions(quant="int4", formats=("onnx", "pte"), verify=False))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "e").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "e").iterdir()}
    assert set(modes.values()) == {0o644}, modes


# --- killed exports: no process left behind -------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat_file.parent.name))
    return kids


def _stage_processes(pid: int) -> list[int]:
    """The children of `pid` that are spawned stage processes (multiprocessing's spawn_main)."""
    return [c for c in _children(pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead process its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _export_until_its_stage_runs(tokenizer_file: str, out: Path) -> tuple[subprocess.Popen, int]:
    """Starts a CLI export whose ONNX stage runs in a child process (as a large model's does: test-tiny
    is made to count as one); returns once that child is up."""
    cli = ("from sphinx_edge.export import exporter; exporter.OWN_PROCESS_BYTES = 0; "
           "from sphinx_edge.cli import app; app()")
    proc = subprocess.Popen([sys.executable, "-c", cli, "export", "--size", "test-tiny", "--random-init",
                             "--quant", "fp32", "--format", "both", "--tokenizer", tokenizer_file, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stages = _stage_processes(proc.pid) if proc.poll() is None else []
        if stages and any(out.parent.glob(f".{out.name}.*.partial")):
            time.sleep(1.0)  # well inside the stage
            return proc, stages[0]
        if proc.poll() is not None:
            pytest.fail(f"the export ended before its stage ran: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the export's stage process never started")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(sig, tokenizer_file, tmp_path):
    proc, stage_pid = _export_until_its_stage_runs(tokenizer_file, tmp_path / "e")
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 128 + sig
    assert _gone_within(stage_pid, 5), "the stage process outlived the export"
    assert list(tmp_path.iterdir()) == [], "the staging folder was left behind"


def test_sigkill_leaves_no_process_and_the_next_export_sweeps_the_stage(tokenizer_file, tmp_path):
    proc, stage_pid = _export_until_its_stage_runs(tokenizer_file, tmp_path / "e")
    proc.kill()  # what the OOM killer does: no clean-up code runs
    proc.wait(timeout=30)
    assert _gone_within(stage_pid, 5), "the stage process outlived the export"
    left = list(tmp_path.glob(".e.*.partial"))
    assert left, "SIGKILL runs no clean-up: the staging folder is still there"
    code, out = run("export", "--size", "test-tiny", "--random-init", "--quant", "fp32", "--tokenizer", tokenizer_file,
                    "--out", tmp_path / "other", "--no-verify")
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


@pytest.mark.parametrize("kind", ["random", "checkpoint"])
def test_the_exporting_process_stays_free_of_torch_while_stages_run(kind, model_factory, tokenizer_file, tmp_path):
    """A large model's stages run in processes of their own; the process that starts them never imports
    torch (its ~250 MiB would add to every stage's peak), whether the weights are random or a checkpoint's."""
    from sphinx_edge.checkpoints.native import save_native
    from tests.conftest import run_torch_free

    source = "ModelSource('test-tiny', seed=3)"
    if kind == "checkpoint":
        save_native(model_factory("test-tiny", seed=3), tmp_path / "ckpt", tokenizer=tokenizer_file)
        source = f"ModelSource(None, checkpoint={str(tmp_path / 'ckpt')!r})"
    done = run_torch_free(f"""
        from sphinx_edge.export import exporter
        from sphinx_edge.export.exporter import ExportOptions, export_model
        from sphinx_edge.export.source import ModelSource
        from sphinx_edge.tokenizer import Tokenizer
        exporter.OWN_PROCESS_BYTES = 0  # test-tiny counts as large
        manifest = export_model({source}, Tokenizer({tokenizer_file!r}), {str(tmp_path / 'e')!r},
                                ExportOptions(quant="int8", formats=("onnx",), verify=False))
        print(manifest["model"]["name"], sorted(manifest["files"]))
    """, timeout=600)  # a spawned export: slow beside other tests on 2 cores
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("test-tiny") and "decoder.onnx" in done.stdout


# --- a small model's two formats side by side ------------------------------------------------------


def test_side_by_side_stage_records_count_both_processes():
    from sphinx_edge.export.stages import StageLog, StageRecord

    log = StageLog()
    log.records = [StageRecord("before", 1.0, 300.0), StageRecord("pte lower", 9.0, 500.0),
                   StageRecord("pte write", 2.0, 450.0)]
    log.merge_side_by_side(1, [StageRecord("onnx graphs", 4.0, 400.0), StageRecord("onnx quantize", 1.0, 350.0)])
    assert [(r.name, r.peak_rss_mib) for r in log.records] == [
        ("before", 300.0), ("onnx graphs", 900.0), ("onnx quantize", 850.0), ("pte lower", 900.0), ("pte write", 850.0)]


def test_a_failing_pte_stage_stops_the_onnx_process_beside_it(tokenizer_file, tmp_path, monkeypatch):
    from sphinx_edge.export import exporter
    from sphinx_edge.export.options import Format

    def failing(*args):
        time.sleep(1.0)  # the ONNX process is starting
        raise RuntimeError("lowering failed")

    monkeypatch.setitem(exporter.STAGES, Format.PTE, failing)
    with pytest.raises(RuntimeError, match="lowering failed"):
        export_model(exporter.ModelSource("test-tiny"), Tokenizer(tokenizer_file), tmp_path / "e",
                     ExportOptions(formats=("onnx", "pte"), verify=False))
    assert [c for c in _stage_processes(os.getpid()) if _running(c)] == [], "the ONNX process outlived the export"
    assert list(tmp_path.iterdir()) == []


def test_a_model_the_caller_holds_is_left_as_it_was(model_factory, tokenizer_file, tmp_path):
    """The ONNX vision graph rewrites its model (layer scales folded, MLPs chunked, downsamplings as
    matmuls); a model passed in is exported from a copy, never modified."""
    import torch

    from sphinx_edge.model.convnext import Block

    model = model_factory("test-tiny")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    export_model(model, Tokenizer(tokenizer_file), tmp_path / "out", ExportOptions(verify=False))
    assert [type(m) for m in model.modules()] == kinds
    assert all(b.gamma is not None for b in model.modules() if isinstance(b, Block))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
