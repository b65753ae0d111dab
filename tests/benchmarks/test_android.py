"""`sphinx-edge bench --target android` end to end against a stand-in for adb whose "phone" is this
machine: the host writes the requests, pushes the C++ runner, the program and the requests, runs the
runner over `adb shell` and parses what it prints. Only the device is simulated; the runner, its
output and the parsing are the real ones."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import missing_tool
from sphinx_edge.bundled import SAMPLES
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[2]

FAKE_ADB = textwrap.dedent('''\
    #!{python}
    """adb stand-in: the device's / is {root}."""
    import shutil, subprocess, sys
    from pathlib import Path
    root, args = Path({root!r}), sys.argv[1:]
    if args == ["devices"]:
        print("List of devices attached\\nfake-0\\tdevice")
    elif args[0] == "push":
        target = root / args[2].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args[1], target)
    elif args[0] == "shell":
        command = args[1]
        if command.startswith("getprop"):
            print({{"ro.product.model": "FakePhone", "ro.build.version.release": "15"}}.get(command.split()[1], ""))
            sys.exit(0)
        command = command.replace("/data/local/tmp", str(root / "data/local/tmp"))
        sys.exit(subprocess.run(["bash", "-c", command]).returncode)
    else:
        sys.exit(f"fake adb: unsupported {{args}}")
    ''')


@pytest.fixture(scope="module")
def native_runner_dir(tmp_path_factory) -> Path:
    for tool in ("cmake", "g++"):
        if shutil.which(tool) is None:
            missing_tool(f"the C++ runner needs {tool}: run runtime/cpp/install-deps.sh")
    proc = subprocess.run(["bash", str(ROOT / "runtime/cpp/build.sh")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runner_dir = tmp_path_factory.mktemp("runner")
    shutil.copy(proc.stdout.strip().splitlines()[-1], runner_dir / "sphinx_runner")
    return runner_dir


@pytest.fixture
def fake_adb(tmp_path, monkeypatch) -> Path:
    bin_dir, root = tmp_path / "bin", tmp_path / "phone"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable, root=str(root)))
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return root


def test_android_target_runs_the_runner_over_adb(nano_int4_pte, native_runner_dir, fake_adb, tmp_path):
    out = tmp_path / "android.json"
    code, text = run("bench", nano_int4_pte, "--target", "android", "--runner-dir", native_runner_dir,
                     "--image", SAMPLES / "wide_2x1.png", "--skip-tokens", "both", "--warmup", "0", "--repeats", "2",
                     "--decode-tokens", "5", "--json", out)
    assert code == 0, text
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"].startswith("FakePhone") and result["machine"]["os"] == "Android 15"
    (case,) = result["cases"]
    assert case["backend"] == "pte (android)" and case["quant"] == "int4"
    rows = {r["layout"]: r for r in case["images"]}
    assert (rows["sphinx-x"]["views"], rows["sphinx-1k"]["views"]) == (3, 5)  # skip tokens: 2 tiles never encoded
    assert rows["sphinx-x"]["image_tokens"] < rows["sphinx-1k"]["image_tokens"]
    for row in rows.values():
        assert row["decode_tokens"] == 4  # 5 tokens, EOS ignored: the first comes from the prefill
        assert row["stages"]["ttft"]["n"] == 2 and row["stages"]["ttft"]["median"] > 0
    assert (fake_adb / "data/local/tmp/sphinx-edge/sphinx_runner").is_file()
    assert {s["backend"] for s in result["skipped"]} == {"torch", "onnx"}  # host-only backends, said so
    assert "on host" in text and "pte (android)" in text


def test_android_target_without_a_runner_build_says_how(nano_int4_pte, fake_adb, tmp_path):
    code, text = run("bench", nano_int4_pte, "--target", "android", "--runner-dir", tmp_path / "nothing")
    assert code != 0 and "NDK" in text
