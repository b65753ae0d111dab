"""`sphinx-edge profile`: the runtimes' own profilers, read into one table per backend."""

import pytest

from sphinx_edge.benchmarks.profile import DELEGATE, OUTSIDE_OPS, OUTSIDE_RUN, markdown, profile_llm


@pytest.mark.parametrize("backend, fixture, kernels", [
    ("onnx", "onnx_export", {"MatMul", "GroupQueryAttention"}),
    ("pte", "pte_export", {DELEGATE, "llama::custom_sdpa.out", "llama::update_cache.out"}),
])
def test_profile_splits_prefill_and_decode_by_operator(backend, fixture, kernels, request, tmp_path, monkeypatch):
    _, export_dir, _ = request.getfixturevalue(fixture)
    monkeypatch.chdir(tmp_path)
    result = profile_llm(export_dir, backend, pp=12, tg=5, threads=1)
    assert not list(tmp_path.iterdir())  # the profilers' files are read and removed, none left behind
    rows = {r["op"]: r for r in result["rows"]}
    assert kernels <= set(rows), sorted(rows)
    assert {OUTSIDE_OPS, OUTSIDE_RUN} <= set(rows)
    for phase in ("prefill", "decode"):
        assert sum(r[f"{phase}_share"] for r in rows.values()) == pytest.approx(1.0)
        assert all(r[f"{phase}_ms"] >= 0 for r in rows.values())
    # the rows add up to what the caller waited for
    assert sum(r["decode_ms"] for r in rows.values()) == pytest.approx(result["wall"]["decode_ms_per_token"], rel=1e-6)
    assert sum(r["prefill_ms"] for r in rows.values()) == pytest.approx(result["wall"]["prefill_ms"], rel=1e-6)
    assert rows["llama::custom_sdpa.out" if backend == "pte" else "GroupQueryAttention"]["prefill_ms"] > 0
    assert result["threads"] == 1
    assert "| operator | prefill ms |" in markdown(result)
