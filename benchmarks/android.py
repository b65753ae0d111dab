"""`sphinx-edge bench --target android`: the C++ runner (runtime/cpp) on a phone, over adb.

For each export with an ExecuTorch program, each image and each layout, the host writes a request
file (`runtime/request.py`: preprocessing and tokenization happen here, so the phone needs only
ExecuTorch), pushes the program, the runner, its shared libraries and the requests to
DEVICE_DIR, runs `sphinx_runner` warm-up + repeat times and parses what it prints
(`device_output.parse_runner_output`). Results have the shape of `case.run_case`'s, so the same
tables and chart show them; there is no preprocess stage (it ran on the host) and no LLM-alone rows.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from sphinx_edge.benchmarks.device_output import RunnerOutputError, parse_runner_output
from sphinx_edge.benchmarks.stages import summary
from sphinx_edge.errors import UserError
from sphinx_edge.runtime.manifest import graph_files, read_manifest
from sphinx_edge.runtime.request import write_request

DEVICE_DIR = "/data/local/tmp/sphinx-edge"
RUNNER = "sphinx_runner"
STAGES = ("vision", "vision_per_view", "prefill", "prefill_tok_s", "ttft", "decode_tok_s", "e2e")


class AndroidError(UserError, RuntimeError):
    """adb, the device or the runner failed; the message says which and how."""


class Adb:
    """The one attached device (or $ANDROID_SERIAL's, which adb itself honours)."""

    def __init__(self, adb: str | None = None) -> None:
        self.adb = adb or shutil.which("adb")
        if self.adb is None:
            raise AndroidError("adb was not found on PATH (Android platform-tools)")

    def _run(self, *args: str, timeout: float = 600) -> str:
        proc = subprocess.run([self.adb, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AndroidError(f"adb {' '.join(args[:2])} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc.stdout

    def devices(self) -> list[str]:
        lines = self._run("devices").splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip().endswith("device")]

    def describe(self) -> dict:
        """The phone, in the keys of `system.describe` (SoC, cores, memory, Android version)."""
        prop = lambda name: self.shell(f"getprop {name}").strip()  # noqa: E731
        cores = self.shell("grep -c ^processor /proc/cpuinfo").strip()
        mem_kb = self.shell("grep MemTotal /proc/meminfo").split()[1:2]
        return {"cpu": f"{prop('ro.product.model')} ({prop('ro.soc.model') or prop('ro.board.platform')})",
                "cores": int(cores) if cores.isdigit() else None,
                "memory_gib": round(int(mem_kb[0]) / 2**20, 1) if mem_kb and mem_kb[0].isdigit() else None,
                "os": f"Android {prop('ro.build.version.release')}"}

    def push(self, local: Path, remote: str) -> None:
        self._run("push", str(local), remote)

    def shell(self, command: str, timeout: float = 600) -> str:
        """Runs `command` on the device; returns stdout and stderr together (the runner's errors go to stderr)."""
        proc = subprocess.run([self.adb, "shell", command + " 2>&1"], capture_output=True, text=True, timeout=timeout)
        return proc.stdout + proc.stderr


def runner_files(runner_dir: Path) -> tuple[Path, list[Path]]:
    """The runner binary and the shared libraries beside it (none for a static build)."""
    binary = runner_dir / RUNNER
    if not binary.is_file():
        raise AndroidError(f"no {RUNNER} in {runner_dir}: build it for Android with the NDK first "
                           "(runtime/cpp/README.md, section Android), or pass --runner-dir")
    return binary, sorted(runner_dir.glob("*.so"))


def push_runner(adb: Adb, runner_dir: Path) -> None:
    binary, libs = runner_files(runner_dir)
    adb.shell(f"mkdir -p {DEVICE_DIR}/lib")
    adb.push(binary, f"{DEVICE_DIR}/{RUNNER}")
    for lib in libs:
        adb.push(lib, f"{DEVICE_DIR}/lib/{lib.name}")
    adb.shell(f"chmod 755 {DEVICE_DIR}/{RUNNER}")


def run_android_case(adb: Adb, export_dir: Path, images: list[Path], layouts: list[str | None], prompt: str,
                     decode_tokens: int, warmup: int, repeats: int, threads: int | None) -> dict:
    """One export's program on the device: a row per (image, layout), medians over `repeats`."""
    manifest = read_manifest(export_dir)
    program = export_dir / graph_files(manifest, "pte")["program"][0]
    remote_program = f"{DEVICE_DIR}/{export_dir.name}.pte"
    adb.push(program, remote_program)
    rows, peak, load = [], 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, image in enumerate(images):
            for layout in layouts:
                request = Path(tmp) / f"request-{i}-{layout or 'model'}.bin"
                written = write_request(export_dir, image, prompt, request, max_new_tokens=max(decode_tokens, 1),
                                        layout=layout)
                remote_request = f"{DEVICE_DIR}/{request.name}"
                adb.push(request, remote_request)
                command = (f"cd {DEVICE_DIR} && LD_LIBRARY_PATH={DEVICE_DIR}/lib ./{RUNNER} "
                           f"{shlex.quote(remote_program)} {shlex.quote(remote_request)} --ignore-eos "
                           f"--max-new-tokens {max(decode_tokens, 1)}" + (f" --threads {threads}" if threads else ""))
                runs = []
                for _ in range(warmup + repeats):
                    try:
                        runs.append(parse_runner_output(adb.shell(command)))
                    except RunnerOutputError as e:
                        raise AndroidError(f"{RUNNER} on the device, {image.name}: {e}") from None
                runs = runs[warmup:]
                peak = max(peak, *(r["peak_rss_mib"] for r in runs))
                load += [r["load_s"] for r in runs]
                first = runs[0]
                rows.append({"image": str(image), "layout": layout or manifest["layout"], "views": first["views"],
                             "image_tokens": written["image_tokens"],
                             "prompt_tokens": first["prompt_tokens"], "decode_tokens": first["decode_tokens"],
                             "stages": {k: summary([r["stages"][k] for r in runs]) for k in STAGES}})
    return {"export_dir": str(export_dir), "backend": "pte (android)", "model": manifest["model"]["name"],
            "quant": manifest["quantization"]["quant"], "vision_quant": manifest["quantization"]["vision"],
            "group_size": manifest["quantization"].get("group_size"),
            "artifact_bytes": manifest["files"][program.name]["bytes"],
            "load_s": summary(load)["median"], "images": rows, "llm": None, "peak_rss_mib": peak}
