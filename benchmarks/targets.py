"""Where `sphinx-edge bench` runs: a table of targets behind one small protocol.

A target says whether it can run here (and what is missing when not), how many cases a spec makes
on it (for the progress bar), and runs them, returning the result `benchmarks.report` renders.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Protocol

from sphinx_edge.benchmarks.bench import BenchSpec, _settings, run_matrix
from sphinx_edge.errors import UserError
from sphinx_edge.runtime.manifest import read_manifest

DEFAULT_ANDROID_RUNNER = Path("build/cpp-android")  # runtime/cpp/README.md: the NDK build
OnCase = Callable[[str], None] | None


class TargetUnavailable(UserError, RuntimeError):
    """The chosen target's hardware or tools are not here."""


class Target(Protocol):
    name: str

    def check(self, spec: BenchSpec) -> None:
        """Raises TargetUnavailable saying what is missing; returns when the target can run here."""

    def count_cases(self, spec: BenchSpec, manifests: list[dict]) -> int: ...

    def run(self, spec: BenchSpec, on_case: OnCase = None) -> dict: ...


class Local:
    """This machine: every export in every requested format, each case in its own process."""
    name = "local"

    def check(self, spec: BenchSpec) -> None:
        pass

    def count_cases(self, spec: BenchSpec, manifests: list[dict]) -> int:
        return sum(b == "torch" or b in m["graphs"] for m in manifests for b in spec.backends)

    def run(self, spec: BenchSpec, on_case: OnCase = None) -> dict:
        return run_matrix(spec, on_case)


class Apple(Local):
    """A Mac with Apple silicon: the same matrix, run there (the Core ML delegate runs only there)."""
    name = "apple"

    def check(self, spec: BenchSpec) -> None:
        if sys.platform != "darwin" or platform.machine() != "arm64":
            raise TargetUnavailable("--target apple runs on a Mac with Apple silicon; this machine is "
                                    f"{platform.system()} {platform.machine()}. Run the same command there.")


class Android:
    """The attached phone: every export's ExecuTorch program through the C++ runner over adb
    (benchmarks/android.py); the runner picks its own default thread count and reports it."""
    name = "android"

    def check(self, spec: BenchSpec) -> None:
        from sphinx_edge.benchmarks.android import AndroidError, runner_files

        adb = shutil.which("adb")
        if adb is None:
            raise TargetUnavailable("--target android needs adb on PATH and a device attached (USB debugging on); "
                                    "adb was not found")
        out = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=30).stdout
        if not [line for line in out.splitlines()[1:] if line.strip().endswith("device")]:
            raise TargetUnavailable("--target android: adb sees no device; connect one and allow USB debugging")
        try:
            runner_files(spec.runner_dir or DEFAULT_ANDROID_RUNNER)
        except AndroidError as e:
            raise TargetUnavailable(str(e)) from None

    def count_cases(self, spec: BenchSpec, manifests: list[dict]) -> int:
        return sum("pte" in m["graphs"] for m in manifests)

    def run(self, spec: BenchSpec, on_case: OnCase = None) -> dict:
        from sphinx_edge.benchmarks.android import Adb, AndroidError, push_runner, run_android_case

        adb, cases, skipped = Adb(), [], []
        push_runner(adb, spec.runner_dir or DEFAULT_ANDROID_RUNNER)
        for export_dir in spec.export_dirs:
            if "pte" not in read_manifest(export_dir)["graphs"]:
                skipped.append({"export_dir": str(export_dir), "backend": "pte (android)",
                                "why": "the export has no pte program (export with --format pte or both)"})
                continue
            if on_case:
                on_case(f"pte on the phone ({export_dir.name})")
            try:
                cases.append(run_android_case(adb, export_dir, spec.images, spec.layouts, spec.prompt,
                                              spec.decode_tokens, spec.warmup, spec.repeats, spec.threads))
            except AndroidError as e:
                skipped.append({"export_dir": str(export_dir), "backend": "pte (android)", "why": str(e)})
        for backend in sorted(set(spec.backends) - {"pte"}):
            skipped.append({"export_dir": "-", "backend": backend, "why": "runs on this host only, not with --target android"})
        return {"date": date.today().isoformat(), "machine": adb.describe(), "bandwidth_gb_s": None,
                "threads": spec.threads, "settings": _settings(spec), "cases": cases, "peers": [], "skipped": skipped}


TARGETS: dict[str, Target] = {t.name: t for t in (Local(), Android(), Apple())}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetUnavailable(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None
