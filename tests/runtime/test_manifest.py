"""The manifest reader on hostile input (hypothesis): it returns a manifest whose every file is a plain
name inside the export directory, or raises ManifestError; nothing else."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphinx_edge.runtime.manifest import ManifestError, check_files, read_manifest

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                    max_leaves=20)
NAMES = st.one_of(st.text(max_size=30), st.sampled_from(["../x", "/etc/passwd", "a/b", "..", ".", "", "ok.onnx",
                                                         "manifest.json", "a\\b", "x\0y"]))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid() -> dict:
    return {"format_version": 1, "model": {"name": "m", "config": {}}, "tokenizer": "tokenizer.model",
            "files": {"tokenizer.model": {"bytes": 3, "sha256": "0" * 64}, "decoder.onnx": {"bytes": 1, "sha256": "a" * 64}},
            "graphs": {"onnx": {"decoder": {"files": ["decoder.onnx"]}}}}


def _read(tmp: Path, manifest) -> dict | None:
    (tmp / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    try:
        return read_manifest(tmp)
    except ManifestError:
        return None


def _confined(manifest: dict) -> None:
    for name in manifest["files"]:
        assert isinstance(name, str) and name and os.path.basename(name) == name and name not in (".", "..")
        assert not os.path.isabs(name) and "\\" not in name and "\0" not in name


@SETTINGS
@given(anything=JSON)
def test_arbitrary_json_is_read_or_refused(tmp_path, anything):
    got = _read(tmp_path, anything)
    if got is not None:
        _confined(got)


@SETTINGS
@given(section=st.sampled_from(["files", "graphs", "model", "tokenizer"]), value=JSON)
def test_a_valid_manifest_with_one_section_replaced(tmp_path, section, value):
    manifest = _valid()
    manifest[section] = value
    got = _read(tmp_path, manifest)
    if got is not None:
        _confined(got)


@SETTINGS
@given(name=NAMES, entry=JSON)
def test_file_entries_are_confined_and_complete(tmp_path, name, entry):
    manifest = _valid()
    manifest["files"][name] = entry
    got = _read(tmp_path, manifest)
    if got is not None:
        _confined(got)
        e = got["files"][name]
        assert isinstance(e["bytes"], int) and e["bytes"] >= 0 and len(e["sha256"]) == 64
        try:  # checking the files never looks outside the directory: a missing file is a ManifestError
            check_files(tmp_path, got, [name])
        except ManifestError:
            pass


def test_the_valid_manifest_is_read(tmp_path):
    assert _read(tmp_path, _valid()) is not None
