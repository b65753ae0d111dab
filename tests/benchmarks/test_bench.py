"""The benchmark: the matrix runs every case in its own process and reports what it measured."""

import json
from pathlib import Path

import numpy as np
import pytest

from sphinx_edge.benchmarks import bench, targets
from sphinx_edge.benchmarks.bench import BenchError, BenchSpec, decode_weight_bytes, run_matrix
from sphinx_edge.benchmarks.targets import TargetUnavailable, get_target
from sphinx_edge.benchmarks.report import markdown, save_chart, save_json
from sphinx_edge.benchmarks.stages import time_llm
from sphinx_edge.benchmarks.torch_backend import TorchBackend
from sphinx_edge.bundled import SAMPLES
from sphinx_edge.config import get_config
from sphinx_edge.runtime.pipeline import Pipeline

WIDE, SQUARE = SAMPLES / "wide_2x1.png", SAMPLES / "square.png"


@pytest.fixture(scope="module")
def result(onnx_export, pte_export):
    spec = BenchSpec([onnx_export[1], pte_export[1]], ["torch", "onnx", "pte"], [SQUARE, WIDE], [None, "sphinx-1k"],
                     decode_tokens=3, pp=16, tg=4, warmup=0, repeats=2, bandwidth=False)
    seen = []
    out = run_matrix(spec, seen.append)
    out["progress"] = seen
    return out


def test_matrix_runs_each_backend_once_where_the_export_has_it(result, onnx_export, pte_export):
    cases = {(c["backend"], c["export_dir"]) for c in result["cases"]}
    # torch once for the one source model; onnx only where exported, pte likewise
    assert cases == {("torch", str(onnx_export[1])), ("onnx", str(onnx_export[1])), ("pte", str(pte_export[1]))}
    assert {(s["backend"], s["export_dir"]) for s in result["skipped"]} == {
        ("pte", str(onnx_export[1])), ("onnx", str(pte_export[1]))}
    assert len(result["progress"]) == 3
    json.dumps(result)


def test_stages_are_measured_and_skip_tokens_shrink_the_work(result):
    for case in result["cases"]:
        assert case["peak_rss_mib"] > 50 and case["artifact_bytes"] > 0 and case["load_s"] > 0
        rows = {(r["image"], r["layout"]): r for r in case["images"]}
        assert len(rows) == 4
        for row in rows.values():
            s = row["stages"]
            assert all(s[k]["n"] == 2 and s[k]["min"] <= s[k]["median"] <= s[k]["max"] for k in s)
            assert s["ttft"]["median"] == pytest.approx(
                s["preprocess"]["median"] + s["vision"]["median"] + s["prefill"]["median"], rel=0.5)
            assert s["decode_tok_s"]["median"] > 0 and row["decode_tokens"] == 3
        wide_skip, wide_all = rows[(str(WIDE), "sphinx-x")], rows[(str(WIDE), "sphinx-1k")]
        assert (wide_skip["views"], wide_all["views"]) == (3, 5)
        assert wide_skip["image_tokens"] < wide_all["image_tokens"]
        sq_skip, sq_all = rows[(str(SQUARE), "sphinx-x")], rows[(str(SQUARE), "sphinx-1k")]
        assert sq_skip["views"] == sq_all["views"] == 5
        assert case["llm"]["pp_tokens"] == 16 and case["llm"]["tg_tokens"] == 4


def test_report_tables_json_and_chart(result, tmp_path):
    text = markdown(result)
    assert text.count("| wide_2x1.png | sphinx-") == 6  # stage rows: 3 cases x 2 layouts
    assert text.count("pp16:") == 3 and text.count("tg4:") == 3
    skip_rows = text.split("TTFT skip tokens ms")[1]
    assert skip_rows.count("| wide_2x1.png |") == 3 and skip_rows.count("| square.png |") == 3
    assert "not run: pte on" in text
    memory = text.split("peak / artifacts |")[1]
    rows = memory.split("\n\n")[0].splitlines()[2:]
    assert len(rows) == 3 and sum(r.endswith("x |") for r in rows) == 2  # one row per case; torch has no ratio
    for case in result["cases"]:  # each stage's peak is its own, none above the whole case's
        peaks = case["stage_peak_rss_mib"]
        assert set(peaks) == {"load", "vision", "prefill", "decode", "llm alone"}
        assert all(0 < v <= case["peak_rss_mib"] for v in peaks.values())
    save_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["cases"] == result["cases"]
    save_chart(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_torch_backend_matches_onnx(onnx_export):
    model, out, _ = onnx_export
    onnx, ref = Pipeline(out), Pipeline(out, TorchBackend(model))
    ids = onnx.tokenizer.encode("What is in the image?", bos=True)
    a = onnx.prefill(ids, onnx.encode_image(WIDE)[0])
    b = ref.prefill(ids, ref.encode_image(WIDE)[0])
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert time_llm(ref, pp=8, tg=2, warmup=0, repeats=1)["tg_tokens"] == 2


def test_decode_weight_bytes_counts_the_llm_linears(model_factory):
    from torch import nn

    model = model_factory("test-tiny")
    linear = sum(m.weight.numel() for m in model.llm.modules() if isinstance(m, nn.Linear))
    cfg = get_config("test-tiny")
    assert decode_weight_bytes(cfg, "fp32") == 4 * linear
    assert decode_weight_bytes(cfg, "int8") == linear
    assert decode_weight_bytes(cfg, "int4", 32) == pytest.approx(linear * (0.5 + 4 / 32))


def test_targets_without_their_hardware_say_so(monkeypatch):
    spec = BenchSpec([], ["onnx"], [SQUARE], [None])
    get_target("local").check(spec)
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    with pytest.raises(TargetUnavailable, match="adb was not found"):
        get_target("android").check(spec)
    monkeypatch.setattr(targets.sys, "platform", "linux")
    with pytest.raises(TargetUnavailable, match="Apple silicon"):
        get_target("apple").check(spec)
    with pytest.raises(TargetUnavailable, match="unknown target"):
        get_target("watch")


@pytest.mark.parametrize("kwargs, message", [
    (dict(backends=["tflite"]), "unknown --format or --peer 'tflite'"),
    (dict(peers=["mlc"]), "'mlc'"),
    (dict(llm_only=True, pp=0, tg=0), "--llm-only times the LLM alone"),
    (dict(peers=["llama.cpp-Q4_0"], pp=0, tg=0), "--peer times the LLM alone"),
    (dict(images=[Path("nowhere.png")]), "no image at nowhere.png"),
    (dict(view_budgets=[None, 0]), "--max-views counts the global view"),
])
def test_a_spec_that_cannot_run_is_refused_before_anything_runs(kwargs, message):
    args = {"export_dirs": [], "backends": ["onnx"], "images": [SQUARE], "layouts": [None], **kwargs}
    with pytest.raises(BenchError) as e:
        BenchSpec(**args)
    assert message in str(e.value)


def test_peak_rss_is_the_child_process_own(tmp_path):
    """A small child of a large process reports its own peak, not the parent's."""
    import subprocess
    import sys

    from sphinx_edge.rss import peak_rss_mib

    ballast = np.ones(200 * 2**20 // 8)  # 200 MiB in this process
    ballast[::512] = 2.0
    child = subprocess.run([sys.executable, "-c", "from sphinx_edge.rss import peak_rss_mib; "
                            "print(peak_rss_mib())"], capture_output=True, text=True, check=True)
    assert peak_rss_mib() > 200
    assert float(child.stdout) < 150


def test_every_runtime_gets_the_same_threads_by_default(result):
    from sphinx_edge.benchmarks.system import physical_cores

    assert result["threads"] == physical_cores()
    assert {c["threads"] for c in result["cases"]} == {result["threads"]}
    assert "threads for every runtime" in markdown(result)
    assert result["versions"]["onnxruntime"] and result["machine"]["cpu_flags"] is not None


def test_llm_only_with_peers_records_one_thread_count_in_every_row(nano_int4_pte, tmp_path):
    """The fairness contract: the same --threads reaches our runtime and both peers (llama.cpp's
    prompt and generation threads alike), and each row says so in the JSON."""
    from conftest import missing_tool
    from tests.test_cli import run

    for module in ("llama_cpp", "onnxruntime_genai", "gguf"):
        import importlib.util

        if importlib.util.find_spec(module) is None:
            missing_tool(f"{module} is not installed (bash benchmarks/install-peers.sh, or make deps)")
    code, out = run("bench", nano_int4_pte, "--format", "pte", "--llm-only", "-t", "1", "-r", "2", "--warmup", "0",
                    "--pp", "16", "--tg", "4", "--peer", "llama.cpp-Q4_0", "--peer", "ort-genai-int4",
                    "--peers-dir", tmp_path / "peers", "--no-bandwidth", "--json", tmp_path / "b.json", "-o", "jsonl")
    assert code == 0, out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["threads"] == 1 and result["settings"]["llm_only"]
    assert [c["threads"] for c in result["cases"]] == [1] and result["cases"][0]["images"] == []
    assert {p["peer"]: p["threads"] for p in result["peers"]} == {"llama.cpp-Q4_0": 1, "ort-genai-int4": 1}
    assert result["peers"][0]["threads_batch"] == 1
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(records) == 6 and {r["threads"] for r in records} == {1}
    assert {r["test"] for r in records} == {"pp16", "tg4"} and all(len(r["samples_ts"]) == 2 for r in records)


def test_output_formats_and_changes_within_noise(result):
    from sphinx_edge.benchmarks.report import _change, render

    assert json.loads(render(result, "json"))["threads"] == result["threads"]
    csv = render(result, "csv").splitlines()
    assert csv[0].startswith("runtime,model,threads,test") and len(csv) == 1 + 2 * len(result["cases"])
    with pytest.raises(ValueError, match="unknown output format"):
        render(result, "xml")

    def stage(lo, med, hi):
        return {"min": lo, "median": med, "max": hi, "n": 3}

    assert _change(stage(9, 10, 11), stage(10.5, 12, 13)).startswith("within noise")
    assert _change(stage(5, 6, 7), stage(10, 12, 13)) == "-50%"


def test_read_bandwidth_uses_every_thread():
    from sphinx_edge.benchmarks.system import memory_bandwidth

    assert memory_bandwidth(threads=2, mib=64, repeats=3) > 0.5


def test_bandwidth_is_measured_before_and_after_the_cases(onnx_export, monkeypatch):
    """The host's bandwidth moves within minutes: both measurements are kept, the higher is the limit."""
    readings = iter([20.0, 30.0])
    monkeypatch.setattr(bench, "memory_bandwidth", lambda threads: next(readings))
    spec = BenchSpec([onnx_export[1]], ["onnx"], [SQUARE], [None], decode_tokens=1, pp=4, tg=2, warmup=0,
                     repeats=1, llm_only=True, bandwidth=True)
    seen = []
    out = run_matrix(spec, seen.append)
    assert seen[0] == seen[-1] == "memory bandwidth" and len(seen) == 3
    assert out["bandwidth_samples_gb_s"] == [20.0, 30.0] and out["bandwidth_gb_s"] == 30.0
    assert "20.0 and 30.0" in markdown(out)


def test_view_budgets_are_rows_of_their_own(onnx_export):
    spec = BenchSpec([onnx_export[1]], ["onnx"], [WIDE], [None], view_budgets=[1, None], pipelined=True,
                     decode_tokens=2, pp=0, tg=0, warmup=0, repeats=1, bandwidth=False)
    out = run_matrix(spec, lambda _: None)
    (case,) = out["cases"]
    rows = {r["max_views"]: r for r in case["images"]}
    assert rows[1]["views"] == 1 and rows[None]["views"] == 3 and all(r["pipelined"] for r in rows.values())
    assert rows[1]["image_tokens"] < rows[None]["image_tokens"]
    text = markdown(out)
    assert "| 1 (max 1) |" in text and "| 3 |" in text and "sphinx-x pipelined" in text


def test_stage_peaks_are_each_stages_own():
    import sys

    from sphinx_edge.benchmarks.system import StagePeaks

    def hold(mib: int) -> None:
        block = np.ones(mib * 2**20 // 8)
        block[::512] = 2.0

    peaks = StagePeaks()
    peaks.measure("big", hold, 300)
    peaks.measure("small", hold, 20)
    if sys.platform != "linux":
        assert peaks.stages == {"big": None, "small": None} and peaks.peak() > 300
        return
    assert peaks.stages["big"] > peaks.stages["small"] + 250  # the high-water mark was reset between them
    assert peaks.peak() >= peaks.stages["big"]


def test_rows_name_their_export_when_a_run_covers_several():
    """Two exports of the same kind (before / after a change) give rows that say which is which."""
    from sphinx_edge.benchmarks.report import memory_table

    case = {"backend": "pte", "quant": "int4", "group_size": 32, "vision_quant": "int8", "threads": 2,
            "peak_rss_mib": 3000.0, "artifact_bytes": 2500 * 2**20, "stage_peak_rss_mib": {}}
    one = {"cases": [dict(case, export_dir="exports/tiny-int4")]}
    two = {"cases": [dict(case, export_dir="exports/tiny-int4"), dict(case, export_dir="exports/tiny-int4-v2")]}
    assert "| pte int4 g32/vis int8 | 2 |" in memory_table(one)
    rows = memory_table(two).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| pte int4 g32/vis int8 (tiny-int4)", "| pte int4 g32/vis int8 (tiny-int4-v2)"]


def test_the_machine_line_names_the_int8_features():
    """int8 and int4 weights multiply at rates set by these features (AMX: 13.8x apart), so a table says them."""
    from sphinx_edge.benchmarks.system import describe, int8_features

    result = {"machine": {"cpu": "Some CPU", "cpu_flags": ["avx2", "avx512_vnni", "amx_tile", "amx_int8"], "cores": 2,
                          "memory_gib": 8.0, "os": "Linux"}, "date": "2026-12-06", "cases": []}
    assert "Machine: Some CPU (int8 on AVX-512 VNNI, AMX), 2 cores" in markdown(result)
    result["machine"] = {"cpu": "Pixel (Tensor)", "cores": 8, "memory_gib": 8.0, "os": "Android 15"}  # adb: no flags
    assert "Machine: Pixel (Tensor), 8 cores" in markdown(result)
    assert set(int8_features(describe())) <= {"AVX-512 VNNI", "AVX-VNNI", "AMX", "Arm dot product", "Arm i8mm"}
